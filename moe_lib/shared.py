"""Shared experts: always-on FFNs beside the routed ones (DeepSeekMoE, DeepSeek-V3, Qwen2-MoE).

n shared experts of hidden h each are one FFN of hidden n * h (their hidden units side by side;
the sum of n FFNs is one FFN with the hidden units concatenated). Every token uses them, outside
capacity, so they count in the active parameters. DeepSeek adds them ungated; Qwen2-MoE scales
their output by sigmoid(x . w_gate), one scalar per token.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_lib.activations import ExpertActivation
from moe_lib.checks import check_bool, check_positive_int
from moe_lib.experts import FeedForward


class SharedExperts(nn.Module):
    """``x: [T, d_model] -> [T, d_model]``: ``g(x) * FFN(x)`` with g = sigmoid(x . w) if gated,
    else 1; the FFN has hidden ``n_shared * d_shared``."""

    def __init__(self, d_model: int, d_shared: int, n_shared: int = 1,
                 kind: str | ExpertActivation = "swiglu", gate: bool = False) -> None:
        super().__init__()
        check_positive_int("n_shared", n_shared)
        check_positive_int("d_shared", d_shared)
        check_bool("gate", gate)
        self.n_shared = n_shared
        self.ffn = FeedForward(d_model, n_shared * d_shared, kind)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.ffn(x)
        if self.gate is None:
            return y
        g = self.gate.weight.to(y.dtype)  # [1, d_model]
        return y * (x.to(y.dtype) @ g.t()).sigmoid()  # [T, 1] scale per token
