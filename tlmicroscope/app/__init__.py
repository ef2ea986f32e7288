"""The presentation layer: the report engine, its sections and panels, the CLI and the dashboard.

Analyses (``lenses``, ``microscope``, ``geometry``, ``causal``, ``models``, ``viz`` and the
top-level analysis modules) return result objects and never import this package; everything
that turns results into pages, commands or a dashboard lives here:

* ``sections``: the section registry and the presets (the family commands' pages);
* ``report``: the engine (one shared forward pass, sections in order, notices for what is missing);
* ``panels``: one module per analysis family registering its sections (lens, microscope, token
  geometry, latent geometry, causal);
* ``prerequisites``: how a section or command finds a fitted object (the artifact store);
* ``commands``: the subcommands of ``tlmicroscope``; ``cli``: the command itself;
* ``dashboard`` and ``serve``: the local Gradio dashboard.

Examples:
    >>> from tlmicroscope.app import available_sections
    >>> available_sections()[0]
    'trajectory'
"""

from tlmicroscope.app.report import Report, report, report_steps
from tlmicroscope.app.sections import (
    PRESETS,
    MissingPrerequisite,
    ReportContext,
    Section,
    available_sections,
    available_settings,
    register_section,
)

__all__ = [
    "PRESETS",
    "MissingPrerequisite",
    "Report",
    "ReportContext",
    "Section",
    "available_sections",
    "available_settings",
    "register_section",
    "report",
    "report_steps",
]
