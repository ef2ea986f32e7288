"""Offline HTML: plotly figures and circuitsvis views in one self-contained page.

plotly's JavaScript and the circuitsvis bundle are embedded once per page, never fetched from a
CDN. circuitsvis's own ``RenderedHTML`` probes the network (``google.com``) before choosing its
local bundle and inlines 1.3 MB of JavaScript per view, so views are rendered here instead.
"""

from __future__ import annotations

import html as _html
import json
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["CircuitsVisView", "HtmlPage", "escape", "figure_fragment"]


def escape(text: Any) -> str:
    return _html.escape(str(text), quote=True)


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@lru_cache(maxsize=1)
def _circuitsvis_js() -> str:
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = js.replace("</script>", "<\\/script>")
    return "\n".join(
        line for line in js.splitlines() if not line.startswith("//# sourceMappingURL")
    )


def figure_fragment(fig: Any, *, div_id: str | None = None) -> str:
    """A plotly figure as an HTML fragment that expects plotly.js on the page."""
    return fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config={"responsive": True}
    )


@dataclass
class CircuitsVisView:
    """A circuitsvis React component with its props, rendered from the package's local bundle.

    Displays inline in Jupyter with no network access, and embeds in an ``HtmlPage``.
    """

    component: str
    props: dict[str, Any]
    height: str | None = None

    def fragment(self) -> str:
        """A ``<div>`` and a call to ``CircuitsVis.render``; needs the bundle on the page."""
        from circuitsvis.utils.convert_props import convert_props

        div = f"cv-{uuid.uuid4().hex[:12]}"
        style = f' style="min-height:{self.height}"' if self.height else ""
        return (
            f'<div id="{div}" class="circuitsvis" '
            f'data-component="{escape(self.component)}"{style}></div>'
            f"<script>CircuitsVis.render({json.dumps(div)}, CircuitsVis.{self.component}, "
            f"{convert_props(self.props)});</script>"
        )

    def _repr_html_(self) -> str:
        return f"<script>{_circuitsvis_js()}</script>" + self.fragment()

    def html(self) -> str:
        """A whole standalone page holding this view."""
        page = HtmlPage(title=self.component)
        page.add_section(self.component, self)
        return page.render()


@dataclass
class _Section:
    title: str
    body: str
    caption: str = ""
    anchor: str = ""
    status: str = "ok"


@dataclass
class HtmlPage:
    """An offline HTML page built from sections of figures, circuitsvis views and text.

    Examples:
        >>> import plotly.graph_objects as go
        >>> page = HtmlPage(title="demo")
        >>> page.add_section("A bar", go.Figure(go.Bar(y=[1, 2])), caption="made from nothing")
        >>> html = page.render()
        >>> "<script src=" in html, 'data-section="a-bar"' in html
        (False, True)
    """

    title: str
    intro: str = ""
    sections: list[_Section] = field(default_factory=list)

    def add_section(self, title: str, *items: Any, caption: str = "", status: str = "ok") -> None:
        """Add a titled section; items are plotly figures, ``CircuitsVisView``s or HTML strings."""
        parts = []
        for item in items:
            if isinstance(item, CircuitsVisView):
                parts.append(item.fragment())
            elif hasattr(item, "to_html") and hasattr(item, "data"):
                parts.append(figure_fragment(item))
            else:
                parts.append(str(item))
        anchor = "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())
        self.sections.append(_Section(title, "\n".join(parts), caption, anchor, status))

    def add_notice(self, title: str, message: str, fix: str | None = None) -> None:
        """A section whose prerequisite is missing: say so in place, with the command that fixes
        it.
        """
        body = f'<p class="notice">{escape(message)}</p>'
        if fix:
            body += f'<pre class="fix"><code>{escape(fix)}</code></pre>'
        self.add_section(title, body, status="missing")

    def render(self) -> str:
        uses_cv = any('class="circuitsvis"' in s.body for s in self.sections)
        uses_plotly = any("Plotly.newPlot" in s.body for s in self.sections)
        head_js = []
        if uses_plotly:
            head_js.append(f"<script>{_plotly_js()}</script>")
        if uses_cv:
            head_js.append(f"<script>{_circuitsvis_js()}</script>")
        toc = "".join(
            f'<li><a href="#{s.anchor}">{escape(s.title)}</a>'
            + (" <em>(missing)</em>" if s.status == "missing" else "")
            + "</li>"
            for s in self.sections
        )
        body = "\n".join(
            f'<section id="{s.anchor}" data-section="{s.anchor}" data-status="{s.status}">'
            f"<h2>{escape(s.title)}</h2>"
            + (f'<p class="caption">{escape(s.caption)}</p>' if s.caption else "")
            + f"{s.body}</section>"
            for s in self.sections
        )
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(self.title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
        max-width: 1400px;
        padding: 1rem 2rem; color: #222; }}
h1 {{ margin-bottom: .2rem; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }}
.caption {{ color: #555; font-size: .9rem; margin-top: 0; }}
.notice {{ background: #fff6e0; border-left: 4px solid #e0a800; padding: .6rem .8rem; }}
pre.fix {{ background: #f4f4f4; padding: .5rem .8rem; }}
nav ul {{ columns: 2; }}
</style>
{"".join(head_js)}
</head><body>
<h1>{escape(self.title)}</h1>
{f'<p class="intro">{self.intro}</p>' if self.intro else ""}
<nav><ul>{toc}</ul></nav>
{body}
</body></html>
"""

    def save(self, path: str | Path) -> Path:
        """Write the page atomically; returns its path."""
        from tlmicroscope.io import atomic_write_text

        return atomic_write_text(path, self.render())

    def _repr_html_(self) -> str:
        return self.render()
