"""Load time of an embedded GGUF model: ``load_model`` against transformers' own GGUF loading.

In one process, after importing everything both sides need (so neither pays the imports):

* transformers: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` on the same file,
  float32 (the reference: metadata parse, Q4_K/Q6_K dequantization in numpy, name mapping);
* ``load_model(name)`` cold: a fresh, empty tlmicroscope cache folder, so it converts the tokenizer,
  dequantizes the weights, writes both caches and boots the TransformerLens model;
* ``load_model(name)`` warm: the same cache again (best of ``--repeat``), which reads the converted
  tokenizer and the float32 safetensors and boots the model.

Each line prints the wall time and its ratio to the transformers load. The issue's target is warm
(and cold, where it can be) within 1.5x of transformers. The 1-minute load average is printed too:
on a shared machine the absolute times move with it, the ratios much less.

Usage: python benchmarks/load_time.py [--model gemma3-270m] [--kind bridge] [--repeat 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path


def _timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _gguf_path(name: str) -> Path:
    from tlmicroscope.models.embedded import EMBEDDED_NAMES, embedded_gguf_path
    from tlmicroscope.models.gemma import GEMMA_NAMES, gemma_gguf_path

    if name in GEMMA_NAMES:
        return gemma_gguf_path()
    if name in EMBEDDED_NAMES:
        return embedded_gguf_path()
    return Path(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--kind", default="bridge")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--skip-cold", action="store_true", help="warm loads only (uses the usual cache)"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Import everything either side uses before any clock starts.
    import gguf  # noqa: F401
    import transformers
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: F401

    from tlmicroscope.models import load_model
    from tlmicroscope.models.gguf_cache import gguf_architecture

    path = _gguf_path(args.model)
    arch = gguf_architecture(path)
    cls = {"gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM"}.get(arch)
    if cls is not None:
        getattr(transformers, cls)  # the model module's import, outside both clocks
    print(
        f"{args.model}: {path} ({path.stat().st_size / 2**20:.0f} MiB, {arch}), "
        f"torch threads {args.threads}, transformers {transformers.__version__}"
    )

    def reference():
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )

    hf, t_ref = _timed(reference)
    del hf
    rows = [("transformers from_pretrained(gguf_file=...)", t_ref, os.getloadavg()[0])]

    def ours():
        return load_model(args.model, kind=args.kind)

    saved = os.environ.get("TLMICROSCOPE_CACHE")
    with tempfile.TemporaryDirectory(prefix="tlm-load-") as tmp:
        if not args.skip_cold:
            os.environ["TLMICROSCOPE_CACHE"] = tmp  # empty: nothing converted yet
            model, t_cold = _timed(ours)
            del model
            rows.append(("load_model cold (empty cache)", t_cold, os.getloadavg()[0]))
        else:
            if saved is None:
                os.environ.pop("TLMICROSCOPE_CACHE", None)
            ours()  # make sure the usual cache is filled
        warm = []
        for _ in range(args.repeat):
            model, t = _timed(ours)
            del model
            warm.append(t)
        rows.append((f"load_model warm (best of {args.repeat})", min(warm), os.getloadavg()[0]))
        if saved is None:
            os.environ.pop("TLMICROSCOPE_CACHE", None)
        else:
            os.environ["TLMICROSCOPE_CACHE"] = saved

    print(f"{'':46s} {'seconds':>8s} {'ratio':>7s} {'load avg':>9s}")
    for label, t, load in rows:
        print(f"{label:46s} {t:8.1f} {t / t_ref:6.2f}x {load:9.1f}")


if __name__ == "__main__":
    main()
