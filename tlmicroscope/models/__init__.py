"""Loading models: the embedded SmolLM2-135M and Gemma 3 270M, local files, TransformerLens names, tiny test models."""

from tlmicroscope.models._compat import TL_MAJOR, TL_VERSION, is_bridge, weights_processed
from tlmicroscope.models.embedded import PIP_INSTALL_EMBEDDED, embedded_gguf_path
from tlmicroscope.models.gemma import PIP_INSTALL_GEMMA, gemma_gguf_path
from tlmicroscope.models.loading import available_models, load_model
from tlmicroscope.models.tiny import byte_tokenizer, model_kind, tiny_model

__all__ = [
    "load_model",
    "available_models",
    "tiny_model",
    "byte_tokenizer",
    "model_kind",
    "embedded_gguf_path",
    "PIP_INSTALL_EMBEDDED",
    "gemma_gguf_path",
    "PIP_INSTALL_GEMMA",
    "is_bridge",
    "weights_processed",
    "TL_VERSION",
    "TL_MAJOR",
]
