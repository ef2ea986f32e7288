"""Shared fixtures: tiny seeded models of both architectures, and the embedded model once per session.

``TLMICROSCOPE_TEST_KIND`` (auto/bridge/hooked) picks the model class, so CI can run the
model-facing tests on TransformerLens 3.9 with HookedTransformer and with TransformerBridge.
"""

from __future__ import annotations

import os

import pytest
import torch

KIND = os.environ.get("TLMICROSCOPE_TEST_KIND", "auto")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
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


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct, loaded once per session (about 15 s)."""
    from tlmicroscope.models import load_model

    return load_model("smollm2-135m", kind=KIND)
