"""Old import path of the dashboard, kept working; it lives in ``tlmicroscope.app.dashboard``."""

from tlmicroscope.app.dashboard import (
    DASHBOARD_INSTALL,
    build_app,
    check_lens_path,
    check_model_choice,
    host_warning,
    make_analyse,
    serve,
)

__all__ = [
    "DASHBOARD_INSTALL",
    "build_app",
    "check_lens_path",
    "check_model_choice",
    "host_warning",
    "make_analyse",
    "serve",
]
