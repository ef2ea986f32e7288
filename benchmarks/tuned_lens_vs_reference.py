"""Tuned-lens training: tlmicroscope against the reference ``tuned-lens`` package (PyPI 0.2.0).

Both train on the embedded SmolLM2-135M with the same weights, the same token windows in the same
order, the same token budget and the same thread count, one after the other:

* **reference**: ``tuned_lens.TunedLens`` driven through its own training step (per-layer
  ``backward`` under bfloat16 autocast, KL to the final log-softmax, SGD-Nesterov lr 0.1, weight
  decay 1e-3, clip 1.0, linear decay), in its own virtual environment, which this script creates
  under ``benchmarks/.venv-tuned-lens`` (it needs ``transformers<5`` and ``torchdata<0.10``). Its
  CLI tokenizes its own dataset, so it cannot be fed the same batches; the module is driven
  directly. The model is exported once as a local Hugging Face folder from the transformers model
  the GGUF loads into, and the script checks that the reference sees the same logits as ours;
* **ours, reference recipe**: ``train_tuned_lens(recipe="sgd", init="zero")``, the same algorithm;
* **ours, default**: Muon + AdamW after the least-squares initialisation.

It prints training throughput (tokens per second through all layers), the ratio ours/reference,
and the final KL per layer of every lens on held-out tokens (one evaluator, float32), with the
logit lens for scale. Run it under the shared lock:

    flock /tmp/tlm-heavy.lock .venv/bin/python benchmarks/tuned_lens_vs_reference.py
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
REF_VENV = HERE / ".venv-tuned-lens"
REF_PINS = [
    "tuned-lens==0.2.0",
    "transformers<5",
    "torchdata<0.10",
    "datasets<4",
    "huggingface_hub<1.0",
]

# Runs inside the reference venv: the reference's training step over our token windows.
REFERENCE_DRIVER = r"""
import json, sys, time
import torch as th
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from tuned_lens.nn.lenses import TunedLens

cfg = json.loads(sys.argv[1])
th.set_num_threads(cfg["threads"])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], torch_dtype=th.float32,
                                             attn_implementation="eager").eval()
model.requires_grad_(False)
windows = th.load(cfg["windows"], weights_only=True)
probe = windows[:1, :32]
with th.no_grad():
    probe_logits = model(probe).logits[0]
lens = TunedLens.from_model(model).float()
params = [p for p in lens.parameters() if p.requires_grad]
beta = 0.9
opt = th.optim.SGD(params, lr=1.0 * (1 - beta), momentum=beta, nesterov=True, weight_decay=1e-3)
sched = get_linear_schedule_with_warmup(opt, 0, cfg["steps"])
per_step, micro = cfg["per_step"], cfg["micro"]
grad_acc = per_step // micro
history, seconds = [], []
for step in range(cfg["steps"]):
    t0 = time.perf_counter()
    batch_ids = windows[step * per_step:(step + 1) * per_step]
    losses = th.zeros(lens.config.num_hidden_layers, dtype=th.float64)
    for m in range(grad_acc):
        ids = batch_ids[m * micro:(m + 1) * micro]
        with th.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        labels = out.logits.float().log_softmax(dim=-1)
        for i, h in enumerate(out.hidden_states[:-1]):
            with th.autocast("cpu", dtype=th.bfloat16):
                logits = lens(h, idx=i)
                loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                losses[i] += loss.detach().double() / grad_acc
                scaled = loss / grad_acc
            scaled.backward()
    th.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    sched.step()
    seconds.append(time.perf_counter() - t0)
    history.append(losses.tolist())
    print(f"reference step {step + 1}/{cfg['steps']}: mean KL {losses.mean():.3f}, "
          f"{seconds[-1]:.1f} s", file=sys.stderr, flush=True)
lens.save(cfg["lens_dir"])
json.dump({"seconds": seconds, "kl": history, "probe_logits": probe_logits.tolist()},
          open(cfg["out"], "w"))
"""


def ensure_reference_venv() -> Path:
    """Create ``benchmarks/.venv-tuned-lens`` with the reference and its old pins (once)."""
    python = REF_VENV / "bin" / "python"
    if python.exists():
        ok = subprocess.run([str(python), "-c", "import tuned_lens.nn.lenses"], capture_output=True)
        if ok.returncode == 0:
            return python
    print(
        f"creating {REF_VENV} (torch {torch.__version__.split('+')[0]}, {' '.join(REF_PINS)}) ...",
        file=sys.stderr,
    )
    subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + REF_PINS, check=True)
    return python


def export_hf_folder(folder: Path) -> Path:
    """The embedded model as a local Hugging Face folder that transformers 4 reads the same way."""
    if (folder / "config.json").is_file():
        return folder
    from tlmicroscope.models.embedded import (
        embedded_gguf_path,
        load_gguf_hf_model,
        load_gguf_tokenizer,
    )

    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM

    hf = load_gguf_hf_model(gguf)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".hf-"))
    # The GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
    # serializable"): copy its dequantized float32 weights into a plain model built from its config.
    hf.config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(tmp)
    load_gguf_tokenizer(gguf).save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the weights are plain float32 after dequantizing
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta")
    cfg["rope_theta"] = theta  # transformers 4 reads rope_theta; 5 moved it into rope_parameters
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    os.replace(tmp, folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens-per-step", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--curves",
        action="store_true",
        help="instead: KL against tokens seen for zero/least-squares init x SGD/Muon (ours only)",
    )
    ap.add_argument("--html", default=None, help="with --curves: write the learning curves here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.curves:
        return curves(args)

    from tlmicroscope.lenses import load_lens
    from tlmicroscope.lenses.evaluate import evaluate_lens
    from tlmicroscope.lenses.train import _step_windows, lens_token_windows, train_tuned_lens
    from tlmicroscope.models import load_model

    python = None if args.skip_reference else ensure_reference_venv()
    model = load_model()
    windows = lens_token_windows(model, None, seq_len=args.seq_len, split="train")
    per_step = args.tokens_per_step // args.seq_len
    micro = min(per_step, max(1, 512 // args.seq_len))
    cache: dict = {}
    order = [
        i for s in range(args.steps) for i in _step_windows(windows.shape[0], per_step, s, 0, cache)
    ]
    common = dict(
        steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        seq_len=args.seq_len,
        seed=0,
        micro_batch_tokens=micro * args.seq_len,
        progress=True,
    )
    results: dict[str, dict] = {}
    lenses = {}

    work = REF_VENV / "work"
    if python is not None:
        work.mkdir(parents=True, exist_ok=True)
        model_dir = export_hf_folder(work / "smollm2-135m-hf")
        torch.save(windows[order].clone(), work / "windows.pt")
        cfg = dict(
            model_dir=str(model_dir),
            windows=str(work / "windows.pt"),
            steps=args.steps,
            per_step=per_step,
            micro=micro,
            threads=args.threads,
            lens_dir=str(work / "lens"),
            out=str(work / "result.json"),
        )
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
        t0 = time.perf_counter()
        subprocess.run([str(python), "-c", REFERENCE_DRIVER, json.dumps(cfg)], check=True, env=env)
        ref = json.loads((work / "result.json").read_text())
        with torch.inference_mode():
            ours_probe = torch.log_softmax(model(windows[order[:1], :32])[0], -1)
        diff = float(
            (ours_probe - torch.log_softmax(torch.tensor(ref["probe_logits"]), -1)).abs().max()
        )
        print(
            f"reference sees the same model: max |log-prob difference| {diff:.2e}", file=sys.stderr
        )
        if diff > 1e-3:
            raise SystemExit(
                "The exported Hugging Face folder does not reproduce the model; aborting."
            )
        secs = sum(ref["seconds"])
        results["reference (tuned-lens 0.2.0, SGD)"] = {
            "tokens_per_second": args.steps * args.tokens_per_step / secs,
            "train_seconds": secs,
            "wall_seconds": time.perf_counter() - t0,
        }
        lenses["reference (tuned-lens 0.2.0, SGD)"] = load_lens(work / "lens", model)

    for label, settings in (
        ("ours, reference recipe (SGD, zero init)", dict(recipe="sgd", init="zero")),
        ("ours, default (Muon + least squares)", dict(recipe="muon", init="lstsq")),
    ):
        t0 = time.perf_counter()
        res = train_tuned_lens(model, None, **common, **settings)
        results[label] = {
            "tokens_per_second": res.tokens_per_second,
            "train_seconds": float(res.seconds.sum()),
            "init_seconds": res.init_seconds,
            "wall_seconds": time.perf_counter() - t0,
        }
        lenses[label] = res.lens

    evals = {}
    for i, (label, lens) in enumerate(lenses.items()):
        evals[label] = evaluate_lens(
            model,
            lens=lens,
            corpus=None,
            n_tokens=args.eval_tokens,
            seq_len=args.seq_len,
            baseline=(i == 0),
            progress=False,
        )
    logit = next(iter(evals.values())).baseline

    print(
        f"\n== tuned-lens training on SmolLM2-135M, {args.steps} steps x {args.tokens_per_step} "
        "tokens "
        f"(seq_len {args.seq_len}), {args.threads} threads =="
    )
    ref_tps = next(
        (r["tokens_per_second"] for k, r in results.items() if k.startswith("reference")), None
    )
    for label, r in results.items():
        ratio = (
            f"  ours/reference = {r['tokens_per_second'] / ref_tps:.2f}x"
            if ref_tps and not label.startswith("reference")
            else ""
        )
        init = f", least-squares init {r['init_seconds']:.0f} s" if r.get("init_seconds") else ""
        print(
            f"{label:45s} {r['tokens_per_second']:7.1f} tokens/s ({r['train_seconds']:.0f} s of "
            f"steps{init}){ratio}"
        )
    labels = list(evals)
    print(
        f"\nheld-out KL(final || lens) per layer, nats ({logit.n_tokens} tokens; "
        f"x{logit.nats_to_bpb:.3f} for bits/byte)"
    )
    short = ["logit"] + [
        lab.split(",")[0] + ("-sgd" if "SGD, zero" in lab else "-muon" if "Muon" in lab else "")
        for lab in labels
    ]
    print("layer " + " ".join(f"{s:>14s}" for s in short))
    for j in range(len(logit.layers) - 1):
        row = [float(logit.kl[j])] + [float(evals[lab].kl[j]) for lab in labels]
        print(f"{j:5d} " + " ".join(f"{v:14.3f}" for v in row))
    print(
        "mean  "
        + " ".join(
            f"{v:14.3f}"
            for v in [float(logit.kl[:-1].mean())]
            + [float(evals[lab].kl[:-1].mean()) for lab in labels]
        )
    )
    ref_label = next((lab for lab in labels if lab.startswith("reference")), None)
    if ref_label:
        for lab in labels:
            if lab != ref_label:
                le = int((evals[lab].kl[:-1] <= evals[ref_label].kl[:-1]).sum())
                print(
                    f"{lab}: KL at or below the reference's at {le} of {len(logit.layers) - 1} "
                    "layers"
                )
    if args.json:
        out = {
            "settings": vars(args),
            "throughput": results,
            "kl": {lab: ev.kl.tolist() for lab, ev in evals.items()},
            "logit_kl": logit.kl.tolist(),
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def curves(args) -> int:
    """KL on unseen batches against tokens seen, for each initialisation and recipe."""
    from tlmicroscope.lenses.train import train_tuned_lens
    from tlmicroscope.models import load_model

    model = load_model()
    runs = {}
    for recipe in ("sgd", "muon"):
        for init in ("zero", "lstsq"):
            label = f"{recipe}, {init} init"
            res = train_tuned_lens(
                model,
                None,
                steps=args.steps,
                tokens_per_step=args.tokens_per_step,
                seq_len=args.seq_len,
                recipe=recipe,
                init=init,
                progress=True,
            )
            runs[label] = res
            print(
                f"{label}: {res.tokens_per_second:.1f} tokens/s, init {res.init_seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    L = next(iter(runs.values())).kl.shape[1]
    print(f"\n== mean KL(final || lens) over the {L} layers on each step's unseen batch (nats) ==")
    print(f"{'tokens seen':>12} " + " ".join(f"{k:>18s}" for k in runs))
    n = next(iter(runs.values())).kl.shape[0]
    for i in sorted(set([0, 1, 2] + list(range(0, n, max(1, n // 8))) + [n - 1])):
        toks = int(next(iter(runs.values())).tokens_seen[i])
        print(f"{toks:12d} " + " ".join(f"{float(r.kl[i].mean()):18.3f}" for r in runs.values()))
    print("\nlast step's KL per layer (nats):")
    print("layer " + " ".join(f"{k:>18s}" for k in runs))
    for j in range(L):
        print(f"{j:5d} " + " ".join(f"{float(r.kl[-1, j]):18.3f}" for r in runs.values()))
    if args.html:
        from tlmicroscope.viz import HtmlPage
        from tlmicroscope.viz.tuned import training_curve_figure

        page = HtmlPage(title="Tuned-lens learning curves")
        page.add_section(
            "KL against tokens seen", training_curve_figure(runs, layers=[0, L // 2, L - 1])
        )
        page.save(args.html)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    k: {
                        "tokens_seen": r.tokens_seen.tolist(),
                        "kl": r.kl.tolist(),
                        "tokens_per_second": r.tokens_per_second,
                        "init_seconds": r.init_seconds,
                    }
                    for k, r in runs.items()
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
