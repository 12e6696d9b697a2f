"""Expert feed-forward networks: ReLU, GELU, SwiGLU and clamped SwiGLU, one expert or a bank of E.

An expert is ``act(x @ w_in + b_in) @ w_out + b_out`` (:mod:`moe_lib.activations`); the biases
exist only with ``bias=True`` (gpt-oss has them; Mixtral, Switch and DeepSeek do not). Weights are
cast to the input's dtype in the forward (a no-op when they already match), so a float32 layer
accepts bfloat16 tokens and returns bfloat16; inside ``torch.autocast`` the expert GEMMs run in the
autocast dtype. A bank stores the weights of all E experts stacked (``w_in: [E, d_model, h_in]``,
``w_out: [E, d_hidden, d_model]``, ``b_in: [E, h_in]``, ``b_out: [E, d_model]``) so that one
kernel can read them all (:meth:`ExpertBank.forward_slices`) and write the gradient of all E
experts into one ``[E, ...]`` buffer, where indexing ``w_in[e]`` in a Python loop would make the
backward pass build a full-size gradient for every expert it indexes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_lib.activations import ExpertActivation, activation, activation_spec, in_width
from moe_lib.checks import check_bool, check_int, check_positive_int, check_tensor
from moe_lib.kernels import block_activation, expert_mlp, grouped_matmul, swiglu


def _uniform_(w: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(w, -bound, bound)


def _init_bias(module: nn.Module, name: str, shape: tuple[int, ...], fan_in: int,
               bias: bool) -> None:
    """Register ``name`` as nn.Linear's bias (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), or as None:
    absent from ``parameters()`` and the state dict, as in ``nn.Linear(bias=False)``."""
    param = nn.Parameter(_uniform_(torch.empty(shape), fan_in)) if bias else None
    module.register_parameter(name, param)


def _cast(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def _ffn(x: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None,
         spec: ExpertActivation) -> Tensor:
    """``act(x @ w_in + b_in) @ w_out + b_out`` with autograd (each bias added only if given,
    already shaped to broadcast)."""
    h = x @ w_in
    if b_in is not None:
        h = h + b_in
    y = activation(h, spec) @ w_out
    return y if b_out is None else y + b_out


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w (+ b)``: ``mm``, or one ``addmm`` with the bias (the block kernel's arithmetic)."""
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def _expert_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, spec: ExpertActivation) -> Tensor:
    """One expert on its rows, as one block of :class:`moe_lib.kernels.ExpertMLP`:
    ``act(x @ w_in + b_in) @ w_out + b_out`` (autograd records the activation when it must)."""
    h = _linear(x, w_in, b_in)
    act = activation(h, spec) if torch.is_grad_enabled() else block_activation(h, spec)
    return _linear(act, w_out, b_out)


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
    an MoE layer (hidden ``k * h`` for the same active FLOPs as top-k experts of hidden ``h``).

    ``act(x @ w_in + b_in) @ w_out + b_out`` with ``w_in: [d_model, h_in]``, ``w_out: [d_hidden,
    d_model]``, and with ``bias=True`` ``b_in: [h_in]``, ``b_out: [d_model]``. ``kind``: a name
    or an :class:`~moe_lib.activations.ExpertActivation`.
    """

    def __init__(self, d_model: int, d_hidden: int, kind: str | ExpertActivation = "swiglu",
                 bias: bool = False) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        spec = activation_spec(kind)
        check_bool("bias", bias)
        self.activation = spec
        self.kind = spec.kind
        self.d_model = d_model
        h_in = in_width(d_hidden, spec)
        self.w_in = nn.Parameter(_uniform_(torch.empty(d_model, h_in), d_model))
        self.w_out = nn.Parameter(_uniform_(torch.empty(d_hidden, d_model), d_hidden))
        _init_bias(self, "b_in", (h_in,), d_model, bias)
        _init_bias(self, "b_out", (d_model,), d_hidden, bias)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, kind="float", device=self.w_in.device)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got "
                             f"{tuple(x.shape)}")
        dtype = compute_dtype(x)
        return _ffn(x.to(dtype), self.w_in.to(dtype), self.w_out.to(dtype),
                    _cast(self.b_in, dtype), _cast(self.b_out, dtype), self.activation)


class ExpertBank(nn.Module):
    """E expert FFNs of one kind with stacked weights.

    ``w_in: [E, d_model, h_in]`` (``h_in = 2 * d_hidden`` for the gated kinds: gate and up
    fused), ``w_out: [E, d_hidden, d_model]``; with ``bias=True`` also ``b_in: [E, h_in]`` and
    ``b_out: [E, d_model]`` (gpt-oss), else no biases (Mixtral, Switch). ``kind``: a name or an
    :class:`~moe_lib.activations.ExpertActivation` (gpt-oss: ``"clamped_swiglu"``, bias=True).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int,
                 kind: str | ExpertActivation = "swiglu", bias: bool = False) -> None:
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        spec = activation_spec(kind)
        check_bool("bias", bias)
        self.activation = spec
        self.kind = spec.kind
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        h_in = in_width(d_hidden, spec)
        w_in = torch.empty(num_experts, d_model, h_in)
        w_out = torch.empty(num_experts, d_hidden, d_model)
        self.w_in = nn.Parameter(_uniform_(w_in, d_model))
        self.w_out = nn.Parameter(_uniform_(w_out, d_hidden))
        _init_bias(self, "b_in", (num_experts, h_in), d_model, bias)
        _init_bias(self, "b_out", (num_experts, d_model), d_hidden, bias)

    def params_per_expert(self) -> int:
        """Parameters of one expert: ``d_model * h_in + d_hidden * d_model``, plus
        ``h_in + d_model`` with biases."""
        params = (self.w_in, self.w_out, self.b_in, self.b_out)
        return sum(p[0].numel() for p in params if p is not None)

    def _params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``w_in, w_out, b_in, b_out`` in ``dtype`` (the biases None without ``bias=True``)."""
        return (self.w_in.to(dtype), self.w_out.to(dtype), _cast(self.b_in, dtype),
                _cast(self.b_out, dtype))

    def _check_rows(self, x: Tensor) -> None:
        check_tensor("x", x, dims=2, kind="float", shape=(None, self.d_model),
                     device=self.w_in.device)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Run expert ``e`` alone: ``x: [n, d_model] -> [n, d_model]`` (the readable reference)."""
        check_int("e", e, low=0, high=self.num_experts - 1)
        self._check_rows(x)
        dtype = compute_dtype(x)
        b_in, b_out = (None if b is None else b[e].to(dtype) for b in (self.b_in, self.b_out))
        return _ffn(x.to(dtype), self.w_in[e].to(dtype), self.w_out[e].to(dtype), b_in, b_out,
                    self.activation)  # expert e's weights alone are cast

    def _expert_weights(self, e: int, dtype: torch.dtype
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Expert e's ``w_in: [d_model, h_in]``, ``w_out: [d_hidden, d_model]`` and biases (or
        None) in ``dtype``: only expert e's weights are cast."""
        return (self.w_in[e].to(dtype), self.w_out[e].to(dtype),
                None if self.b_in is None else self.b_in[e].to(dtype),
                None if self.b_out is None else self.b_out[e].to(dtype))

    def forward_rows(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on rows ``x: [n, d_model] -> [n, d_model]``, computed as the CPU block
        kernel computes one block of its rows (:class:`moe_lib.kernels.ExpertMLP`): ``mm`` (or
        ``addmm`` with the bias), the activation, ``mm`` (or ``addmm``). Differentiable by
        autograd; only expert e's weights are read (and cast)."""
        check_int("e", e, low=0, high=self.num_experts - 1)
        self._check_rows(x)
        dtype = compute_dtype(x)
        return _expert_ffn(x.to(dtype), *self._expert_weights(e, dtype), self.activation)

    def forward_copies(self, x: Tensor, copies: dict[int, list[int]], top_k: int) -> Tensor:
        """The direct dispatch's expert step: row ``c`` of the result is ``E_e(x[c // k])`` for
        every copy ``c = t * k + j`` listed in ``copies[e]``.

        ``x: [T, d_model]``; ``copies``: expert -> its copies' flat indices in ``[0, T k)``, in
        token order (:func:`moe_lib.dispatch.direct_plan`); ``top_k``: k. Returns ``[T k,
        d_model]``, plus a zero row ``T k`` (for the combine to read) when some copy is not
        listed (dropped). Each listed expert runs once, on the rows of all its tokens
        (:meth:`forward_rows`' arithmetic): its weights are read once, whatever its number of
        tokens. No gather when an expert takes every token in order (batch 1), no scatter when
        each expert has one copy (the outputs are concatenated in copy order).
        """
        self._check_rows(x)
        check_positive_int("top_k", top_k)
        T, n = x.shape[0], x.shape[0] * top_k
        if not isinstance(copies, dict) or not all(
                isinstance(e, int) and 0 <= e < self.num_experts and isinstance(cs, list)
                and cs and 0 <= min(cs) and max(cs) < n for e, cs in copies.items()):
            raise ValueError(f"copies must map experts in [0, {self.num_experts - 1}] to "
                             f"non-empty lists of copy indices in [0, {n - 1}], got "
                             f"{copies!r:.80}")
        dtype = compute_dtype(x)
        x = x.to(dtype)
        listed = sum(len(cs) for cs in copies.values())
        single = listed == n and listed == len(copies)  # one copy per expert, none dropped
        outs: list[tuple[int, Tensor]] = []
        out = None  # [T k (+1), d_model]
        for e, cs in copies.items():
            tokens = [c // top_k for c in cs] if top_k > 1 else cs
            if len(tokens) == T and tokens[-1] == T - 1:  # every token, in order: no gather
                rows = x
            else:
                rows = x.index_select(0, torch.tensor(tokens, device=x.device))
            ye = _expert_ffn(rows, *self._expert_weights(e, dtype), self.activation)
            if listed == n == len(cs):  # k = 1 and one expert took every token
                return ye
            if single:
                outs.append((cs[0], ye))
                continue
            if out is None:
                out = (ye.new_empty(n, ye.shape[1]) if listed == n else
                       ye.new_zeros(n + 1, ye.shape[1]))
            out.index_copy_(0, torch.tensor(cs, device=x.device), ye)
        if single:
            return torch.cat([ye for _, ye in sorted(outs, key=lambda p: p[0])])
        if out is None:  # nothing listed: every copy dropped
            out = x.new_zeros(n + 1, self.d_model)
        return out

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every token: ``x: [n, d_model] -> [E, n, d_model]`` (dense gating)."""
        self._check_rows(x)
        dtype = compute_dtype(x)
        w_in, w_out, b_in, b_out = self._params(dtype)
        return _ffn(x.to(dtype).unsqueeze(0), w_in, w_out,  # [1, n, d] @ [E, d, h_in]
                    None if b_in is None else b_in.unsqueeze(1),  # [E, 1, h_in]
                    None if b_out is None else b_out.unsqueeze(1), self.activation)  # [E, 1, d]

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
          on Hopper or Blackwell) that writes every expert's rows into one buffer, then adds
          each expert's bias to its rows, and the non-linearity runs once over all ``n`` rows
          (:func:`moe_lib.kernels.swiglu`; the other kinds through autograd).
        """
        self._check_rows(x_sorted)
        dtype = compute_dtype(x_sorted)
        x_sorted = x_sorted.to(dtype)
        w_in, w_out, b_in, b_out = self._params(dtype)
        if x_sorted.device.type == "cpu" and not torch.compiler.is_compiling():
            return expert_mlp(x_sorted, w_in, w_out, counts, self.activation, b_in=b_in,
                              b_out=b_out)
        h = grouped_matmul(x_sorted, w_in, counts, b_in)  # [n, h_in]
        act = swiglu(h) if self.kind == "swiglu" else activation(h, self.activation)
        return grouped_matmul(act, w_out, counts, b_out)  # [n, d_model]
