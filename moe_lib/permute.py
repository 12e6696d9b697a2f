"""Permutations of token copies with hand-written backward passes (the fast path's data movement).

Top-k routing makes ``k`` copies of each of ``T`` tokens. The fast dispatch sorts the ``T * k``
copies by expert, so that each expert reads one contiguous slice, and puts the results back.
In index notation, with ``pos[t, j]`` the position of copy ``(t, j)`` in sorted order and
``src[p]`` the token of the copy at sorted position ``p``:

- permute: ``xs[p] = x[src[p]]`` (a gather), whose gradient is
  ``dx[t] = sum_j dxs[pos[t, j]]`` (a gather with the inverse permutation, then a sum over k);
- unpermute-and-combine: ``y[t] = sum_j w[t, j] * out[pos[t, j]]`` (one fused gather-and-sum,
  ``embedding_bag``), whose gradients are ``dout[p] = w_p * dy[src[p]]`` (``w_p`` the weight of
  the copy at row ``p``) and ``dw[t, j] = dy[t] . out[pos[t, j]]``.

Autograd would differentiate ``x[src]`` with an ``index_put_(accumulate=True)``: a scatter-add,
in which threads adding into the same row need atomic adds (on a CPU, a compare-and-swap loop per
number for float32 and a single thread for other dtypes). The backward passes here are gathers
instead: each output row is written once, so they need no atomics and split across threads.
A gather followed by a sum over the k copies is one ``embedding_bag`` call (each token is a "bag"
of its k rows), with the gate weights as its per-sample weights in the combine; on a CPU it is
2-3x faster than an ``index_select`` followed by a sum or a ``[T, 1, k] @ [T, k, d]`` ``bmm``.

Dropped copies (capacity) have no sorted row: their ``pos`` points one past the last kept row,
at a zero row that is appended only when something was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Permutation:
    """Where each token copy goes in expert-sorted order.

    ``T`` tokens, ``k`` copies each, ``n`` kept copies (``n == T * k`` when nothing was dropped):

    - ``src: [n]`` the token each sorted row reads (``order[:n] // k``);
    - ``pos: [T, k]`` the sorted row of copy ``(t, j)``; ``n`` for a dropped copy;
    - ``order: [T * k]`` flat copy index of each sorted row (dropped copies last);
    - ``counts``: kept rows per expert, a Python list (it sets the slice sizes).
    """

    src: Tensor
    pos: Tensor
    order: Tensor
    counts: list[int]

    @property
    def num_kept(self) -> int:
        return self.src.shape[0]

    @property
    def has_dropped(self) -> bool:
        return self.num_kept < self.pos.numel()


def _pad_zero_row(rows: Tensor) -> Tensor:
    """``[n, d] -> [n + 1, d]``: a zero row at index ``n`` for the dropped copies to read."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])


def gather_sum(rows: Tensor, pos: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_j w[t, j] * rows[pos[t, j]]``: ``rows: [n, d], pos: [T, k] -> [T, d]``.

    One fused gather-and-sum kernel (``embedding_bag``: each token is a "bag" of k rows); no
    ``[T, k, d]`` intermediate. ``weights: [T, k]`` or None (all ones).
    """
    return F.embedding_bag(pos, rows, mode="sum", per_sample_weights=weights)


class _Permute(torch.autograd.Function):
    """``xs = x[src]``, differentiated with a gather: ``dx[t] = sum_j dxs[pos[t, j]]``."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Permutation) -> Tensor:
        ctx.perm = perm
        return x.index_select(0, perm.src)  # [n, d]

    @staticmethod
    def backward(ctx, grad_xs: Tensor) -> tuple[Tensor, None]:
        perm: Permutation = ctx.perm
        if perm.has_dropped:
            grad_xs = _pad_zero_row(grad_xs)
        return gather_sum(grad_xs, perm.pos), None


class _UnpermuteCombine(torch.autograd.Function):
    """``y[t] = sum_j w[t, j] * out[pos[t, j]]``; every gradient is a gather.

    Saves ``out`` (sorted order) for the gradient of the weights.
    """

    @staticmethod
    def forward(ctx, out: Tensor, weights: Tensor, perm: Permutation) -> Tensor:
        ctx.perm = perm
        ctx.save_for_backward(out, weights)
        if perm.has_dropped:
            out = _pad_zero_row(out)
        return gather_sum(out, perm.pos, weights)  # [T, d]

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        perm: Permutation = ctx.perm
        out, weights = ctx.saved_tensors
        grad_out = grad_w = None
        dy_rows = grad_y.index_select(0, perm.src)  # [n, d]: dy of the token of each sorted row
        if ctx.needs_input_grad[1]:
            # dw[t, j] = dy[t] . out[pos[t, j]]: a dot product per sorted row, then unpermuted
            dw_sorted = torch.linalg.vecdot(dy_rows, out)  # [n]
            if perm.has_dropped:
                dw_sorted = torch.cat([dw_sorted, dw_sorted.new_zeros(1)])
            grad_w = dw_sorted.index_select(0, perm.pos.reshape(-1)).view_as(weights)  # [T, k]
        if ctx.needs_input_grad[0]:
            # dout[p] = w_p * dy[src[p]], w_p the gate weight of the copy at sorted row p
            w_sorted = weights.reshape(-1).index_select(0, perm.order[: perm.num_kept])  # [n]
            grad_out = dy_rows.mul_(w_sorted.unsqueeze(1))
        return grad_out, grad_w, None


def make_permutation(order: Tensor, inverse: Tensor, counts: list[int], k: int) -> Permutation:
    """Build a :class:`Permutation` from a sort of the ``T * k`` copies by expert.

    ``order: [T*k]`` sorted copy indices (kept copies grouped by expert, dropped ones last),
    ``inverse: [T*k]`` its inverse permutation, ``counts[e]`` kept copies of expert e.
    """
    n = sum(counts)
    pos = inverse.view(-1, k)  # [T, k]
    if n < inverse.numel():
        pos = pos.clamp(max=n)  # every dropped copy reads the zero row n
    src = order[:n] // k if k > 1 else order[:n]  # [n]
    return Permutation(src=src, pos=pos, order=order, counts=counts)


def permute(x: Tensor, perm: Permutation) -> Tensor:
    """Token rows in expert-sorted order: ``x: [T, d] -> [n, d]`` with ``xs[p] = x[src[p]]``."""
    return _Permute.apply(x, perm)


def unpermute_combine(out: Tensor, weights: Tensor, perm: Permutation) -> Tensor:
    """Back to token order and mixed by the gate weights: ``[n, d], [T, k] -> [T, d]``."""
    return _UnpermuteCombine.apply(out, weights, perm)
