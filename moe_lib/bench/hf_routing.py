"""One Hugging Face MoE model read by moe_lib: its blocks as :class:`~moe_lib.layer.MoE` layers,
and the routing of real text through every layer.

Two sources of the model, and nothing else differs between them:

- :func:`tiny_olmoe`: an ``OlmoeForCausalLM`` built from an ``OlmoeConfig`` with small sizes
  (:data:`TINY`: OLMoE's 64 experts and top-8, a hidden size of 64, 4 layers) and the weights
  transformers initialises, seeded; its vocabulary is the 256 byte values, so a text's UTF-8
  bytes are its token ids. Runs on a CPU in a second; its routing is that of random weights.
- :func:`load_pretrained`: a released checkpoint from the Hugging Face Hub (default
  :data:`CHECKPOINT`, OLMoE-1B-7B) with its tokenizer, for a GPU (about 14 GB of bf16 weights,
  downloaded on first use).

:func:`block_inputs` runs the model once and keeps what enters and leaves each MoE block;
:func:`moe_lib_layers` turns the blocks into moe_lib layers (``MoE.from_hf``). The statistics
read the layers' :class:`~moe_lib.routing.Routing` records: :func:`repeat_rates` (how often the
next token shares the first-choice expert, or any of the top-k, with the token before it) and
their chance values (:func:`uniform_repeat_rates`; :func:`shuffled_repeat_rates` keeps each
layer's expert loads and breaks the order of the tokens).

Needs the ``hf`` extra (transformers), imported when a function needs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_lib.checks import check_int, check_positive_int, check_tensor, check_type
from moe_lib.layer import MoE

CHECKPOINT = "allenai/OLMoE-1B-7B-0924"
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=False, max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=None)
"""The tiny OLMoE: OLMoE-1B-7B's routing (64 experts, top-8, raw softmax weights), small sizes."""


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the hf extra is installed with the book
        raise ImportError('moe_lib.bench.hf_routing needs transformers: '
                          'pip install "moe_lib[hf]"') from err
    return transformers


@dataclass
class Source:
    """A model and how to turn text into its token ids: ``model`` (in eval mode), ``encode``
    (``str -> [n]`` int64 ids), ``name`` (what it is, in words)."""

    model: nn.Module
    encode: Callable[[str], Tensor]
    name: str


def _utf8_bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def tiny_olmoe(seed: int = 0, **overrides: object) -> Source:
    """An ``OlmoeForCausalLM`` of :data:`TINY` (``overrides`` change fields) with the weights
    transformers initialises after ``torch.manual_seed(seed)``, its experts in transformers'
    eager implementation (what ``MoE.from_hf`` reads), in float32 on the CPU, eval mode. Token
    ids are UTF-8 bytes."""
    check_int("seed", seed, low=0, high=2**32 - 1)
    t = _transformers()
    fields = {**TINY, **overrides}
    if fields["vocab_size"] < 256:
        raise ValueError(f"vocab_size must hold the 256 byte values, got {fields['vocab_size']}")
    config = t.OlmoeConfig(experts_implementation="eager", **fields)
    torch.manual_seed(seed)
    model = t.OlmoeForCausalLM(config).eval()
    return Source(model, _utf8_bytes, f"a tiny OLMoE built from OlmoeConfig with random weights "
                  f"({fields['num_hidden_layers']} layers, hidden size {fields['hidden_size']}, "
                  f"{fields['num_experts']} experts, top-{fields['num_experts_per_tok']}; "
                  f"tokens: UTF-8 bytes)")


def load_pretrained(name: str = CHECKPOINT, device: torch.device | str = "cuda",
                    dtype: torch.dtype = torch.bfloat16) -> Source:  # pragma: no cover - GPU
    """A released checkpoint from the Hub with its tokenizer, its experts in the eager
    implementation, in ``dtype`` on ``device``, eval mode (downloads on first use)."""
    check_type("name", name, str)
    check_type("dtype", dtype, torch.dtype)
    t = _transformers()
    model = t.AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    model.set_experts_implementation("eager")
    tokenizer = t.AutoTokenizer.from_pretrained(name)

    def encode(text: str) -> Tensor:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    return Source(model, encode, f"{name} from the Hugging Face Hub ({dtype}, {device})")


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks of a decoder-only model (``model.model.layers[i].mlp``), in order."""
    check_type("model", model, nn.Module)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("model must be a Hugging Face causal LM with model.model.layers")
    return [layer.mlp for layer in layers]


@torch.no_grad()
def block_inputs(model: nn.Module, ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``model`` on ``ids: [B, S]`` once; return, per MoE block, its input and its output,
    each ``[B, S, d]`` (forward hooks; nothing in the model changes)."""
    check_tensor("ids", ids, dims=2, kind="int")
    blocks = moe_blocks(model)
    seen_in: list[Tensor] = []
    seen_out: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        seen_in.append(args[0].detach())
        seen_out.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return seen_in, seen_out


def moe_lib_layers(model: nn.Module) -> list[MoE]:
    """``MoE.from_hf`` of every MoE block of ``model`` (eval mode, the block's dtype and
    device)."""
    return [MoE.from_hf(b).eval() for b in moe_blocks(model)]


def repeat_rates(expert_ids: Tensor) -> dict[str, float]:
    """How often consecutive tokens share experts, from ``expert_ids: [B, S, k]`` (each token's
    choices, first choice first; S >= 2): ``"first"``, the share of neighbour pairs (t, t+1)
    with the same first choice; ``"any"``, the share whose top-k sets overlap (Mixtral's
    "first or second choice" for k = 2)."""
    check_tensor("expert_ids", expert_ids, dims=3, kind="int")
    if expert_ids.shape[1] < 2:
        raise ValueError(f"expert_ids must hold sequences of at least 2 tokens, got shape "
                         f"{tuple(expert_ids.shape)}")
    a, b = expert_ids[:, :-1], expert_ids[:, 1:]  # [B, S-1, k]
    first = (a[..., 0] == b[..., 0]).double().mean()
    overlap = (a[..., :, None] == b[..., None, :]).any(dim=-1).any(dim=-1)  # [B, S-1]
    return {"first": float(first), "any": float(overlap.double().mean())}


def uniform_repeat_rates(num_experts: int, top_k: int) -> dict[str, float]:
    """:func:`repeat_rates` of independent, uniformly random choices: ``1 / E`` for the first
    choice and ``1 - C(E - k, k) / C(E, k)`` for overlapping top-k sets (46.4% for E = 8,
    k = 2)."""
    check_positive_int("num_experts", num_experts)
    check_int("top_k", top_k, low=1, high=num_experts)
    E, k = num_experts, top_k
    disjoint = math.comb(E - k, k) / math.comb(E, k)
    return {"first": 1.0 / E, "any": 1.0 - disjoint}


def shuffled_repeat_rates(expert_ids: Tensor, draws: int = 20, seed: int = 0) -> dict[str, float]:
    """:func:`repeat_rates` after shuffling the tokens within each sequence (``draws`` random
    orders, averaged): the chance value for the observed expert loads, with the order of the
    text broken."""
    check_tensor("expert_ids", expert_ids, dims=3, kind="int")
    check_positive_int("draws", draws)
    check_int("seed", seed, low=0, high=2**32 - 1)
    g = torch.Generator().manual_seed(seed)
    B, S, _ = expert_ids.shape
    totals = {"first": 0.0, "any": 0.0}
    for _ in range(draws):
        order = torch.argsort(torch.rand(B, S, generator=g), dim=1)  # [B, S]
        shuffled = expert_ids.cpu().gather(1, order[..., None].expand_as(expert_ids.cpu()))
        for key, value in repeat_rates(shuffled).items():
            totals[key] += value / draws
    return totals
