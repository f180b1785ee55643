"""Self-contained HTML pages: tables and figures (PNG embedded as base64), readable offline in any browser."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e5e5e5; text-align: right; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
tr.model td { font-weight: 600; } .meta { color: #555; font-size: .92em; } img { max-width: 100%; }
.note { color: #555; font-size: .9em; }
"""


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """A figure rendered to PNG bytes off-screen (its own Agg canvas, no pyplot state)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def img(png: bytes, *, alt: str) -> str:
    """An ``<img>`` with the PNG inline, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def img_file(path: Path, *, alt: str) -> str:
    return img(Path(path).read_bytes(), alt=alt)


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int = 1, classes: Sequence[str] = ()
) -> str:
    """An HTML table; the first ``text_columns`` columns left-aligned, numbers right-aligned."""

    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(
            f"<{tag}{' class=text' if i < text_columns else ''}>{html.escape(str(v))}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(
        f"<tr{f' class={classes[i]}' if i < len(classes) and classes[i] else ''}>{cells(r, 'td')}</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    """A whole HTML document."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
