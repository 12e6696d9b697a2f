"""MoE at inference: which experts a batch touches, expert caches, weight-only int8 experts.

An MoE layer must hold all E experts, but a decode step reads only the experts its tokens
chose. Under uniform routing, a batch of B tokens with top-k routing touches on average

    n(B) = E (1 - (1 - k/E)^B)                                     (:func:`expected_touched`)

experts (each expert is missed by one token with probability 1 - k/E); with the measured share
f_e of tokens that choose expert e (sum_e f_e = k) and tokens chosen independently,
n(B) = sum_e 1 - (1 - f_e)^B (:func:`expected_touched_from_shares`). :func:`touched_per_batch`
measures it on routing traces ``expert_ids: [T, k]``.

When the experts do not fit in fast memory, a cache holds ``capacity`` of the E experts of a
layer and the others are loaded on a miss (offloading). :func:`simulate_expert_cache` replays a
trace through such a cache under three policies: "lru" (evict the least recently used),
"lfu" (the least often used so far; ties: least recently used) and "belady" (evict the expert
whose next use is furthest away: the best any policy can do, which needs the future, so it is a
bound, not a policy to deploy).

Weight-only int8 (:func:`quantize_int8`, :class:`Int8ExpertBank`): each output column of each
expert projection gets a scale s = max |w| / 127 over its inputs, and q = round(w / s) in
[-127, 127]; the layer computes with w ~ q s. 1 byte per weight instead of 4 (float32) or 2
(bfloat16), plus one float32 scale per column.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lib.checks import (
    check_choice,
    check_int,
    check_int_range,
    check_positive_int,
    check_tensor,
    check_type,
)
from moe_lib.experts import ExpertBank

CACHE_POLICIES = ("lru", "lfu", "belady")
BATCH_MODES = ("consecutive", "random")


# --------------------------------------------------------------------------------------------
# Experts touched by a batch


def expected_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Experts a batch of ``batch`` tokens touches on average under uniform top-k routing:
    ``E (1 - (1 - k/E)^B)``."""
    check_positive_int("num_experts", num_experts)
    check_int_range("top_k", top_k, 1, num_experts)
    check_int("batch", batch, low=0)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def expected_touched_from_shares(shares: Tensor, batch: int) -> float:
    """``sum_e 1 - (1 - f_e)^B``: experts touched on average by B independent tokens when a token
    chooses expert e with probability ``f_e`` (``shares: [E]``, each in [0, 1], summing to k;
    uniform f_e = k/E gives :func:`expected_touched`)."""
    check_tensor("shares", shares, dims=1, kind="float")
    check_int("batch", batch, low=0)
    if shares.numel() and (float(shares.min()) < 0 or float(shares.max()) > 1):
        raise ValueError(f"shares must be probabilities in [0, 1], got values in "
                         f"[{float(shares.min()):.3g}, {float(shares.max()):.3g}]")
    return float((1.0 - (1.0 - shares.double()) ** batch).sum())


def choice_shares(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``f_e``: the share of the T tokens of ``expert_ids: [T, k]`` that chose expert e
    (``[E]`` float64, summing to k)."""
    _check_ids(expert_ids, num_experts)
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=num_experts)
    return counts.double() / max(expert_ids.shape[0], 1)


def _check_ids(expert_ids: object, num_experts: int) -> None:
    check_positive_int("num_experts", num_experts)
    check_tensor("expert_ids", expert_ids, dims=2, kind="int")
    if expert_ids.numel():
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_ids must be in [0, {num_experts - 1}], got values in "
                             f"[{low}, {high}]")


def touched_per_batch(expert_ids: Tensor, num_experts: int, batch: int,
                      mode: str = "consecutive", samples: int = 256,
                      generator: torch.Generator | None = None) -> Tensor:
    """Distinct experts touched by batches of ``batch`` tokens of a trace ``expert_ids: [T, k]``.

    ``mode="consecutive"``: the trace cut into ``T // batch`` batches of consecutive tokens (one
    sequence's tokens, as in a prefill chunk); ``"random"``: ``samples`` batches of ``batch``
    distinct tokens drawn at random positions (``generator`` seeds them), as a decode batch of
    unrelated sequences. Returns ``[batches]`` float64 counts.
    """
    _check_ids(expert_ids, num_experts)
    check_positive_int("batch", batch)
    check_choice("mode", mode, BATCH_MODES)
    check_positive_int("samples", samples)
    if generator is not None:
        check_type("generator", generator, torch.Generator)
    T = expert_ids.shape[0]
    if batch > T:
        raise ValueError(f"batch must be <= the {T} tokens of the trace, got {batch}")
    ids = expert_ids.long().cpu()
    if mode == "consecutive":
        groups = ids[: (T // batch) * batch].view(T // batch, -1)  # [batches, B * k]
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        picks = torch.stack([torch.randperm(T, generator=gen)[:batch] for _ in range(samples)])
        groups = ids[picks].view(samples, -1)  # [samples, B * k]
    hit = torch.zeros(groups.shape[0], num_experts, dtype=torch.bool)
    hit.scatter_(1, groups, True)
    return hit.sum(1).double()


# --------------------------------------------------------------------------------------------
# Expert caches


@dataclass(frozen=True)
class CacheResult:
    """A trace replayed through an expert cache: ``requests`` expert uses (k per token),
    ``hits`` of them found in the cache, ``misses`` loaded; ``hit_rate = hits / requests``."""

    policy: str
    capacity: int
    requests: int
    hits: int

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")


def simulate_expert_cache(expert_ids: Tensor, num_experts: int, capacity: int,
                          policy: str = "lru") -> CacheResult:
    """Replay the trace ``expert_ids: [T, k]`` of one layer through a cache of ``capacity``
    experts (in [k, E]); the cache starts empty.

    Token after token, its k experts must be in the cache: each one that is not is a miss and
    is loaded, evicting (when full) an expert that the current token does not need, chosen by
    ``policy``: "lru" (least recently used), "lfu" (fewest uses so far, then least recently
    used) or "belady" (next use furthest in the future, never-again first: the optimum).
    """
    _check_ids(expert_ids, num_experts)
    check_choice("policy", policy, CACHE_POLICIES)
    k = expert_ids.shape[1]
    check_int_range("capacity", capacity, k, num_experts)
    trace = expert_ids.tolist()
    next_use = _next_uses(trace) if policy == "belady" else None
    cache: OrderedDict[int, None] = OrderedDict()  # oldest use first
    uses = [0] * num_experts
    hits = 0
    for t, chosen in enumerate(trace):
        for e in chosen:
            if e in cache:
                hits += 1
            else:
                if len(cache) >= capacity:
                    del cache[_victim(cache, chosen, policy, uses, next_use, t)]
                cache[e] = None
        for e in chosen:  # used now: most recent
            cache.move_to_end(e)
            uses[e] += 1
    return CacheResult(policy, capacity, len(trace) * k, hits)


def _next_uses(trace: list[list[int]]) -> list[dict[int, int]]:
    """``next_use[t][e]``: the first token after t that uses e (absent: never again)."""
    out: list[dict[int, int]] = [{} for _ in trace]
    upcoming: dict[int, int] = {}
    for t in range(len(trace) - 1, -1, -1):
        out[t] = dict(upcoming)
        for e in trace[t]:
            upcoming[e] = t
    return out


def _victim(cache: OrderedDict, chosen: Sequence[int], policy: str, uses: list[int],
            next_use: list[dict[int, int]] | None, t: int) -> int:
    candidates = [e for e in cache if e not in chosen]  # oldest use first
    if policy == "lru":
        return candidates[0]
    if policy == "lfu":
        return min(candidates, key=lambda e: uses[e])  # min keeps the first (oldest) of ties
    never = len(next_use) + 1
    return max(candidates, key=lambda e: next_use[t].get(e, never))


# --------------------------------------------------------------------------------------------
# Weight-only int8


def quantize_int8(w: Tensor, dim: int = -2) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per slice along ``dim`` reduced: for ``w: [..., d_in,
    d_out]`` and ``dim=-2`` one scale per output column, ``s = max_i |w_i| / 127`` and
    ``q = round(w / s)`` in [-127, 127]. Returns ``(q int8, s float32)`` with ``s`` keeping
    ``dim`` as size 1, so that ``q * s`` dequantizes (an all-zero column gets s = 1)."""
    check_tensor("w", w, kind="float")
    check_int("dim", dim, low=-w.dim(), high=w.dim() - 1)
    amax = w.detach().abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32 (``scale`` broadcasts against ``q``)."""
    check_tensor("q", q)
    if q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {q.dtype}")
    check_tensor("scale", scale, kind="float", device=q.device)
    return q.float() * scale


class Int8ExpertBank(ExpertBank):
    """An :class:`~moe_lib.experts.ExpertBank` whose projections are stored in int8 with one
    float32 scale per output column (:func:`quantize_int8`): ``q_in: [E, d_model, h_in]``,
    ``s_in: [E, 1, h_in]``, ``q_out: [E, d_hidden, d_model]``, ``s_out: [E, 1, d_model]``
    (buffers; biases, if any, stay float buffers). ``w_in`` / ``w_out`` dequantize on access, so
    every dispatch works unchanged; :meth:`forward_rows` (the direct dispatch) dequantizes only the
    expert it runs. For inference: nothing here is trained.
    """

    def __init__(self, bank: ExpertBank) -> None:
        check_type("bank", bank, ExpertBank)
        bias = bank.b_in is not None
        torch.nn.Module.__init__(self)
        self.activation, self.kind = bank.activation, bank.kind
        self.num_experts, self.d_model, self.d_hidden = (bank.num_experts, bank.d_model,
                                                         bank.d_hidden)
        q_in, s_in = quantize_int8(bank.w_in)
        q_out, s_out = quantize_int8(bank.w_out)
        for name, t in (("q_in", q_in), ("s_in", s_in), ("q_out", q_out), ("s_out", s_out)):
            self.register_buffer(name, t)
        for name in ("b_in", "b_out"):  # float, as buffers: nothing here is trained
            self.register_buffer(name, getattr(bank, name).detach().clone() if bias else None)

    @property
    def w_in(self) -> Tensor:  # type: ignore[override]
        """``q_in * s_in``: ``[E, d_model, h_in]`` float32."""
        return self.q_in.float() * self.s_in

    @property
    def w_out(self) -> Tensor:  # type: ignore[override]
        """``q_out * s_out``: ``[E, d_hidden, d_model]`` float32."""
        return self.q_out.float() * self.s_out

    def weight_bytes(self) -> int:
        """Bytes of the stored expert weights: int8 values, float32 scales, biases."""
        return sum(t.numel() * t.element_size() for t in
                   (self.q_in, self.s_in, self.q_out, self.s_out, self.b_in, self.b_out)
                   if t is not None)

    def params_per_expert(self) -> int:
        """Weights of one expert (the counts of the float bank)."""
        extra = 0 if self.b_in is None else self.b_in.shape[1] + self.b_out.shape[1]
        return self.q_in[0].numel() + self.q_out[0].numel() + extra

    def _check_rows(self, x: Tensor) -> None:
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.q_in.device)

    def _expert_weights(self, e: int, dtype: torch.dtype
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Expert e's weights dequantized alone (:meth:`forward_rows`, :meth:`forward_copies`:
        the direct dispatch)."""
        return (self.q_in[e].to(dtype) * self.s_in[e].to(dtype),
                self.q_out[e].to(dtype) * self.s_out[e].to(dtype),
                None if self.b_in is None else self.b_in[e].to(dtype),
                None if self.b_out is None else self.b_out[e].to(dtype))
