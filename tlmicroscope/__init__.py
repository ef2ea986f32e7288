"""tlmicroscope: look inside language models layer by layer, on TransformerLens.

The top level holds the entry points; each analysis lives in its package: ``lenses``,
``causal``, ``microscope``, ``geometry``, with figures in ``viz``.
"""

__version__ = "0.1.0"

from tlmicroscope.models import load_model, tiny_model
from tlmicroscope.report import Report, report

__all__ = ["Report", "__version__", "load_model", "report", "tiny_model"]
