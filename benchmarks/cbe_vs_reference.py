"""Causal basis extraction: tlmicroscope against the reference ``tuned-lens`` package (PyPI 0.2.0).

Both extract k directions at one layer of the embedded SmolLM2-135M through the logit lens, from
the same hidden states (``blocks.{layer}.hook_resid_pre`` = HF ``hidden_states[layer]``), with the
same k, mean ablation, ``max_iter`` and thread count, one after the other:

* **reference**: ``tuned_lens.causal.extract_causal_bases`` with ``LogitLens.from_model`` on the
  transformers model exported from the embedded GGUF, in the reference's own virtual environment
  (``benchmarks/.venv-tuned-lens``, created once with its old pins and shared with the tuned-lens
  benchmark). The script checks that its lens reads the same log-probabilities as ours;
* **ours**: ``extract_causal_basis(model, "logit", hidden_states, layer, k)``.

It prints the time per direction of each, the ratio, the energies side by side with their
relative difference, and how well the directions agree (|cos|). Run it under the shared lock:

    flock /tmp/tlm-heavy.lock .venv/bin/python benchmarks/cbe_vs_reference.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Runs inside the reference venv: the reference CBE on our hidden states.
REFERENCE_DRIVER = r"""
import json, sys, time
import torch as th
from transformers import AutoModelForCausalLM
from tuned_lens.nn.lenses import LogitLens
from tuned_lens.causal import extract_causal_bases

cfg = json.loads(sys.argv[1])
th.set_num_threads(cfg["threads"])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], torch_dtype=th.float32,
                                             attn_implementation="eager").eval()
lens = LogitLens.from_model(model).float()
h = th.load(cfg["hidden"], weights_only=True)
with th.no_grad():
    probe = lens(h[0, :8], 0).log_softmax(-1)
t0 = time.perf_counter()
# num_layers = len(hiddens) - 1: the second entry only makes the reference do one layer.
bases = extract_causal_bases(lens, [h, h], cfg["k"], max_iter=cfg["max_iter"], mode="mean")
basis = next(iter(bases))
seconds = time.perf_counter() - t0
th.save({"energies": basis.energies, "vectors": basis.vectors, "probe": probe, "seconds": seconds},
        cfg["out"])
"""


def export_hf_folder(folder: Path) -> Path:
    """The embedded model as a plain float32 Hugging Face folder that transformers 4 reads.

    The GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not
    serializable"), so its dequantized weights are copied into a model built from its config.
    """
    from transformers import AutoModelForCausalLM

    from tlmicroscope.models.embedded import embedded_gguf_path, load_gguf_hf_model

    hf = load_gguf_hf_model(embedded_gguf_path())
    cfg = hf.config
    cfg.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta.pop("quantization_config", None)
    theta = (meta.get("rope_parameters") or {}).get("rope_theta") or meta.get("rope_theta")
    meta["rope_theta"] = theta  # transformers 4 reads rope_theta; 5 moved it into rope_parameters
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512, help="hidden-state rows (2 windows of 256)")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tuned_lens_vs_reference import (
        ensure_reference_venv,
    )  # the venv is shared with that benchmark

    from tlmicroscope.causal import extract_causal_basis
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.lenses import Readout
    from tlmicroscope.models import load_model

    model = load_model()
    seq_len = 256
    windows = token_windows(
        model,
        "embedded",
        seq_len=seq_len,
        n_windows=max(1, args.tokens // seq_len),
        shuffle=True,
        seed=0,
    )
    name = f"blocks.{args.layer}.hook_resid_pre"
    with torch.inference_mode():
        _, cache = model.run_with_cache(windows, names_filter=[name])
    hidden = cache[name].clone()  # [batch pos d_model]
    print(
        f"layer {args.layer}, k={args.k}, {hidden.shape[0] * hidden.shape[1]} tokens, mean "
        f"ablation, max_iter={args.max_iter}, {args.threads} threads"
    )

    t0 = time.perf_counter()
    ours = extract_causal_basis(
        model,
        lens="logit",
        corpus=hidden,
        layer=args.layer,
        k=args.k,
        mode="mean",
        max_iter=args.max_iter,
        progress=False,
    )
    ours_s = time.perf_counter() - t0
    print(
        f"ours:      {ours_s / args.k:8.2f} s per direction  (evaluations {ours.n_evals.tolist()}, "
        f"converged {ours.converged.tolist()})"
    )
    if args.skip_reference:
        return 0

    python = ensure_reference_venv()
    with tempfile.TemporaryDirectory(prefix="cbe-bench-") as tmp:
        work = Path(tmp)
        model_dir = export_hf_folder(work / "smollm2-135m-hf")
        torch.save(hidden, work / "hidden.pt")
        cfg = dict(
            model_dir=str(model_dir),
            hidden=str(work / "hidden.pt"),
            k=args.k,
            max_iter=args.max_iter,
            threads=args.threads,
            out=str(work / "ref.pt"),
        )
        subprocess.run(
            [str(python), "-c", REFERENCE_DRIVER, json.dumps(cfg)],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        ref = torch.load(work / "ref.pt", weights_only=True)
    ref_s = float(ref["seconds"])
    ours_probe = torch.log_softmax(Readout(model)(hidden[0, :8]), -1)
    probe_diff = float((ours_probe - ref["probe"]).abs().max())
    print(f"reference: {ref_s / args.k:8.2f} s per direction")
    print(f"ratio reference / ours: {ref_s / ours_s:.2f}x faster (target >= 2x)")
    print(f"same lens readout: max |log-prob difference| = {probe_diff:.2e}")
    rel = (ours.energies - ref["energies"]).abs() / ref["energies"].abs()
    cos = (ours.vectors.T @ ref["vectors"].float()).abs().diagonal()
    print("direction  energy ours   energy ref   rel. diff   |cos(ours, ref)|")
    for j in range(args.k):
        print(
            f"{j:9d}  {float(ours.energies[j]):11.5g}  {float(ref['energies'][j]):11.5g}  "
            f"{float(rel[j]):9.2%}   {float(cos[j]):.4f}"
        )
    print(f"largest relative energy difference: {float(rel.max()):.2%} (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
