"""Causal directions: subspace ablation hooks, causal basis extraction, stimulus-response
alignment, prompt-injection detection and prediction depth (Belrose et al.)."""

__all__: list[str] = []
