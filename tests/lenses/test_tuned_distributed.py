"""Two-process tuned-lens training (gloo) gives the lens of one process with the same global
batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.models]

TEXT = [
    "Each rank reads its own share of every step's windows. " * 8,
    "Gradients are summed across ranks and divided by the global token count. " * 8,
    "Least-squares statistics are summed across ranks too, before the solve. " * 8,
]
SETTINGS = dict(
    steps=4,
    tokens_per_step=256,
    seq_len=32,
    precision="fp32",
    progress=False,
    init="lstsq",
    init_tokens=256,
    micro_batch_tokens=64,
    recipe="muon",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, kind: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from tlmicroscope.lenses.train import train_tuned_lens
    from tlmicroscope.models import tiny_model

    model = tiny_model("llama", kind=kind, n_layers=3, seed=0)
    res = train_tuned_lens(model, TEXT, **SETTINGS)
    if rank == 0:
        torch.save(
            {"weight": res.lens.weight.detach(), "bias": res.lens.bias.detach(), "kl": res.kl}, out
        )
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path, model_kind):
    from tlmicroscope.lenses.train import train_tuned_lens
    from tlmicroscope.models import tiny_model

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_main, args=(2, _free_port(), model_kind, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    model = tiny_model("llama", kind=model_kind, n_layers=3, seed=0)
    one = train_tuned_lens(model, TEXT, **SETTINGS)
    torch.testing.assert_close(two["kl"], one.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["weight"], one.lens.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["bias"], one.lens.bias.detach(), rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(one.lens.weight) > 0
