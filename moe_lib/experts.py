"""Expert feed-forward networks: ReLU, GELU and SwiGLU, one expert or a bank of E experts.

Weights are cast to the input's dtype in the forward (a no-op when they already match), so a
float32 layer accepts bfloat16 tokens and returns bfloat16. A bank stores the weights of all E
experts stacked (``w_in: [E, d_model, h_in]``, ``w_out: [E, d_hidden, d_model]``) so that a
grouped GEMM can read them in one call: the fast path (:meth:`ExpertBank.forward_slices`,
:func:`grouped_matmul`) writes the gradient of all E experts into one ``[E, ...]`` buffer, where
indexing ``w_in[e]`` in a Python loop would make the backward pass build a full-size gradient
for every expert it indexes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.checks import check_choice, check_positive_int
from moe_lib.fused_experts import expert_mlp, swiglu_backward

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
    """One dense FFN ``x: [n, d_model] -> [n, d_model]``: the dense baseline and bound for MoE."""

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
        """Every expert on every token: ``x: [n, d_model] -> [E, n, d_model]`` (dense gating)."""
        h = torch.matmul(x.unsqueeze(0), self.w_in.to(x.dtype))  # [E, n, h_in]
        return torch.matmul(expert_activation(h, self.kind), self.w_out.to(x.dtype))  # [E, n, d]

    def forward_slices(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on its contiguous slice of rows.

        ``x_sorted: [n, d_model]`` holds the rows for expert 0, then expert 1, ...;
        ``counts[e]`` rows each (``sum(counts) == n``). Returns ``[n, d_model]`` in the same order.

        Chosen per device by measurement (``bench/dispatch.py``):

        - CPU, eager: :func:`moe_lib.fused_experts.expert_mlp` runs the whole FFN block by block
          (GEMM, activation, GEMM on each block of an expert's rows), which saves the full-size
          round trips of the activation and its gradients;
        - GPU, or under ``torch.compile``: each projection is one grouped GEMM
          (:func:`grouped_matmul`: one ``torch._grouped_mm`` kernel in bfloat16 on Hopper or
          Blackwell) that writes every expert's rows into one buffer, and the non-linearity runs
          once over all ``n`` rows. SwiGLU's backward writes the gate and up gradients straight
          into one ``[n, 2 * d_hidden]`` buffer (:class:`_SwiGLU`).
        """
        dtype = x_sorted.dtype
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        if x_sorted.device.type == "cpu" and not torch.compiler.is_compiling():
            return expert_mlp(x_sorted, w_in, w_out, counts, self.kind)
        h = grouped_matmul(x_sorted, w_in, counts)  # [n, h_in]
        act = _SwiGLU.apply(h) if self.kind == "swiglu" else expert_activation(h, self.kind)
        return grouped_matmul(act, w_out, counts)  # [n, d_model]


class _SwiGLU(torch.autograd.Function):
    """``[gate | up]: [n, 2h] -> silu(gate) * up: [n, h]``, the same values as
    :func:`expert_activation`, with a backward that writes both halves of the gradient into one
    ``[n, 2h]`` buffer (autograd's ``chunk`` backward concatenates them: one more full pass).

    d up = g * silu(gate); d gate = g * up * silu'(gate). Saves ``h`` and ``silu(gate)``, as
    autograd does.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(h, s)
        return s * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        h, s = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # no out= into strided views; the compiler fuses this
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return torch.cat([d_gate, grad * s], dim=-1)
        return swiglu_backward(grad, h, s)  # [n, 2h]


class _SliceMatmul(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e]``, one ``torch.mm`` per expert into one buffer.

    Backward: ``dx[rows of e] = dout[rows of e] @ w[e]^T`` and ``dw[e] = x[rows of e]^T @ dout[rows
    of e]``, each written in place into ``[n, K]`` and ``[E, K, N]`` buffers (zero for an expert
    with no rows): no per-expert gradient is stacked or concatenated afterwards.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[-1])  # [n, N]
        for e, (xe, oe) in enumerate(zip(x.split(counts), out.split(counts), strict=True)):
            if xe.shape[0]:
                torch.mm(xe, w[e], out=oe)
        ctx.counts = counts
        ctx.save_for_backward(x, w)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = x.new_empty(x.shape) if need_x else None  # [n, K]
        grad_w = w.new_empty(w.shape) if need_w else None  # [E, K, N]
        counts = ctx.counts
        gx_slices = grad_x.split(counts) if need_x else [None] * len(counts)
        rows = zip(x.split(counts), grad.split(counts), gx_slices, strict=True)
        for e, (xe, ge, gxe) in enumerate(rows):  # both products of an expert while it is hot
            if need_x and xe.shape[0]:
                torch.mm(ge, w[e].t(), out=gxe)
            if need_w:
                if xe.shape[0]:
                    torch.mm(xe.t(), ge, out=grad_w[e])
                else:
                    grad_w[e].zero_()
        return grad_x, grad_w, None


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(x: Tensor, w: Tensor) -> bool:
    """Whether to use ``torch._grouped_mm``: bfloat16 on a Hopper or Blackwell GPU only.

    There it is one CUTLASS kernel for all experts. Elsewhere (other dtypes, other GPUs, CPUs)
    torch falls back to a loop of one GEMM per group, as :class:`_SliceMatmul` does, and on a CPU
    it was measured no faster (``bench/dispatch.py``). Probed once per device, then cached.
    """
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or w.dtype != x.dtype:
        return False
    if not hasattr(torch, "_grouped_mm"):
        return False
    key = (str(x.device), x.dtype)
    if key not in _GROUPED_MM_OK:
        ok = torch.cuda.get_device_capability(x.device)[0] in (9, 10)
        if ok:
            try:  # the kernel may be missing from this build
                a = torch.zeros(32, 16, device=x.device, dtype=x.dtype)
                b = torch.zeros(2, 16, 16, device=x.device, dtype=x.dtype)
                offs = torch.tensor([16, 32], device=x.device, dtype=torch.int32)
                torch._grouped_mm(a, b, offs=offs)
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def grouped_matmul(x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``x: [n, K]`` rows grouped by expert (``counts[e]`` rows each), ``w: [E, K, N] -> [n, N]``.

    In bfloat16 on a Hopper/Blackwell GPU, one ``torch._grouped_mm`` call (one kernel for all
    experts); otherwise, and always on a CPU, one GEMM per expert on its contiguous slice.
    """
    if x.shape[0] > 0 and _grouped_mm_works(x, w):
        try:
            ends = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # [E]
            offs = ends.to(x.device, non_blocking=True)
            return torch._grouped_mm(x, w, offs=offs)
        except RuntimeError:  # a shape or alignment the kernel refuses: fall through
            pass
    return _SliceMatmul.apply(x, w, counts)
