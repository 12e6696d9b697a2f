"""Expert feed-forward networks: ReLU, GELU and SwiGLU, one expert or a bank of E experts.

Weights are cast to the input's dtype in the forward (a no-op when they already match), so a
float32 layer accepts bfloat16 tokens and returns bfloat16. A bank stores the weights of all E experts stacked (``w_in: [E, d_model, h_in]``,
``w_out: [E, d_hidden, d_model]``) so that a grouped GEMM can read them in one call, and
splits them with ``unbind`` once per forward so that a per-expert loop does not build a
full-size gradient for every expert it indexes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.checks import check_choice, check_positive_int

EXPERT_KINDS = ("relu", "gelu", "swiglu")


def expert_activation(h: Tensor, kind: str) -> Tensor:
    """Apply the expert non-linearity to the first projection ``h``.

    relu / gelu: ``h: [n, d_hidden] -> [n, d_hidden]``.
    swiglu (Shazeer 2020): ``h = [gate | up]: [n, 2 * d_hidden] -> silu(gate) * up: [n, d_hidden]``.
    """
    if kind == "relu":
        return F.relu(h)
    if kind == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def in_width(d_hidden: int, kind: str) -> int:
    """Width of the first projection: SwiGLU fuses its gate and up projections side by side."""
    return 2 * d_hidden if kind == "swiglu" else d_hidden


def ffn_params(d_model: int, d_hidden: int, kind: str) -> int:
    """Parameter count of one expert (no biases): 2*d*h for ReLU/GELU, 3*d*h for SwiGLU."""
    return d_model * in_width(d_hidden, kind) + d_hidden * d_model


def _uniform_(w: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(w, -bound, bound)


class FeedForward(nn.Module):
    """One dense FFN ``x: [n, d_model] -> [n, d_model]``; the dense baseline and bound for an MoE."""

    def __init__(self, d_model: int, d_hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        check_choice("expert", kind, EXPERT_KINDS)
        self.kind = kind
        self.w_in = nn.Parameter(_uniform_(torch.empty(d_model, in_width(d_hidden, kind)), d_model))
        self.w_out = nn.Parameter(_uniform_(torch.empty(d_hidden, d_model), d_hidden))

    def forward(self, x: Tensor) -> Tensor:
        w_in, w_out = self.w_in.to(x.dtype), self.w_out.to(x.dtype)
        return expert_activation(x @ w_in, self.kind) @ w_out


class ExpertBank(nn.Module):
    """E expert FFNs of one kind with stacked weights.

    ``w_in: [E, d_model, h_in]`` (``h_in = 2 * d_hidden`` for SwiGLU: gate and up fused),
    ``w_out: [E, d_hidden, d_model]``. No biases, as in Mixtral and Switch.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        check_choice("expert", kind, EXPERT_KINDS)
        self.kind = kind
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        w_in = torch.empty(num_experts, d_model, in_width(d_hidden, kind))
        w_out = torch.empty(num_experts, d_hidden, d_model)
        self.w_in = nn.Parameter(_uniform_(w_in, d_model))
        self.w_out = nn.Parameter(_uniform_(w_out, d_hidden))

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Run expert ``e`` alone: ``x: [n, d_model] -> [n, d_model]`` (the readable reference)."""
        w_in, w_out = self.w_in[e].to(x.dtype), self.w_out[e].to(x.dtype)
        return expert_activation(x @ w_in, self.kind) @ w_out

    def forward_all(self, x: Tensor) -> Tensor:
        """Run every expert on every token: ``x: [n, d_model] -> [E, n, d_model]`` (dense gating)."""
        h = torch.matmul(x.unsqueeze(0), self.w_in.to(x.dtype))  # [E, n, h_in]
        return torch.matmul(expert_activation(h, self.kind), self.w_out.to(x.dtype))  # [E, n, d]

    def forward_slices(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on its contiguous slice of rows.

        ``x_sorted: [n, d_model]`` holds the rows for expert 0, then expert 1, ...;
        ``counts[e]`` rows each (``sum(counts) == n``). Returns ``[n, d_model]`` in the same order.
        """
        # unbind: one backward node for all experts, not a full-size gradient per indexed expert
        w_in = self.w_in.to(x_sorted.dtype).unbind(0)
        w_out = self.w_out.to(x_sorted.dtype).unbind(0)
        outs = []
        for e, rows in enumerate(x_sorted.split(counts, dim=0)):
            if rows.shape[0] == 0:
                continue
            outs.append(expert_activation(rows @ w_in[e], self.kind) @ w_out[e])
        if not outs:
            return x_sorted.new_zeros(0, self.d_model)
        return torch.cat(outs, dim=0)
