"""Sliders: a live ipywidgets slider in Jupyter and Colab, precomputed frames on the static book.

A chapter writes one function ``draw(value) -> Figure`` and calls :func:`slider`. In a kernel
with a front end it becomes ``ipywidgets.interact``. When the book is built (``make book`` sets
``MOE_BOOK_STATIC=1``) every value is drawn once and the frames are shown behind an HTML range
input, so the slider moves on a page that cannot run Python.
"""

from __future__ import annotations

import base64
import html
import io
import os
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from moe_lib.checks import check_int, check_type
from moe_lib.runtime import import_extra

if TYPE_CHECKING:
    from matplotlib.figure import Figure

plt = import_extra("matplotlib.pyplot", "book")

STATIC_ENV = "MOE_BOOK_STATIC"


def _check_slider(draw: object, values: object, name: object, start: object) -> None:
    if not callable(draw):
        raise TypeError(f"draw must be callable, value -> Figure, got {type(draw).__name__}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"values must be a list or tuple of slider values, got "
                        f"{type(values).__name__}")
    if len(values) == 0:
        raise ValueError("values must hold at least one slider value")
    check_type("name", name, str)
    check_int("start", start, low=0, high=len(values) - 1)


def figure_png(fig: Figure, dpi: int = 90) -> str:
    """The figure as a base64 PNG string (the figure is closed)."""
    check_type("fig", fig, plt.Figure)
    check_int("dpi", dpi, low=1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def static_slider_html(
    draw: Callable[[object], Figure], values: Sequence[object], name: str, start: int = 0
) -> str:
    """HTML with one precomputed frame per value and a range input that switches between them."""
    _check_slider(draw, values, name, start)
    uid = "moe-slider-" + uuid.uuid4().hex[:8]
    frames = [figure_png(draw(v)) for v in values]
    imgs = "".join(
        f'<img class="moe-frame" data-value="{html.escape(str(v))}" '
        f'src="data:image/png;base64,{png}" style="display:{"block" if i == start else "none"};'
        'max-width:100%">'
        for i, (v, png) in enumerate(zip(values, frames))
    )
    labels = [html.escape(str(v)) for v in values]
    onchange = (
        f"var r=document.getElementById('{uid}');"
        "var f=r.querySelectorAll('.moe-frame');"
        "f.forEach(function(e,i){e.style.display=(i==this.value)?'block':'none';},this);"
        "r.querySelector('.moe-value').textContent=f[this.value].dataset.value;"
    )
    return (
        f'<div id="{uid}" class="moe-slider">'
        f'<label>{html.escape(name)} = <span class="moe-value">{labels[start]}</span></label><br>'
        f'<input type="range" min="0" max="{len(values) - 1}" step="1" value="{start}" '
        f'oninput="{html.escape(onchange)}" style="width:60%">{imgs}</div>'
    )


def slider(
    draw: Callable[[object], Figure], values: Sequence[object], name: str, start: int = 0
) -> None:
    """Show ``draw(value)`` with a slider over ``values``.

    Live (ipywidgets) in Jupyter and Colab; precomputed frames when ``MOE_BOOK_STATIC`` is set.
    """
    _check_slider(draw, values, name, start)
    from IPython.display import HTML, display

    if os.environ.get(STATIC_ENV):
        display(HTML(static_slider_html(draw, values, name, start)))
        return
    import ipywidgets

    def show(value: object) -> None:
        fig = draw(value)
        display(fig)
        plt.close(fig)

    ipywidgets.interact(
        show, value=ipywidgets.SelectionSlider(options=list(values), value=values[start],
                                               description=name, continuous_update=False)
    )
