"""Expert-utilisation heatmaps (``moe_lib[book]``); the numbers they show come from
:mod:`moe_lib.stats`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from moe_lib.checks import check_bool, check_real, check_type
from moe_lib.runtime import import_extra

if TYPE_CHECKING:
    from matplotlib.axes import Axes

plt = import_extra("matplotlib.pyplot", "book")
sns = import_extra("seaborn", "book")


def utilisation_heatmap(
    matrix: Tensor | np.ndarray,
    row_labels: Sequence[str] | None = None,
    ylabel: str = "",
    title: str = "",
    ax: Axes | None = None,
    uniform: float | None = None,
    cbar_label: str = "share of assignments",
    annot: bool | None = None,
    vmax: float | None = None,
) -> Axes:
    """Draw ``matrix: [rows, E]`` as a heatmap with experts on the x axis and a labelled colour bar.

    ``uniform`` (usually 1/E) is marked on the colour bar: the share every expert would get under
    perfectly balanced routing. Cells are annotated when the matrix is small, unless ``annot``.
    """
    m = _as_matrix(matrix)
    if row_labels is not None and len(row_labels) != m.shape[0]:
        raise ValueError(f"row_labels must have one label per row ({m.shape[0]}), got "
                         f"{len(row_labels)}")
    for name, text in (("ylabel", ylabel), ("title", title), ("cbar_label", cbar_label)):
        check_type(name, text, str)
    if uniform is not None:
        check_real("uniform", uniform, low=0.0)
    if annot is not None:
        check_bool("annot", annot)
    if vmax is not None:
        check_real("vmax", vmax, low=0.0, low_open=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.55 * m.shape[1], 0.8 + 0.35 * m.shape[0]))
    if annot is None:
        annot = m.size <= 80
    sns.heatmap(
        m, ax=ax, cmap="viridis", vmin=0.0, vmax=vmax, annot=annot, fmt=".2f",
        xticklabels=[str(e) for e in range(m.shape[1])],
        yticklabels=list(row_labels) if row_labels is not None else "auto",
        cbar_kws={"label": cbar_label},
    )
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if uniform is not None:
        cbar = ax.collections[0].colorbar
        cbar.ax.axhline(uniform, color="white", linewidth=2)
        cbar.ax.text(1.05, uniform, " 1/E", transform=cbar.ax.get_yaxis_transform(),
                     va="center", fontsize=8)
    return ax


def _as_matrix(matrix: object) -> np.ndarray:
    """``matrix`` as a finite, non-empty 2-D float array."""
    if isinstance(matrix, Tensor):
        m = matrix.detach().cpu().float().numpy()
    elif isinstance(matrix, np.ndarray):
        m = matrix.astype(float)
    else:
        raise TypeError(f"matrix must be a torch.Tensor or a numpy array [rows, E], got "
                        f"{type(matrix).__name__}")
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"matrix must be a non-empty 2-D [rows, E] array, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("matrix must hold finite values only (no NaN or inf)")
    return m
