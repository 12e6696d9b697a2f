"""Parameters, FLOPs and weight memory of published MoE models, from their configurations.

The configurations ship with the package, one file per model (``moe_lib/configs/<name>.json``,
:func:`names`, :func:`load`): the fields of the released checkpoint's Hugging Face
``config.json`` that the counts need, under Hugging Face's names; a ``source`` saying where the
values come from; the ``published`` figures (total and active parameters, ...) with where each
was published, to check the counts against.

Counts, with d the hidden size, V the vocabulary, n_h query heads and n_kv key/value heads of
width h_d, E routed experts of width I of which a token uses k:

- embedding ``V d`` (a token reads one row: a lookup, no arithmetic); output head ``V d``
  unless tied to the embedding;
- attention per layer, grouped-query (Mixtral, Qwen3, OLMoE, gpt-oss): ``2 d n_h h_d + 2 d n_kv
  h_d`` (q, o and k, v), plus biases (gpt-oss), per-head q/k norms (Qwen3: ``2 h_d``; OLMoE:
  ``(n_h + n_kv) h_d``) and gpt-oss's ``n_h`` attention sinks; multi-head latent attention
  (DeepSeek-V3, ranks r_q and r_kv): ``d r_q + r_q + r_q n_h (h_nope + h_rope) + d (r_kv +
  h_rope) + r_kv + r_kv n_h (h_nope + h_v) + n_h h_v d``; T5 (Switch): ``4 d n_h d_kv`` per
  attention block (self, and cross in the decoder), plus the relative position buckets;
- an expert: SwiGLU ``3 d I`` (gpt-oss adds its biases ``2 I + d``), ReLU (Switch) ``2 d I``;
  a router ``d E`` (``+ E``: gpt-oss's logit bias, DeepSeek-V3's selection bias); shared experts
  and dense FFN layers as experts of their width;
- norms: ``d`` weights per RMSNorm / T5 LayerNorm (two per decoder layer, one final).

``total`` counts everything; ``active`` everything but the ``E - k`` routed experts a token does
not use in each MoE layer. Publishers differ on the embedding, which a token only reads:
:attr:`ParameterCount.active` counts it, :attr:`ParameterCount.active_without_embedding` does not.
For the encoder-decoder Switch-C, ``active`` is one token through the encoder and one through the
decoder.

Nothing here imports torch or transformers, except :func:`transformers_count`, which builds the
model class of ``transformers`` on the meta device (the ``hf`` extra) as an independent count.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType

from moe_lib.checks import check_choice, check_int, check_positive, check_type

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "switch_transformers")
COMPONENTS = ("embedding", "head", "attention", "dense_ffn", "experts", "shared_experts",
              "routers", "norms")
"""The parts a :class:`ParameterCount` splits the parameters into (``experts``: the routed
experts, their biases included)."""

_UNITS = {"M": 1e6, "B": 1e9, "T": 1e12, "GiB": 2.0**30, "GB": 1e9, "TB": 1e12}
_PUBLISHED = re.compile(r"^(\d+(?:\.(\d+))?)(M|B|T|GiB|GB|TB)$")


# --------------------------------------------------------------------------------------------
# The stored configurations


@dataclass(frozen=True)
class Published:
    """A published figure: ``value`` as printed ("46.7B", "60.8GiB"), ``where`` it was
    published, and the ``convention`` of an active count when the source states it
    ("without_embedding": the input embedding is left out)."""

    value: str
    where: str
    convention: str | None = None

    def __post_init__(self) -> None:
        check_type("value", self.value, str)
        if not _PUBLISHED.match(self.value):
            raise ValueError(f"value must be a number with a unit (M, B, T, GiB, GB, TB), e.g. "
                             f"'46.7B', got {self.value!r}")
        check_type("where", self.where, str)
        check_choice("convention", self.convention, (None, "without_embedding"))

    @property
    def number(self) -> float:
        """The value in parameters (M, B, T) or bytes (GiB, GB, TB): "46.7B" -> 4.67e10."""
        digits, _, unit = _PUBLISHED.match(self.value).groups()
        return float(digits) * _UNITS[unit]

    @property
    def unit(self) -> float:
        """The place value of the last printed digit: "46.7B" -> 1e8, "671B" -> 1e9."""
        _, decimals, unit = _PUBLISHED.match(self.value).groups()
        return _UNITS[unit] * 10.0 ** -len(decimals or "")

    def rounds_to(self, count: float) -> bool:
        """Whether ``count`` rounded (half up) to the printed digits gives the printed value."""
        check_positive("count", count)
        return math.floor(count / self.unit + 0.5) == round(self.number / self.unit)

    def within_one_unit(self, count: float) -> bool:
        """Whether ``|count - value|`` is less than one unit of the last printed digit."""
        check_positive("count", count)
        return abs(count - self.number) < self.unit


@dataclass(frozen=True)
class ModelCard:
    """One stored configuration: ``name`` (the file's stem), ``title``, ``family`` (one of
    :data:`FAMILIES`), ``hf_id`` (the Hugging Face checkpoint), ``config`` (Hugging Face's
    field names and values, read-only), ``source`` and the ``published`` figures by name
    ("total", "active", ...)."""

    name: str
    title: str
    family: str
    hf_id: str
    config: MappingProxyType
    source: str
    published: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name in ("name", "title", "hf_id", "source"):
            check_type(name, getattr(self, name), str)
        check_choice("family", self.family, FAMILIES)
        check_type("config", self.config, (dict, MappingProxyType))
        check_type("published", self.published, (dict, MappingProxyType))
        for key, fig in self.published.items():
            check_type(f"published[{key!r}]", fig, Published)
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "published", MappingProxyType(dict(self.published)))
        missing = [f for f in _REQUIRED[self.family] if f not in self.config]
        if missing:
            raise ValueError(f"config of a {self.family} model must give {missing}")

    def with_config(self, **changes: object) -> ModelCard:
        """A copy with some configuration fields changed (say fewer layers), without the
        published figures, which no longer apply."""
        return ModelCard(self.name, self.title, self.family, self.hf_id,
                         {**self.config, **changes}, self.source)


_REQUIRED = {
    "mixtral": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts",
                "num_experts_per_tok"),
    "qwen3_moe": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "num_experts", "num_experts_per_tok"),
    "olmoe": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok"),
    "gpt_oss": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                "num_experts_per_tok"),
    "deepseek_v3": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_shared_experts", "num_experts_per_tok"),
    "switch_transformers": ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers",
                            "num_decoder_layers", "num_sparse_encoder_layers",
                            "num_sparse_decoder_layers", "num_experts"),
}


def names() -> list[str]:
    """The stored configurations, sorted (file names without ``.json``)."""
    folder = resources.files("moe_lib").joinpath("configs")
    return sorted(f.name[: -len(".json")] for f in folder.iterdir() if f.name.endswith(".json"))


def load(name: str) -> ModelCard:
    """The stored configuration ``name`` (see :func:`names`) as a :class:`ModelCard`."""
    check_type("name", name, str)
    available = names()
    if name not in available:
        raise ValueError(f"name must be one of the stored configurations {available}, got "
                         f"{name!r}")
    text = resources.files("moe_lib").joinpath("configs", f"{name}.json").read_text("utf-8")
    raw = json.loads(text)
    published = {key: Published(**fig) for key, fig in raw.get("published", {}).items()}
    return ModelCard(raw["name"], raw["title"], raw["family"], raw["hf_id"], raw["config"],
                     raw["source"], published)


def load_all() -> list[ModelCard]:
    """Every stored configuration, in the order of :func:`names`."""
    return [load(n) for n in names()]


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model by component (:data:`COMPONENTS`): ``totals`` (all of them) and
    ``actives`` (those one token uses); ``expert_weights``: the routed experts' weight matrices
    alone (without biases: what MXFP4 stores in 4 bits); ``outside``: parameters of the
    checkpoint that the model's published total leaves out (DeepSeek-V3's multi-token
    prediction module)."""

    totals: MappingProxyType
    actives: MappingProxyType
    expert_weights: int
    outside: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def active(self) -> int:
        """Parameters one token uses, the embedding row it reads included."""
        return sum(self.actives.values())

    @property
    def active_without_embedding(self) -> int:
        """:attr:`active` less the input embedding (the output head stays)."""
        return self.active - self.actives["embedding"]

    @property
    def non_embedding(self) -> int:
        """:attr:`total` less the input embedding and the output head."""
        return self.total - self.totals["embedding"] - self.totals["head"]

    def share(self, component: str) -> float:
        """``component``'s share of :attr:`total`."""
        check_choice("component", component, COMPONENTS)
        return self.totals[component] / self.total


class _Tally:
    """Adds parameters to components, in total and per token."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(COMPONENTS, 0)
        self.actives = dict.fromkeys(COMPONENTS, 0)
        self.expert_weights = 0

    def add(self, component: str, total: int, active: int | None = None) -> None:
        self.totals[component] += total
        self.actives[component] += total if active is None else active

    def moe(self, d: int, E: int, k: int, expert: int, expert_bias: int, router: int,
            shared: int = 0) -> None:
        """One MoE FFN: E experts of ``expert`` weights and ``expert_bias`` biases, k used."""
        self.add("experts", E * (expert + expert_bias), k * (expert + expert_bias))
        self.expert_weights += E * expert
        self.add("routers", router)
        self.add("shared_experts", shared)

    def result(self, outside: dict[str, int] | None = None) -> ParameterCount:
        return ParameterCount(MappingProxyType(self.totals), MappingProxyType(self.actives),
                              self.expert_weights, MappingProxyType(outside or {}))


def _gqa_attention(c: MappingProxyType, family: str) -> int:
    """One grouped-query attention block: q, k, v, o (+ biases, q/k norms, sinks)."""
    d, n_h, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // n_h
    n = 2 * d * n_h * hd + 2 * d * n_kv * hd
    if c.get("attention_bias", False):
        n += n_h * hd + 2 * n_kv * hd + d
    if family == "qwen3_moe":
        n += 2 * hd  # q_norm, k_norm over one head
    elif family == "olmoe":
        n += (n_h + n_kv) * hd  # q_norm, k_norm over all heads
    elif family == "gpt_oss":
        n += n_h  # one learned attention sink per head
    return n


def _mla_attention(c: MappingProxyType) -> int:
    """DeepSeek-V3's multi-head latent attention (low-rank q and kv with their norms)."""
    d, n_h = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    r_q, r_kv = c.get("q_lora_rank"), c["kv_lora_rank"]
    q = d * n_h * (nope + rope) if r_q is None else d * r_q + r_q + r_q * n_h * (nope + rope)
    kv = d * (r_kv + rope) + r_kv + r_kv * n_h * (nope + v)
    return q + kv + n_h * v * d


def _deepseek_is_moe(c: MappingProxyType, i: int) -> bool:
    return i >= c["first_k_dense_replace"] and i % c.get("moe_layer_freq", 1) == 0


def _qwen3_is_moe(c: MappingProxyType, i: int) -> bool:
    return (i not in c.get("mlp_only_layers", []) and c["num_experts"] > 0
            and (i + 1) % c.get("decoder_sparse_step", 1) == 0)


def _decoder_ffn(t: _Tally, c: MappingProxyType, family: str, i: int) -> None:
    """Layer ``i``'s FFN: MoE (experts, router, shared experts) or dense."""
    d, k = c["hidden_size"], c["num_experts_per_tok"]
    if family == "mixtral":
        E, w = c["num_local_experts"], c["intermediate_size"]
        t.moe(d, E, k, 3 * d * w, 0, d * E)
    elif family == "olmoe":
        E, w = c["num_experts"], c["intermediate_size"]
        t.moe(d, E, k, 3 * d * w, 0, d * E)
    elif family == "gpt_oss":
        E, w = c["num_local_experts"], c["intermediate_size"]
        t.moe(d, E, k, 3 * d * w, 2 * w + d, d * E + E)
    elif family == "qwen3_moe":
        if _qwen3_is_moe(c, i):
            E, w = c["num_experts"], c["moe_intermediate_size"]
            t.moe(d, E, k, 3 * d * w, 0, d * E)
        else:
            t.add("dense_ffn", 3 * d * c["intermediate_size"])
    else:  # deepseek_v3
        if _deepseek_is_moe(c, i):
            E, w = c["n_routed_experts"], c["moe_intermediate_size"]
            # the router's weight and its selection bias (e_score_correction_bias: a buffer in
            # transformers, a tensor of the checkpoint)
            t.moe(d, E, k, 3 * d * w, 0, d * E + E, shared=c["n_shared_experts"] * 3 * d * w)
        else:
            t.add("dense_ffn", 3 * d * c["intermediate_size"])


def _count_decoder(card: ModelCard) -> ParameterCount:
    c, family = card.config, card.family
    d, V = c["hidden_size"], c["vocab_size"]
    t = _Tally()
    t.add("embedding", V * d)
    t.add("head", 0 if c.get("tie_word_embeddings", False) else V * d)
    t.add("norms", d)  # the final norm
    for i in range(c["num_hidden_layers"]):
        t.add("attention", _mla_attention(c) if family == "deepseek_v3"
              else _gqa_attention(c, family))
        t.add("norms", 2 * d)  # before attention, before the FFN
        _decoder_ffn(t, c, family, i)
    outside = {}
    mtp = c.get("num_nextn_predict_layers", 0) if family == "deepseek_v3" else 0
    if mtp:
        # Each MTP module: one more MoE layer, the projection eh_proj [2d -> d] and three norms;
        # its embedding and output head are the main model's.
        layer = _Tally()
        layer.add("attention", _mla_attention(c))
        layer.add("norms", 2 * d)
        _decoder_ffn(layer, c, family, c["num_hidden_layers"])
        outside["MTP transformer layer"] = mtp * sum(layer.totals.values())
        outside["MTP projection and norms"] = mtp * (2 * d * d + 3 * d)  # eh_proj; enorm, hnorm,
        # the shared head's norm
    return t.result(outside)


def _switch_sparse(layers: int, sparse: int, i: int) -> bool:
    """Hugging Face's rule: every ``layers // sparse``-th layer is sparse, from layer 1 (all of
    them when the step is 1)."""
    step = layers // sparse if sparse > 0 else layers
    return (i % step == 1 or step == 1) if step > 0 else False


def _count_switch(card: ModelCard) -> ParameterCount:
    """T5 encoder-decoder: self-attention (+ cross-attention in the decoder), ReLU FFN or Switch
    layer (top-1, ``router_bias`` optional), T5 norms, relative position buckets per stack."""
    c = card.config
    d, V, E = c["d_model"], c["vocab_size"], c["num_experts"]
    block = 4 * d * c["num_heads"] * c["d_kv"]
    t = _Tally()
    t.add("embedding", V * d)
    t.add("head", 0 if c.get("tie_word_embeddings", True) else V * d)
    stacks = (("num_layers", "num_sparse_encoder_layers", 1),
              ("num_decoder_layers", "num_sparse_decoder_layers", 2))
    for layers_key, sparse_key, attention_blocks in stacks:
        layers, sparse = c[layers_key], c[sparse_key]
        t.add("attention", c.get("relative_attention_num_buckets", 32) * c["num_heads"])
        t.add("norms", d)  # the stack's final norm
        for i in range(layers):
            t.add("attention", attention_blocks * block)
            t.add("norms", (attention_blocks + 1) * d)
            if _switch_sparse(layers, sparse, i):
                t.moe(d, E, 1, 2 * d * c["d_ff"], 0, d * E + (E if c.get("router_bias") else 0))
            else:
                t.add("dense_ffn", 2 * d * c["d_ff"])
    return t.result()


def count_parameters(card: ModelCard) -> ParameterCount:
    """The parameters of ``card``'s model by component, in total and per token (see the module
    docstring for the formulas)."""
    check_type("card", card, ModelCard)
    if card.family == "switch_transformers":
        return _count_switch(card)
    return _count_decoder(card)


def moe_layers(card: ModelCard) -> int:
    """How many FFN layers are MoE layers (both stacks of an encoder-decoder)."""
    check_type("card", card, ModelCard)
    c = card.config
    if card.family == "switch_transformers":
        return sum(_switch_sparse(c[n], c[s], i)
                   for n, s in (("num_layers", "num_sparse_encoder_layers"),
                                ("num_decoder_layers", "num_sparse_decoder_layers"))
                   for i in range(c[n]))
    L = c["num_hidden_layers"]
    if card.family == "deepseek_v3":
        return sum(_deepseek_is_moe(c, i) for i in range(L))
    if card.family == "qwen3_moe":
        return sum(_qwen3_is_moe(c, i) for i in range(L))
    return L


def routing(card: ModelCard) -> dict[str, int]:
    """``{"experts": E, "top_k": k, "shared": n_shared}`` of the model's MoE layers."""
    check_type("card", card, ModelCard)
    c = card.config
    E = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "olmoe": "num_experts",
         "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts",
         "switch_transformers": "num_experts"}[card.family]
    k = 1 if card.family == "switch_transformers" else c["num_experts_per_tok"]
    shared = c["n_shared_experts"] if card.family == "deepseek_v3" else 0
    return {"experts": c[E], "top_k": k, "shared": shared}


# --------------------------------------------------------------------------------------------
# FLOPs and memory


def _attention_blocks(card: ModelCard) -> list[tuple[int, int, int, int | None]]:
    """Every attention block as ``(query heads, q.k width, value width, window)`` (window None:
    the whole context)."""
    c = card.config
    if card.family == "switch_transformers":
        per = (c["num_heads"], c["d_kv"], c["d_kv"], None)
        return [per] * (c["num_layers"] + 2 * c["num_decoder_layers"])
    n_h, L = c["num_attention_heads"], c["num_hidden_layers"]
    if card.family == "deepseek_v3":
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        return [(n_h, qk, c["v_head_dim"], None)] * L
    hd = c.get("head_dim") or c["hidden_size"] // n_h
    kinds = c.get("layer_types") or ["full_attention"] * L
    window = c.get("sliding_window")
    return [(n_h, hd, hd, window if kind == "sliding_attention" else None) for kind in kinds]


def attention_flops(card: ModelCard, context: int) -> int:
    """FLOPs of the attention scores and the weighted sum of values for one token that attends
    to ``context`` tokens: ``sum over blocks of 2 n_h c (d_qk + d_v)``, c the context, or the
    window of a sliding-window block when smaller (gpt-oss)."""
    check_type("card", card, ModelCard)
    check_int("context", context, low=1)
    return sum(2 * n_h * (context if w is None else min(context, w)) * (qk + v)
               for n_h, qk, v, w in _attention_blocks(card))


def flops_per_token(card: ModelCard, context: int = 4096) -> int:
    """Forward FLOPs of one token at ``context``: ``2`` per active weight (a multiply and an
    add; the embedding row is read, not multiplied, and norm weights are left out) plus
    :func:`attention_flops`. A training step costs about three times the forward pass."""
    check_type("card", card, ModelCard)
    check_int("context", context, low=1)
    p = count_parameters(card)
    weights = p.active_without_embedding - p.actives["norms"]
    return 2 * weights + attention_flops(card, context)


def weight_bytes(card: ModelCard, bits: float = 16.0, expert_bits: float | None = None) -> float:
    """Bytes of the weights (:attr:`ParameterCount.total`) at ``bits`` per parameter; with
    ``expert_bits``, the routed experts' weight matrices at that width instead (gpt-oss ships
    them in MXFP4: 4-bit values and one 8-bit scale per 32, 4.25 bits; everything else in
    bf16)."""
    check_type("card", card, ModelCard)
    check_positive("bits", bits)
    if expert_bits is not None:
        check_positive("expert_bits", expert_bits)
    p = count_parameters(card)
    if expert_bits is None:
        return p.total * bits / 8
    return ((p.total - p.expert_weights) * bits + p.expert_weights * expert_bits) / 8


# --------------------------------------------------------------------------------------------
# An independent count


_HF_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM",
               "switch_transformers": "SwitchTransformersForConditionalGeneration"}
_HF_CONFIGS = {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig",
               "olmoe": "OlmoeConfig", "gpt_oss": "GptOssConfig",
               "deepseek_v3": "DeepseekV3Config",
               "switch_transformers": "SwitchTransformersConfig"}


def transformers_count(card: ModelCard) -> int:
    """Parameters of ``transformers``' own model class built from ``card.config`` on the meta
    device (no memory is allocated), plus DeepSeek-V3's selection biases, which transformers
    keeps as buffers. Needs the ``hf`` extra; a large model takes seconds to build (use
    :meth:`ModelCard.with_config` with fewer layers for a quick check)."""
    check_type("card", card, ModelCard)
    try:
        import torch
        import transformers
    except ImportError as err:  # pragma: no cover - the hf extra is installed with the book
        raise ImportError('transformers_count needs transformers: pip install "moe_lib[hf]"'
                          ) from err
    fields = {k: v for k, v in card.config.items() if k != "model_type"}
    config = getattr(transformers, _HF_CONFIGS[card.family])(**fields)
    with torch.device("meta"):
        model = getattr(transformers, _HF_CLASSES[card.family])(config)
    # T5 stacks read the one shared embedding; transformers 5 ties them to it only when
    # tie_word_embeddings is true, so leave their own copies out.
    n = sum(p.numel() for name, p in model.named_parameters()
            if not name.endswith(("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")))
    if card.family == "deepseek_v3":
        n += sum(b.numel() for name, b in model.named_buffers()
                 if name.endswith("e_score_correction_bias"))
    return n
