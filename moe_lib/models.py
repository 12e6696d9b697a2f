"""A small pre-norm transformer whose FFN blocks are MoE layers (or dense, for baselines).

One model serves two heads: a causal byte-level language model (``task="lm"``) and a sequence
classifier (``task="classify"``: mean-pool the final states, then a linear head, as in the Keras
Switch Transformer text-classification example).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lib.checks import check_choice, check_positive_int, check_real, check_tensor, check_type
from moe_lib.config import MoEConfig
from moe_lib.experts import FeedForward
from moe_lib.layer import MoE
from moe_lib.routing import Routing

DEFAULT_MOE = {"num_experts": 8, "top_k": 2}


@dataclass
class TransformerConfig:
    """Sizes and FFN choice.

    ``ffn="moe"``: every FFN block is ``MoE.from_config(moe)``. ``moe`` may be given as an
    :class:`~moe_lib.layer.MoEConfig` (its d_model and d_hidden must match this config's) or as a
    dict of MoE options without d_model and d_hidden (None: 8 experts, top-2); after
    ``__post_init__`` it is always an MoEConfig. ``ffn="dense"``: a SwiGLU FFN of hidden
    ``d_hidden`` (for the same active parameters as an MoE of hidden h and top-k, pass
    ``d_hidden = k * h``; for the same total, ``E * h``); ``moe`` must then be None.
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_hidden: int = 128
    ffn: str = "moe"
    task: str = "lm"
    num_classes: int = 0
    dropout: float = 0.0
    moe: MoEConfig | dict | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_hidden"):
            check_positive_int(name, getattr(self, name))
        check_choice("ffn", self.ffn, ("moe", "dense"))
        check_choice("task", self.task, ("lm", "classify"))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.task == "classify":
            check_positive_int("num_classes", self.num_classes)
        elif self.num_classes != 0:
            raise ValueError(f"num_classes applies to task='classify' only, got "
                             f"{self.num_classes!r} with task='lm'")
        check_real("dropout", self.dropout, 0.0, 1.0, high_open=True)
        self.moe = self._moe_config()

    def _moe_config(self) -> MoEConfig | None:
        if self.ffn == "dense":
            if self.moe is not None:
                raise ValueError("moe applies to ffn='moe' only; pass moe=None with ffn='dense'")
            return None
        if isinstance(self.moe, MoEConfig):
            if (self.moe.d_model, self.moe.d_hidden) != (self.d_model, self.d_hidden):
                raise ValueError(
                    f"moe has d_model={self.moe.d_model}, d_hidden={self.moe.d_hidden}; the "
                    f"model has d_model={self.d_model}, d_hidden={self.d_hidden}")
            return self.moe
        options = DEFAULT_MOE if self.moe is None else self.moe
        if not isinstance(options, dict):
            raise TypeError(f"moe must be an MoEConfig, a dict of MoE options or None, got "
                            f"{type(options).__name__}")
        clash = {"d_model", "d_hidden"} & set(options)
        if clash:
            raise ValueError(f"moe must not set {sorted(clash)}: they come from the model's "
                             "d_model and d_hidden")
        return MoEConfig(d_model=self.d_model, d_hidden=self.d_hidden, **options)


@dataclass
class ModelOutput:
    """``logits``: ``[B, S, vocab]`` (lm) or ``[B, classes]``; ``aux_loss``: summed over MoE layers;
    ``routings``: one Routing per MoE layer (empty for a dense model)."""

    logits: Tensor
    aux_loss: Tensor
    routings: list[Routing]


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        check_type("cfg", cfg, TransformerConfig)
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.causal = cfg.task == "lm"
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # (B, S, D) each
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        # y: (B, h, S, hs)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + ffn(ln(x)).

    Tokens that MoE capacity drops pass through on the residual.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        check_type("cfg", cfg, TransformerConfig)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if cfg.ffn == "moe":
            self.ffn: nn.Module = MoE.from_config(cfg.moe)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_hidden, "swiglu")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Routing | None]:
        x = x + self.drop(self.attn(self.ln1(x)))
        h = self.ln2(x)
        if isinstance(self.ffn, MoE):
            out = self.ffn(h)
            return x + self.drop(out.y), out.aux_loss, out.routing
        return x + self.drop(self.ffn(h)), None, None


class Transformer(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, final LayerNorm, LM or classifier head."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        check_type("cfg", cfg, TransformerConfig)
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        out = cfg.vocab_size if cfg.task == "lm" else cfg.num_classes
        self.head = nn.Linear(cfg.d_model, out, bias=cfg.task == "classify")

    def forward(self, idx: Tensor) -> ModelOutput:
        """``idx: [B, S]`` integer token ids in ``[0, vocab_size)``, 1 <= S <= seq_len."""
        check_tensor("idx", idx, dims=2, kind="int", device=self.tok.weight.device)
        B, S = idx.shape
        if not 1 <= S <= self.cfg.seq_len:
            raise ValueError(f"idx must have 1 to seq_len={self.cfg.seq_len} positions, got {S}")
        if idx.numel():
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(f"idx must hold token ids in [0, {self.cfg.vocab_size - 1}] "
                                 f"(vocab_size={self.cfg.vocab_size}), got [{low}, {high}]")
        x = self.tok(idx.long()) + self.pos(torch.arange(S, device=idx.device))  # (B, S, D)
        aux = torch.zeros((), device=idx.device)
        routings: list[Routing] = []
        for block in self.blocks:
            x, block_aux, routing = block(x)
            if routing is not None:
                aux = aux + block_aux
                routings.append(routing)
        x = self.ln_f(x)
        if self.cfg.task == "classify":
            x = x.mean(dim=1)  # (B, D) global average pooling
        return ModelOutput(logits=self.head(x), aux_loss=aux, routings=routings)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers of the blocks, in order (empty for a dense model)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_selection_bias(self, gamma: float) -> None:
        """DeepSeek-V3's loss-free bias update on every MoE layer (each built with
        ``selection_bias=True``), after the optimizer step."""
        layers = self.moe_layers()
        if not layers or not all(m.config.selection_bias for m in layers):
            raise ValueError("update_selection_bias needs MoE layers built with "
                             "selection_bias=True")
        for m in layers:
            m.update_selection_bias(gamma)


def ffn_parameter_counts(model: Transformer) -> dict[str, int]:
    """Parameters in the FFN blocks: ``total`` (all experts) and ``active`` (used per token).

    For an MoE block: :meth:`MoE.parameter_counts` (the router counts in both); a dense block
    counts all its parameters in both. Attention, embeddings and norms are not counted.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a moe_lib Transformer, got {type(model).__name__}")
    total = active = 0
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            counts = block.ffn.parameter_counts()
            total, active = total + counts.total, active + counts.active
        else:
            n = sum(p.numel() for p in block.ffn.parameters())
            total, active = total + n, active + n
    return {"total": total, "active": active}
