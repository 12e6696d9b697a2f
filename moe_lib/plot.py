"""Expert-utilisation heatmaps and routing statistics for figures, all read from Routing records."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from matplotlib.axes import Axes
from torch import Tensor

from moe_lib.routing import Routing


def expert_fractions(routing: Routing) -> Tensor:
    """``[E]`` share of the kept assignments that each expert received (sums to 1)."""
    counts = routing.tokens_per_expert.float()
    return counts / counts.sum().clamp_min(1.0)


def utilisation_by_group(routing: Routing, groups: Tensor, num_groups: int) -> Tensor:
    """``[num_groups, E]``: for each group of tokens, the share of its kept assignments per expert.

    ``groups: [T]`` integer label of each token (a class, a region, a character type ...).
    Each row sums to 1 (rows of groups with no tokens are 0).
    """
    E = routing.num_experts
    groups = groups.reshape(-1).to(routing.expert_ids.device)
    if groups.numel() != routing.num_tokens:
        raise ValueError(f"groups must have one label per token ({routing.num_tokens}), "
                         f"got {groups.numel()}")
    flat = (groups[:, None] * E + routing.expert_ids).reshape(-1)[routing.kept.reshape(-1)]
    counts = torch.bincount(flat, minlength=num_groups * E).view(num_groups, E).float()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def mean_gate_by_group(routing: Routing, groups: Tensor, num_groups: int) -> Tensor:
    """``[num_groups, E]`` mean gate weight G(x)_i over the tokens of each group."""
    gates = routing.gates(kept_only=True).detach().float()  # [T, E]
    groups = groups.reshape(-1).to(gates.device)
    sums = gates.new_zeros(num_groups, routing.num_experts).index_add(0, groups, gates)
    n = torch.bincount(groups, minlength=num_groups).clamp_min(1).float()
    return sums / n[:, None]


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
    m = matrix.detach().cpu().float().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
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


def utilisation_over_steps(routings: Sequence[Routing]) -> Tensor:
    """``[steps, E]`` share of kept assignments per expert, one row per recorded step."""
    return torch.stack([expert_fractions(r).cpu() for r in routings])
