"""CLI commands of the lens bench and the Jacobian lens (``lens-bench``, ``fit-jlens``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to the ``tlmicroscope`` parser (filled in by issue 13's work)."""
