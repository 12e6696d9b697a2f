"""Heatmaps and sliders (moe_lib.plot, moe_lib.widgets)."""
# ruff: noqa: E402  (matplotlib.use must run before anything imports pyplot)

import matplotlib

matplotlib.use("Agg")

import IPython.display
import matplotlib.pyplot as plt
import pytest
import torch
from hypothesis import settings
from matplotlib.axes import Axes

from moe_lib import plot, widgets
from moe_lib.routing import make_routing

FAST = settings(max_examples=30, deadline=None, database=None)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=g)
    return make_routing(z.topk(k).indices, torch.rand(T, k, generator=g), z)


@pytest.mark.parametrize("uniform", [None, 0.25])
def test_utilisation_heatmap(uniform):
    m = torch.rand(3, 4)
    ax = plot.utilisation_heatmap(m, row_labels=["a", "b", "c"], ylabel="class", title="t",
                                  uniform=uniform)
    assert isinstance(ax, Axes)
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "class" and ax.get_title() == "t"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    cbar = ax.collections[0].colorbar
    assert cbar.ax.get_ylabel() == "share of assignments"
    assert len(cbar.ax.lines) == (0 if uniform is None else 1)


def draw_recorder():
    calls = []

    def draw(value):
        calls.append(value)
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [0, value])
        return fig

    return draw, calls


@pytest.mark.parametrize("values", [[1], [0.1, 0.2, 0.5], ["<a>", "b&c"]])
def test_static_slider_html(values):
    draw, calls = draw_recorder()
    page = widgets.static_slider_html(draw, values, "k <1>", start=len(values) - 1)
    assert calls == values and plt.get_fignums() == []  # every frame drawn once, then closed
    assert page.count("<img ") == len(values)
    assert page.count('type="range"') == 1 and f'max="{len(values) - 1}"' in page
    assert page.count("display:block") == 1 and "<a>" not in page and "k &lt;1&gt;" in page


def test_static_slider_rejects_empty_values():
    with pytest.raises(ValueError, match="values"):
        widgets.static_slider_html(draw_recorder()[0], [], "n")


def test_slider_static_mode_shows_html(monkeypatch):
    shown = []
    monkeypatch.setenv(widgets.STATIC_ENV, "1")
    monkeypatch.setattr(IPython.display, "display", shown.append)
    draw, calls = draw_recorder()
    widgets.slider(draw, [1, 2, 3], "n")
    assert calls == [1, 2, 3] and len(shown) == 1
    assert shown[0].data.count("<img ") == 3


def test_slider_live_mode_without_front_end(monkeypatch):
    """ipywidgets.interact works in a plain process: it draws the start value once."""
    monkeypatch.delenv(widgets.STATIC_ENV, raising=False)
    draw, calls = draw_recorder()
    widgets.slider(draw, [1, 2, 3], "n", start=1)
    assert calls == [2]


def test_slider_static_rejects_empty_values(monkeypatch):
    monkeypatch.setenv(widgets.STATIC_ENV, "1")
    with pytest.raises(ValueError, match="values"):
        widgets.slider(draw_recorder()[0], [], "n")


def test_slider_live_rejects_empty_values(monkeypatch):
    monkeypatch.delenv(widgets.STATIC_ENV, raising=False)
    with pytest.raises(ValueError, match="values"):
        widgets.slider(draw_recorder()[0], [], "n")
