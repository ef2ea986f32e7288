"""Loading models: the embedded SmolLM2-135M and Gemma 3 270M, local files, TransformerLens
names, tiny test models."""

from tlmicroscope.models.access import TL_MAJOR, TL_VERSION, is_bridge, weights_processed
from tlmicroscope.models.embedded import PIP_INSTALL_EMBEDDED, embedded_gguf_path
from tlmicroscope.models.gemma import PIP_INSTALL_GEMMA, gemma_gguf_path
from tlmicroscope.models.loading import available_models, load_model
from tlmicroscope.models.tiny import byte_tokenizer, model_kind, tiny_model

__all__ = [
    "PIP_INSTALL_EMBEDDED",
    "PIP_INSTALL_GEMMA",
    "TL_MAJOR",
    "TL_VERSION",
    "available_models",
    "byte_tokenizer",
    "embedded_gguf_path",
    "gemma_gguf_path",
    "is_bridge",
    "load_model",
    "model_kind",
    "tiny_model",
    "weights_processed",
]
