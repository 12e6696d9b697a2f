"""All E expert FFNs on expert-sorted rows, a block of rows at a time (the CPU fast path).

A dense FFN runs layer by layer: the first GEMM writes ``h: [n, h_in]`` to a fresh full-size
buffer, the activation reads it back and writes two more, the second GEMM reads them again; the
backward pass makes the same round trips with the gradients, through five more full-size buffers.
On a CPU these passes, and the page faults of the fresh buffers, cost about as much as the GEMMs.

:class:`_ExpertMLP` instead walks the sorted rows expert by expert, in blocks of at most
:func:`block_rows` rows, and runs the whole FFN on each block: ``x_b @ w_in[e] -> activation ->
@ w_out[e]``. The block's activation and, in the backward pass, its gradients (``[rows, h]``,
``[rows, h_in]``) are temporaries that the allocator hands back block after block; only ``h``,
``silu(gate)``, the output, the input gradient and the weight gradients are full-size buffers.

It saves ``h`` (and ``silu(gate)`` for SwiGLU) and recomputes the activation in the backward,
block by block, instead of keeping it: less memory than autograd, which keeps both.
The values are those of :func:`moe_lib.experts.expert_activation` between the two GEMMs, up to
the order of float additions in the weight gradients.

Block size, measured with ``bench/dispatch.py``'s sizes on a 2-core CPU: blocks of 512 KiB made the
GEMMs too small (slower than the dense FFN at d_hidden 1024); 8 MiB blocks were the fastest
of 0.5, 2, 8 MiB and whole experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lib.checks import check_choice

_silu_out = torch.ops.aten.silu.out
_silu_backward = torch.ops.aten.silu_backward.grad_input
_gelu_backward = torch.ops.aten.gelu_backward.grad_input
_BLOCK_BYTES = 1 << 23  # the first projection of one block: 8 MiB


def block_rows(h_in: int, itemsize: int) -> int:
    """Rows per block: the block's ``[rows, h_in]`` first projection fits in 8 MiB, >= 256 rows."""
    return max(256, _BLOCK_BYTES // (h_in * itemsize))


def _blocks(counts: list[int], rows: int):
    """``(expert, start, stop)`` of every block: contiguous rows of one expert, at most ``rows``."""
    start = 0
    for e, c in enumerate(counts):
        for s in range(start, start + c, rows):
            yield e, s, min(s + rows, start + c)
        start += c


def _act_forward(h: Tensor, kind: str, s_out: Tensor | None) -> Tensor:
    """The block's activation from ``h: [rows, h_in]``; for SwiGLU also writes silu(gate) to
    ``s_out: [rows, d_hidden]`` (saved for the backward)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        _silu_out(gate, out=s_out)
        return s_out * up
    return F.relu(h) if kind == "relu" else F.gelu(h)


def swiglu_backward(grad_act: Tensor, h: Tensor, s: Tensor) -> Tensor:
    """SwiGLU's ``d h: [n, 2h]`` from ``d act: [n, h]``, ``h = [gate | up]``, ``s = silu(gate)``.

    ``d up = g * s``, ``d gate = g * up * silu'(gate)``, both written into one ``[n, 2h]`` buffer
    (autograd's ``chunk`` backward would concatenate them: one more full pass).
    """
    gate, up = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)  # views: written in place
    torch.mul(grad_act, s, out=grad_up)
    torch.mul(grad_act, up, out=grad_gate)
    _silu_backward(grad_gate, gate, grad_input=grad_gate)
    return grad_h


def _act_backward(grad_act: Tensor, h: Tensor, s: Tensor | None, kind: str) -> Tensor:
    """``d h: [rows, h_in]`` from ``d act: [rows, d_hidden]``."""
    if kind == "relu":
        return grad_act * (h > 0)
    if kind == "gelu":
        return _gelu_backward(grad_act, h, grad_input=torch.empty_like(h))
    return swiglu_backward(grad_act, h, s)


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` in place (the ``out=`` form: FLOP counters see it, unlike ``addmm_``)."""
    torch.addmm(acc, a, b, out=acc)


class _ExpertMLP(torch.autograd.Function):
    """``out[rows of e] = act(x[rows of e] @ w_in[e]) @ w_out[e]``, block by block.

    ``x: [n, d_model]`` sorted by expert, ``w_in: [E, d_model, h_in]``, ``w_out: [E, d_hidden,
    d_model]``, ``counts[e]`` rows of expert e -> ``[n, d_model]``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], kind: str
                ) -> Tensor:
        n, h_in = x.shape[0], w_in.shape[-1]
        h = x.new_empty(n, h_in)  # saved
        s = x.new_empty(n, w_out.shape[1]) if kind == "swiglu" else None  # silu(gate), saved
        out = x.new_empty(n, w_out.shape[-1])
        for e, a, b in _blocks(counts, block_rows(h_in, x.element_size())):
            torch.mm(x[a:b], w_in[e], out=h[a:b])
            act = _act_forward(h[a:b], kind, None if s is None else s[a:b])
            torch.mm(act, w_out[e], out=out[a:b])
        ctx.counts, ctx.kind = counts, kind
        ctx.save_for_backward(x, w_in, w_out, h, s)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out, h, s = ctx.saved_tensors
        kind, counts = ctx.kind, ctx.counts
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None  # [n, d_model]
        grad_w_in = torch.zeros_like(w_in) if need_w_in else None  # [E, d_model, h_in]
        grad_w_out = torch.zeros_like(w_out) if need_w_out else None  # [E, d_hidden, d_model]
        for e, a, b in _blocks(counts, block_rows(h.shape[-1], h.element_size())):
            g, hb = grad[a:b], h[a:b]
            sb = None if s is None else s[a:b]
            if need_w_out:
                if kind == "swiglu":
                    act = sb * hb.chunk(2, dim=-1)[1]
                else:
                    act = _act_forward(hb, kind, None)
                _accumulate_mm(grad_w_out[e], act.t(), g)
            if not (need_x or need_w_in):
                continue
            grad_h = _act_backward(g @ w_out[e].t(), hb, sb, kind)  # [rows, h_in]
            if need_x:
                torch.mm(grad_h, w_in[e].t(), out=grad_x[a:b])
            if need_w_in:
                _accumulate_mm(grad_w_in[e], x[a:b].t(), grad_h)
        return grad_x, grad_w_in, grad_w_out, None, None


def expert_mlp(x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], kind: str) -> Tensor:
    """Every expert's FFN on its contiguous rows: ``x: [n, d_model] -> [n, d_model]``.

    ``w_in: [E, d_model, h_in]``, ``w_out: [E, d_hidden, d_model]`` in ``x``'s dtype,
    ``counts[e]`` rows for expert e (``sum(counts) == n``), ``kind`` "relu" | "gelu" | "swiglu".
    """
    check_choice("kind", kind, ("relu", "gelu", "swiglu"))
    if len(counts) != w_in.shape[0] or sum(counts) != x.shape[0] or min(counts, default=0) < 0:
        raise ValueError(
            f"counts must hold E={w_in.shape[0]} non-negative row counts summing to "
            f"x.shape[0]={x.shape[0]}, got {len(counts)} counts summing to {sum(counts)}"
        )
    return _ExpertMLP.apply(x, w_in, w_out, counts, kind)
