"""Provenance: what produced a result. Every result object carries one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tlmicroscope.models import access

__all__ = ["Provenance"]


@dataclass(frozen=True)
class Provenance:
    """The model, its weight processing, the lens and the estimator settings behind a result.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> p = Provenance.from_model(tiny_model(n_layers=2), lens="logit", top_k=5)
        >>> p.weights_processed, p.lens, p.settings["top_k"]
        (False, 'logit', 5)
    """

    model: str
    model_class: str
    weights_processed: bool
    transformer_lens: str
    lens: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: Any, lens: Any = None, **settings: Any) -> Provenance:
        lens_name = None if lens is None else (lens if isinstance(lens, str) else _lens_name(lens))
        return cls(
            model=access.model_label(model),
            model_class=type(model).__name__,
            weights_processed=access.weights_processed(model),
            transformer_lens=access.TL_VERSION,
            lens=lens_name,
            settings=dict(settings),
        )

    def with_settings(self, **settings: Any) -> Provenance:
        return dataclasses.replace(self, settings={**self.settings, **settings})

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_class": self.model_class,
            "weights_processed": self.weights_processed,
            "transformer_lens": self.transformer_lens,
            "lens": self.lens,
            "settings": {k: _jsonable(v) for k, v in self.settings.items()},
        }

    def describe(self) -> str:
        """One line for figure captions and report sections."""
        parts = [
            f"model {self.model} ({self.model_class})",
            f"weights {'processed' if self.weights_processed else 'unprocessed'}",
        ]
        if self.lens:
            parts.append(f"lens {self.lens}")
        parts += [f"{k}={_jsonable(v)}" for k, v in self.settings.items()]
        return "; ".join(parts)


def _lens_name(lens: Any) -> str:
    return str(getattr(lens, "name", type(lens).__name__))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
