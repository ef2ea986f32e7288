"""Old import path of the report engine, kept working: it now lives in ``tlmicroscope.app``.

``tlmicroscope.report(...)`` (the function at the top level) and ``from tlmicroscope.report
import report`` both keep working; new code imports from ``tlmicroscope.app``.
"""

from tlmicroscope.app.report import (
    Report,
    report,
    report_steps,
    shared_capture,
)
from tlmicroscope.app.sections import (
    MissingPrerequisite,
    ReportContext,
    Section,
    available_sections,
    available_settings,
    register_section,
    require_tokens,
)

__all__ = [
    "MissingPrerequisite",
    "Report",
    "ReportContext",
    "Section",
    "available_sections",
    "available_settings",
    "register_section",
    "report",
    "report_steps",
    "require_tokens",
    "shared_capture",
]
