"""Every custom autograd function of moe_lib: the fast path's kernels, each with its backward.

Expert compute (rows sorted by expert, ``counts[e]`` contiguous rows for expert e):

- :func:`expert_mlp`: the whole FFN block by block on a CPU (:class:`ExpertMLP`), with optional
  per-expert biases;
- :func:`grouped_matmul`: one projection for all experts: ``torch._grouped_mm`` on a Hopper or
  Blackwell GPU in bfloat16, else one GEMM per expert into one buffer (:class:`SliceMatmul`),
  plus an optional per-expert bias;
- :func:`swiglu`: SwiGLU with a backward that writes both halves of ``d h`` into one buffer.

Data movement (the permutation of token copies, see :mod:`moe_lib.permute`):

- :func:`permute_rows`: ``xs = x[src]`` with a gather for its backward (:class:`PermuteRows`);
- :func:`unpermute_combine_rows`: ``y[t] = sum_j w[t, j] * out[pos[t, j]]``, every gradient a
  gather (:class:`UnpermuteCombine`).

Each backward is marked ``once_differentiable``: a first derivative works everywhere (also with
``create_graph=True``), and differentiating it again raises "trying to differentiate twice a
function that was marked with @once_differentiable". For second derivatives use
``MoE(dispatch="loop")``, which autograd differentiates as often as asked.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe_lib.activations import (
    ExpertActivation,
    activation,
    activation_backward,
    activation_from_saved,
    activation_spec,
)
from moe_lib.checks import check_positive_int, check_tensor

# --------------------------------------------------------------------------------------------
# Expert FFNs block by block (CPU)

BLOCK_BYTES = 1 << 23
"""Bytes of one block's first projection ``[rows, h_in]``: 8 MiB.

Measured with the dispatch benchmark's sizes on a 2-core CPU: blocks of 512 KiB made the GEMMs
too small (slower than the dense FFN at d_hidden 1024); 8 MiB was the fastest of 0.5, 2, 8 MiB
and whole experts."""


def block_rows(h_in: int, itemsize: int) -> int:
    """Rows per block: the block's ``[rows, h_in]`` first projection fits in
    :data:`BLOCK_BYTES`, and a block has at least 256 rows."""
    check_positive_int("h_in", h_in)
    check_positive_int("itemsize", itemsize)
    return max(256, BLOCK_BYTES // (h_in * itemsize))


def expert_blocks(counts: list[int], rows: int) -> Iterator[tuple[int, int, int]]:
    """``(expert, start, stop)`` of every block: contiguous rows of one expert, at most ``rows``.

    >>> list(expert_blocks([3, 0, 2], 2))
    [(0, 0, 2), (0, 2, 3), (2, 3, 5)]
    """
    check_positive_int("rows", rows)
    if not isinstance(counts, (list, tuple)) or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts
    ):
        raise TypeError(f"counts must be a list of ints >= 0, got {counts!r:.80}")
    start = 0
    for e, c in enumerate(counts):
        for s in range(start, start + c, rows):
            yield e, s, min(s + rows, start + c)
        start += c


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` in place (the ``out=`` form: FLOP counters see it, unlike ``addmm_``)."""
    torch.addmm(acc, a, b, out=acc)


def _mm_or_accumulate(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``acc = a @ b`` for an expert's first block (no zero fill, no read of ``acc``), then
    ``acc += a @ b``."""
    if first:
        torch.mm(a, b, out=acc)
    else:
        _accumulate_mm(acc, a, b)


def block_activation(h: Tensor, kind: str | ExpertActivation) -> Tensor:
    """An expert kind's activation of ``h: [rows, h_in]`` (``[gate | up]`` for the gated kinds),
    computed as the CPU block kernel computes it (:class:`ExpertMLP`): the values of
    :func:`moe_lib.activations.activation`, the gated kinds' gate half written into a buffer of
    its own, as the kernel does (same kernels, same bits)."""
    check_tensor("h", h, dims=2, kind="float")
    spec = activation_spec(kind)
    if spec.gated and h.shape[1] % 2:
        raise ValueError(f"h must have an even number of columns [gate | up] for "
                         f"kind={spec.kind!r}, got {h.shape[1]}")
    sb = h.new_empty(h.shape[0], h.shape[1] // 2) if spec.gated else None
    return activation(h, spec, sb)


def _mm(a: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``a @ w (+ bias)`` into a fresh block-sized tensor: ``mm``, or one ``addmm``."""
    return torch.mm(a, w) if bias is None else torch.addmm(bias, a, w)


def _mm_into(out: Tensor, a: Tensor, w: Tensor, bias: Tensor | None) -> None:
    """``out = a @ w (+ bias)``: with a bias, one ``addmm`` (the bias is broadcast into the
    block, which the GEMM accumulates onto; no second pass over the result); without, ``mm``."""
    if bias is None:
        torch.mm(a, w, out=out)
    else:
        torch.addmm(bias, a, w, out=out)


class ExpertMLP(torch.autograd.Function):
    """``out[rows of e] = act(x[rows of e] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``, block by
    block.

    ``x: [n, d_model]`` sorted by expert, ``w_in: [E, d_model, h_in]``, ``w_out: [E, d_hidden,
    d_model]``, ``b_in: [E, h_in]`` and ``b_out: [E, d_model]`` or None, ``counts[e]`` rows of
    expert e, ``spec`` an :class:`~moe_lib.activations.ExpertActivation` -> ``[n, d_model]``.

    A dense FFN runs layer by layer: the first GEMM writes ``h: [n, h_in]`` to a fresh full-size
    buffer, the activation reads it back and writes two more, the second GEMM reads them again,
    and the backward pass makes the same round trips through five more. On a CPU these passes,
    and the page faults of the fresh buffers, cost about as much as the GEMMs. Here each block of
    at most :func:`block_rows` rows goes through the whole FFN; its activation and, backward, its
    gradients are block-sized temporaries. Saves each block's ``h`` (and the gate's half for the
    gated kinds) as a block-sized tensor of its own (full-size buffers past the allocator's mmap
    threshold, 32 MiB with glibc, are returned to the system when freed and page-fault afresh
    at every step) and recomputes the activation in the backward: less memory than autograd,
    which keeps both. The weight gradients are written by each expert's first block and
    accumulated by the next ones: no zero fill.

    Backward, per block: ``d w_out[e] += act^T g``; ``d b_out[e] += sum_rows g``;
    ``d h = act'(g w_out[e]^T)``; ``d x = d h w_in[e]^T``; ``d w_in[e] += x^T d h``;
    ``d b_in[e] += sum_rows d h``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, counts: list[int], spec: ExpertActivation,
                rows: int) -> Tensor:
        out = x.new_empty(x.shape[0], w_out.shape[-1])  # [n, d_model]
        hs: list[Tensor] = []  # each block's h: [rows, h_in], saved
        ss: list[Tensor] = []  # each block's gate half (gated kinds): [rows, d_hidden], saved
        for e, a, b in expert_blocks(counts, rows):
            hb = _mm(x[a:b], w_in[e], None if b_in is None else b_in[e])
            sb = x.new_empty(b - a, w_out.shape[1]) if spec.gated else None
            act = activation(hb, spec, sb)
            _mm_into(out[a:b], act, w_out[e], None if b_out is None else b_out[e])
            hs.append(hb)
            if sb is not None:
                ss.append(sb)
        ctx.counts, ctx.spec, ctx.rows, ctx.num_blocks = counts, spec, rows, len(hs)
        ctx.save_for_backward(x, w_in, w_out, *hs, *ss)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out, *blocks = ctx.saved_tensors
        spec, counts, nb = ctx.spec, ctx.counts, ctx.num_blocks
        hs, ss = blocks[:nb], blocks[nb:] if spec.gated else [None] * nb
        need_x, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:5]
        need_h = need_x or need_w_in or need_b_in
        E = w_in.shape[0]
        grad_x = torch.empty_like(x) if need_x else None  # [n, d_model]
        # written by each expert's first block, accumulated by the next ones (zeroed if none)
        grad_w_in = torch.empty_like(w_in) if need_w_in else None  # [E, d_model, h_in]
        grad_w_out = torch.empty_like(w_out) if need_w_out else None  # [E, d_hidden, d_model]
        grad_b_in = w_in.new_zeros(E, w_in.shape[2]) if need_b_in else None  # [E, h_in]
        grad_b_out = w_out.new_zeros(E, w_out.shape[2]) if need_b_out else None  # [E, d_model]
        started = [False] * E
        for (e, a, b), hb, sb in zip(expert_blocks(counts, ctx.rows), hs, ss, strict=True):
            g, first = grad[a:b], not started[e]
            started[e] = True
            if need_w_out:
                _mm_or_accumulate(grad_w_out[e], activation_from_saved(hb, sb, spec).t(), g,
                                  first)
            if need_b_out:
                grad_b_out[e] += g.sum(0)  # [d_model]
            if not need_h:
                continue
            grad_h = activation_backward(g @ w_out[e].t(), hb, spec, sb)  # [rows, h_in]
            if need_x:
                torch.mm(grad_h, w_in[e].t(), out=grad_x[a:b])
            if need_w_in:
                _mm_or_accumulate(grad_w_in[e], x[a:b].t(), grad_h, first)
            if need_b_in:
                grad_b_in[e] += grad_h.sum(0)  # [h_in]
        for e in (e for e in range(E) if not started[e]):  # experts without rows
            for gw in (grad_w_in, grad_w_out):
                if gw is not None:
                    gw[e].zero_()
        return grad_x, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None


def _check_counts(counts: object, num_experts: int, num_rows: int) -> list[int]:
    """``counts``: a list of ``num_experts`` ints >= 0 summing to ``num_rows``."""
    if not isinstance(counts, (list, tuple)) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        raise TypeError(f"counts must be a list of ints, got {counts!r:.80}")
    if len(counts) != num_experts or sum(counts) != num_rows or min(counts, default=0) < 0:
        raise ValueError(
            f"counts must hold E={num_experts} non-negative row counts summing to "
            f"x.shape[0]={num_rows}, got {len(counts)} counts summing to {sum(counts)}"
        )
    return list(counts)


def _check_expert_weights(x: Tensor, w_in: Tensor, w_out: Tensor) -> None:
    check_tensor("x", x, dims=2, kind="float")
    check_tensor("w_in", w_in, dims=3, kind="float", shape=(None, x.shape[1], None),
                 device=x.device)
    check_tensor("w_out", w_out, dims=3, kind="float", shape=(w_in.shape[0], None, x.shape[1]),
                 device=x.device)
    if w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        raise TypeError(f"w_in and w_out must have x's dtype {x.dtype}, got {w_in.dtype} and "
                        f"{w_out.dtype}")


def _check_bias(name: str, bias: Tensor | None, x: Tensor, shape: tuple[int, int]) -> None:
    """``bias``: None, or ``[E, width]`` with x's dtype and device."""
    if bias is None:
        return
    check_tensor(name, bias, dims=2, kind="float", shape=shape, device=x.device)
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {bias.dtype}")


def expert_mlp(x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int],
               kind: str | ExpertActivation, max_block_rows: int | None = None, *,
               b_in: Tensor | None = None, b_out: Tensor | None = None) -> Tensor:
    """Every expert's FFN on its contiguous rows: ``x: [n, d_model] -> [n, d_model]``.

    ``out[rows of e] = act(x[rows of e] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` with
    ``w_in: [E, d_model, h_in]``, ``w_out: [E, d_hidden, d_model]``, ``b_in: [E, h_in]``,
    ``b_out: [E, d_model]`` (each bias optional) in ``x``'s dtype, ``counts[e]`` rows for expert
    e (``sum(counts) == n``), ``kind`` "relu" | "gelu" | "swiglu" | "clamped_swiglu" or an
    :class:`~moe_lib.activations.ExpertActivation`. ``max_block_rows``: rows per block (default
    :func:`block_rows`; smaller in tests, to cross block boundaries with few rows).
    """
    spec = activation_spec(kind)
    _check_expert_weights(x, w_in, w_out)
    h_in = 2 * w_out.shape[1] if spec.gated else w_out.shape[1]
    if w_in.shape[-1] != h_in:
        raise ValueError(f"w_in must have {h_in} columns for kind={spec.kind!r} and "
                         f"w_out {tuple(w_out.shape)}, got {tuple(w_in.shape)}")
    _check_bias("b_in", b_in, x, (w_in.shape[0], h_in))
    _check_bias("b_out", b_out, x, (w_in.shape[0], x.shape[1]))
    counts = _check_counts(counts, w_in.shape[0], x.shape[0])
    if max_block_rows is None:
        max_block_rows = block_rows(h_in, x.element_size())
    check_positive_int("max_block_rows", max_block_rows)
    return ExpertMLP.apply(x, w_in, w_out, b_in, b_out, counts, spec, max_block_rows)


# --------------------------------------------------------------------------------------------
# Grouped GEMM and SwiGLU (GPU, and under torch.compile)


class SliceMatmul(torch.autograd.Function):
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
    @once_differentiable
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


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether :func:`grouped_matmul` uses ``torch._grouped_mm``: bfloat16 on a Hopper or
    Blackwell GPU only.

    There it is one CUTLASS kernel for all experts. Elsewhere (other dtypes, other GPUs, CPUs)
    torch falls back to a loop of one GEMM per group, as :class:`SliceMatmul` does, and on a CPU
    it was measured no faster (``python -m moe_lib.bench.dispatch``). Probed once per device.
    """
    check_tensor("x", x, kind="float")
    check_tensor("w", w, kind="float")
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


def grouped_matmul(x: Tensor, w: Tensor, counts: list[int], bias: Tensor | None = None
                   ) -> Tensor:
    """``x: [n, K]`` rows grouped by expert (``counts[e]`` rows each), ``w: [E, K, N] -> [n, N]``;
    with ``bias: [E, N]``, expert e's bias is added to its rows.

    In bfloat16 on a Hopper/Blackwell GPU, one ``torch._grouped_mm`` call (one kernel for all
    experts); otherwise, and always on a CPU, one GEMM per expert on its contiguous slice.
    """
    check_tensor("x", x, dims=2, kind="float")
    check_tensor("w", w, dims=3, kind="float", shape=(None, x.shape[1], None), device=x.device)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    _check_bias("bias", bias, x, (w.shape[0], w.shape[2]))
    counts = _check_counts(counts, w.shape[0], x.shape[0])
    out = _grouped_mm_or_slices(x, w, counts)
    if bias is None:
        return out
    return out + _rows_of_experts(bias, counts)


def _grouped_mm_or_slices(x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    if x.shape[0] > 0 and grouped_mm_available(x, w):
        try:
            ends = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # [E]
            offs = ends.to(x.device, non_blocking=True)
            return torch._grouped_mm(x, w, offs=offs)
        except RuntimeError:  # a shape or alignment the kernel refuses: fall through
            pass
    return SliceMatmul.apply(x, w, counts)


def _rows_of_experts(bias: Tensor, counts: list[int]) -> Tensor:
    """``bias: [E, N] -> [n, N]``, row ``e`` repeated ``counts[e]`` times (autograd sums the rows'
    gradients back per expert)."""
    repeats = torch.tensor(counts, device=bias.device)
    return bias.repeat_interleave(repeats, dim=0, output_size=sum(counts))


class SwiGLU(torch.autograd.Function):
    """``h = [gate | up]: [n, 2h] -> silu(gate) * up: [n, h]``, the values of
    :func:`moe_lib.activations.activation`, with :func:`moe_lib.activations.activation_backward`
    as its backward (both halves of ``d h`` written into one ``[n, 2h]`` buffer). Saves ``h`` and
    ``silu(gate)``, as autograd does.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        s = h.new_empty(h.shape[0], h.shape[1] // 2)
        act = activation(h, "swiglu", silu_gate_out=s)
        ctx.save_for_backward(h, s)
        return act

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        h, s = ctx.saved_tensors
        if torch.compiler.is_compiling():  # no out= into strided views; the compiler fuses this
            gate, up = h.chunk(2, dim=-1)
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return torch.cat([d_gate, grad * s], dim=-1)
        return activation_backward(grad, h, "swiglu", s)  # [n, 2h]


def swiglu(h: Tensor) -> Tensor:
    """SwiGLU of ``h = [gate | up]: [n, 2 * d_hidden] -> [n, d_hidden]`` (see :class:`SwiGLU`)."""
    check_tensor("h", h, dims=2, kind="float")
    if h.shape[1] % 2:
        raise ValueError(f"h must have an even number of columns [gate | up], got {h.shape[1]}")
    return SwiGLU.apply(h)


# --------------------------------------------------------------------------------------------
# Permutations of token copies (gathers forward and backward)


def gather_sum(rows: Tensor, pos: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_j w[t, j] * rows[pos[t, j]]``: ``rows: [n, d], pos: [T, k] -> [T, d]``.

    One fused gather-and-sum kernel (``embedding_bag``: each token is a "bag" of k rows), no
    ``[T, k, d]`` intermediate; on a CPU 2-3x faster than an ``index_select`` then a sum.
    ``weights: [T, k]`` or None (all ones).
    """
    check_tensor("rows", rows, dims=2, kind="float")
    check_tensor("pos", pos, dims=2, kind="int", device=rows.device)
    if weights is not None:
        check_tensor("weights", weights, kind="float", shape=tuple(pos.shape), device=rows.device)
    return F.embedding_bag(pos, rows, mode="sum", per_sample_weights=weights)


def _pad_zero_row(rows: Tensor) -> Tensor:
    """``[n, d] -> [n + 1, d]``: a zero row at index ``n`` for the dropped copies to read."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])


class PermuteRows(torch.autograd.Function):
    """``xs[p] = x[src[p]]``, differentiated with a gather: ``dx[t] = sum_j dxs[pos[t, j]]``.

    Autograd would differentiate ``x[src]`` with a scatter-add (``index_put_(accumulate=True)``),
    which needs atomic adds where copies of one token meet; a gather writes each row once.
    ``pos[t, j] == n`` (one past the last row) marks a dropped copy: it reads a zero row.
    """

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, pos: Tensor) -> Tensor:
        ctx.save_for_backward(pos)
        ctx.has_dropped = src.shape[0] < pos.numel()
        return x.index_select(0, src)  # [n, d]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xs: Tensor) -> tuple[Tensor, None, None]:
        (pos,) = ctx.saved_tensors
        if ctx.has_dropped:
            grad_xs = _pad_zero_row(grad_xs)
        return gather_sum(grad_xs, pos), None, None


class UnpermuteCombine(torch.autograd.Function):
    """``y[t] = sum_j w[t, j] * out[pos[t, j]]``; every gradient is a gather:

    ``d out[p] = w_p * dy[src[p]]`` (``w_p`` the weight of the copy at sorted row ``p``:
    ``w.flatten()[order[p]]``) and ``d w[t, j] = dy[t] . out[pos[t, j]]``. Saves ``out``.
    """

    @staticmethod
    def forward(ctx, out: Tensor, weights: Tensor, src: Tensor, pos: Tensor, order: Tensor
                ) -> Tensor:
        ctx.save_for_backward(out, weights, src, pos, order)
        if src.shape[0] < pos.numel():
            out = _pad_zero_row(out)
        return gather_sum(out, pos, weights)  # [T, d]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        out, weights, src, pos, order = ctx.saved_tensors
        n = src.shape[0]
        grad_out = grad_w = None
        dy_rows = grad_y.index_select(0, src)  # [n, d]: dy of the token of each sorted row
        if ctx.needs_input_grad[1]:
            dw_sorted = torch.linalg.vecdot(dy_rows, out)  # [n]: a dot product per sorted row
            if n < pos.numel():
                dw_sorted = torch.cat([dw_sorted, dw_sorted.new_zeros(1)])
            grad_w = dw_sorted.index_select(0, pos.reshape(-1)).view_as(weights)  # [T, k]
        if ctx.needs_input_grad[0]:
            w_sorted = weights.reshape(-1).index_select(0, order[:n])  # [n]
            grad_out = dy_rows.mul_(w_sorted.unsqueeze(1))
        return grad_out, grad_w, None, None, None


def permute_rows(x: Tensor, src: Tensor, pos: Tensor) -> Tensor:
    """``x: [T, d] -> xs: [n, d]`` with ``xs[p] = x[src[p]]`` (see :class:`PermuteRows`).

    ``src: [n]`` int64 token of each sorted row; ``pos: [T, k]`` int64 sorted row of each copy.
    """
    check_tensor("x", x, dims=2, kind="float")
    check_tensor("src", src, dims=1, kind="int", device=x.device)
    check_tensor("pos", pos, dims=2, kind="int", shape=(x.shape[0], None), device=x.device)
    return PermuteRows.apply(x, src, pos)


def unpermute_combine_rows(out: Tensor, weights: Tensor, src: Tensor, pos: Tensor,
                           order: Tensor) -> Tensor:
    """``out: [n, d], weights: [T, k] -> y: [T, d]`` (see :class:`UnpermuteCombine`).

    ``order: [T * k]`` flat copy index of each sorted row (dropped copies last).
    """
    check_tensor("out", out, dims=2, kind="float")
    check_tensor("weights", weights, dims=2, kind="float", device=out.device)
    check_tensor("src", src, dims=1, kind="int", shape=(out.shape[0],), device=out.device)
    check_tensor("pos", pos, dims=2, kind="int", shape=tuple(weights.shape), device=out.device)
    check_tensor("order", order, dims=1, kind="int", shape=(pos.numel(),), device=out.device)
    return UnpermuteCombine.apply(out, weights, src, pos, order)
