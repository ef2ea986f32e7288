"""tlmicroscope: look inside language models layer by layer, on TransformerLens."""

from tlmicroscope.models import load_model, tiny_model

__version__ = "0.1.0"

__all__ = ["load_model", "tiny_model", "__version__"]
