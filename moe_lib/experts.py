"""Expert feed-forward networks: ReLU, GELU and SwiGLU, one expert or a bank of E experts.

An expert is ``act(x @ w_in) @ w_out`` (:mod:`moe_lib.activations`). Weights are cast to the
input's dtype in the forward (a no-op when they already match), so a float32 layer accepts
bfloat16 tokens and returns bfloat16; inside ``torch.autocast`` the expert GEMMs run in the
autocast dtype. A bank stores the weights of all E experts stacked (``w_in: [E, d_model, h_in]``,
``w_out: [E, d_hidden, d_model]``) so that one kernel can read them all
(:meth:`ExpertBank.forward_slices`) and write the gradient of all E experts into one ``[E, ...]``
buffer, where indexing ``w_in[e]`` in a Python loop would make the backward pass build a
full-size gradient for every expert it indexes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_lib.activations import EXPERT_KINDS, activation, in_width
from moe_lib.checks import check_choice, check_int, check_positive_int, check_tensor
from moe_lib.kernels import expert_mlp, grouped_matmul, swiglu


def _uniform_(w: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(w, -bound, bound)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the expert GEMMs: the autocast dtype inside ``torch.autocast`` on x's device
    (for a floating x), else ``x.dtype``."""
    check_tensor("x", x, kind="float")
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class FeedForward(nn.Module):
    """One dense FFN ``x: [..., d_model] -> [..., d_model]``: the dense baseline and the bound for
    an MoE layer (hidden ``k * h`` for the same active FLOPs as top-k experts of hidden ``h``)."""

    def __init__(self, d_model: int, d_hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        check_choice("kind", kind, EXPERT_KINDS)
        self.kind = kind
        self.d_model = d_model
        self.w_in = nn.Parameter(_uniform_(torch.empty(d_model, in_width(d_hidden, kind)), d_model))
        self.w_out = nn.Parameter(_uniform_(torch.empty(d_hidden, d_model), d_hidden))

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, kind="float", device=self.w_in.device)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got "
                             f"{tuple(x.shape)}")
        dtype = compute_dtype(x)
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        return activation(x.to(dtype) @ w_in, self.kind) @ w_out


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
        check_choice("kind", kind, EXPERT_KINDS)
        self.kind = kind
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        w_in = torch.empty(num_experts, d_model, in_width(d_hidden, kind))
        w_out = torch.empty(num_experts, d_hidden, d_model)
        self.w_in = nn.Parameter(_uniform_(w_in, d_model))
        self.w_out = nn.Parameter(_uniform_(w_out, d_hidden))

    def params_per_expert(self) -> int:
        """Parameters of one expert: ``d_model * h_in + d_hidden * d_model``."""
        return self.w_in[0].numel() + self.w_out[0].numel()

    def _check_rows(self, x: Tensor) -> None:
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.w_in.device)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Run expert ``e`` alone: ``x: [n, d_model] -> [n, d_model]`` (the readable reference)."""
        check_int("e", e, low=0, high=self.num_experts - 1)
        self._check_rows(x)
        dtype = compute_dtype(x)
        w_in, w_out = self.w_in[e].to(dtype), self.w_out[e].to(dtype)
        return activation(x.to(dtype) @ w_in, self.kind) @ w_out

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every token: ``x: [n, d_model] -> [E, n, d_model]`` (dense gating)."""
        self._check_rows(x)
        dtype = compute_dtype(x)
        h = torch.matmul(x.to(dtype).unsqueeze(0), self.w_in.to(dtype))  # [E, n, h_in]
        return torch.matmul(activation(h, self.kind), self.w_out.to(dtype))  # [E, n, d]

    def forward_slices(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on its contiguous slice of rows.

        ``x_sorted: [n, d_model]`` holds the rows for expert 0, then expert 1, ...;
        ``counts[e]`` rows each (``sum(counts) == n``). Returns ``[n, d_model]`` in the same order.

        Chosen per device by measurement (``python -m moe_lib.bench.dispatch``):

        - CPU, eager: :func:`moe_lib.kernels.expert_mlp` runs the whole FFN block by block
          (GEMM, activation, GEMM on each block of an expert's rows), which saves the full-size
          round trips of the activation and its gradients;
        - GPU, or under ``torch.compile``: each projection is one grouped GEMM
          (:func:`moe_lib.kernels.grouped_matmul`: one ``torch._grouped_mm`` kernel in bfloat16
          on Hopper or Blackwell) that writes every expert's rows into one buffer, and the
          non-linearity runs once over all ``n`` rows (:func:`moe_lib.kernels.swiglu`).
        """
        self._check_rows(x_sorted)
        dtype = compute_dtype(x_sorted)
        x_sorted = x_sorted.to(dtype)
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        if x_sorted.device.type == "cpu" and not torch.compiler.is_compiling():
            return expert_mlp(x_sorted, w_in, w_out, counts, self.kind)
        h = grouped_matmul(x_sorted, w_in, counts)  # [n, h_in]
        act = swiglu(h) if self.kind == "swiglu" else activation(h, self.kind)
        return grouped_matmul(act, w_out, counts)  # [n, d_model]
