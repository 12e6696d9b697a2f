"""moe_lib.anatomy: the stored configurations, their parameter counts against transformers' own
model classes (built on the meta device, so nothing is allocated) and against the published
figures, FLOPs per token and weight memory."""

from __future__ import annotations

import math

import pytest

from moe_lib import anatomy
from moe_lib.anatomy import ModelCard, Published

STORED = ("deepseek-v3", "gpt-oss-120b", "gpt-oss-20b", "mixtral-8x7b", "olmoe-1b-7b",
          "qwen3-235b-a22b", "qwen3-30b-a3b", "switch-c-2048")


def small(card: ModelCard) -> ModelCard:
    """The same model with two layers (and fewer experts where transformers builds them one by
    one), for a quick build of transformers' class: the counts per layer are the same."""
    if card.family == "switch_transformers":
        return card.with_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                                num_sparse_decoder_layers=2, num_experts=16)
    if card.family == "deepseek_v3":
        return card.with_config(num_hidden_layers=3, first_k_dense_replace=1,
                                n_routed_experts=16)
    if card.family == "gpt_oss":
        return card.with_config(num_hidden_layers=2,
                                layer_types=["sliding_attention", "full_attention"])
    return card.with_config(num_hidden_layers=2)


def test_the_stored_configurations_load_with_their_sources():
    assert tuple(anatomy.names()) == STORED
    for card in anatomy.load_all():
        assert card.family in anatomy.FAMILIES and card.hf_id and len(card.source) > 50
        assert "total" in card.published
        assert ("active" in card.published) == (card.family != "switch_transformers")
        with pytest.raises(TypeError):
            card.config["hidden_size"] = 1  # read-only


@pytest.mark.parametrize("name", STORED)
def test_counts_equal_transformers_model_classes(name):
    pytest.importorskip("transformers")
    card = small(anatomy.load(name))
    assert anatomy.transformers_count(card) == anatomy.count_parameters(card).total


def test_mixtral_by_hand():
    c = anatomy.load("mixtral-8x7b").config
    d, V, L, E, k, w = 4096, 32000, 32, 8, 2, 14336
    assert (c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]) == (d, V, L)
    attention = 2 * d * 32 * 128 + 2 * d * 8 * 128
    layer_total = attention + E * 3 * d * w + d * E + 2 * d
    layer_active = attention + k * 3 * d * w + d * E + 2 * d
    p = anatomy.count_parameters(anatomy.load("mixtral-8x7b"))
    assert p.total == L * layer_total + 2 * V * d + d == 46_702_792_704
    assert p.active == L * layer_active + 2 * V * d + d
    assert p.active_without_embedding == p.active - V * d
    assert p.non_embedding == p.total - 2 * V * d
    assert sum(p.share(c) for c in anatomy.COMPONENTS) == pytest.approx(1.0)


def test_published_totals_and_the_conventions_of_active_counts():
    rounds = {}
    for card in anatomy.load_all():
        p = anatomy.count_parameters(card)
        assert card.published["total"].rounds_to(p.total), card.name
        if "active" in card.published:
            pub = card.published["active"]
            rounds[card.name] = {conv for conv, n in (("with", p.active),
                                                      ("without", p.active_without_embedding))
                                 if pub.rounds_to(n)}
            assert pub.within_one_unit(p.active) or pub.within_one_unit(
                p.active_without_embedding), card.name
    assert rounds == {"mixtral-8x7b": {"with"}, "deepseek-v3": {"without"},
                      "qwen3-235b-a22b": {"with", "without"}, "qwen3-30b-a3b": set(),
                      "gpt-oss-120b": {"without"}, "gpt-oss-20b": {"without"},
                      "olmoe-1b-7b": {"with"}}
    ds = anatomy.load("deepseek-v3")
    p = anatomy.count_parameters(ds)
    assert ds.published["active_readme"].convention == "without_embedding"
    assert ds.published["active_readme"].rounds_to(p.active_without_embedding)
    assert ds.published["mtp"].rounds_to(p.outside["MTP transformer layer"])
    sw = anatomy.load("switch-c-2048")
    n = anatomy.count_parameters(sw).total
    assert sw.published["total_abstract"].rounds_to(n) and sw.published["total"].rounds_to(n)
    assert sw.published["checkpoint"].rounds_to(anatomy.weight_bytes(sw, 16))


def test_gpt_oss_components_and_checkpoint_size():
    for name in ("gpt-oss-120b", "gpt-oss-20b"):
        card = anatomy.load(name)
        p, pub = anatomy.count_parameters(card), card.published
        assert pub["mlp"].rounds_to(p.totals["experts"] + p.totals["routers"])
        assert pub["attention"].rounds_to(p.totals["attention"])
        assert pub["embed_unembed"].rounds_to(p.totals["embedding"] + p.totals["head"])
        assert pub["checkpoint"].rounds_to(anatomy.weight_bytes(card, 16, expert_bits=4.25))
        assert not pub["checkpoint"].rounds_to(anatomy.weight_bytes(card, 16))


def test_moe_layers_and_routing():
    assert anatomy.moe_layers(anatomy.load("deepseek-v3")) == 58
    assert anatomy.moe_layers(anatomy.load("switch-c-2048")) == 30
    q = anatomy.load("qwen3-30b-a3b")
    assert anatomy.moe_layers(q) == 48
    assert anatomy.moe_layers(q.with_config(decoder_sparse_step=2)) == 24
    assert anatomy.moe_layers(q.with_config(mlp_only_layers=[0, 1])) == 46
    dense = anatomy.count_parameters(q.with_config(mlp_only_layers=[0]))
    assert dense.totals["dense_ffn"] == 3 * 2048 * 6144
    assert anatomy.routing(anatomy.load("deepseek-v3")) == {"experts": 256, "top_k": 8,
                                                           "shared": 1}
    assert anatomy.routing(anatomy.load("switch-c-2048"))["top_k"] == 1


def test_flops_per_token_and_sliding_windows():
    card = anatomy.load("qwen3-30b-a3b")
    p = anatomy.count_parameters(card)
    weights = 2 * (p.active_without_embedding - p.actives["norms"])
    assert anatomy.flops_per_token(card, 1) - weights == anatomy.attention_flops(card, 1)
    assert anatomy.attention_flops(card, 4096) == 48 * 2 * 32 * 4096 * 256
    oss = anatomy.load("gpt-oss-20b")
    full, window = 12 * 2 * 64 * 4096 * 128, 12 * 2 * 64 * 128 * 128
    assert anatomy.attention_flops(oss, 4096) == full + window
    mla = anatomy.load("deepseek-v3")
    assert anatomy.attention_flops(mla, 10) == 61 * 2 * 128 * 10 * (192 + 128)


def test_weight_bytes_scale_with_the_bits():
    card = anatomy.load("olmoe-1b-7b")
    n = anatomy.count_parameters(card).total
    assert anatomy.weight_bytes(card) == 2 * n
    assert anatomy.weight_bytes(card, 4) == n / 2
    p = anatomy.count_parameters(card)
    mixed = anatomy.weight_bytes(card, 16, expert_bits=8)
    assert mixed == 2 * (n - p.expert_weights) + p.expert_weights


def test_published_figures_parse_and_round():
    f = Published("12.9B", "somewhere")
    assert f.number == pytest.approx(12.9e9) and f.unit == pytest.approx(1e8)
    assert f.rounds_to(12.88e9) and not f.rounds_to(12.75e9)
    assert f.within_one_unit(12.81e9) and not f.within_one_unit(12.79e9)
    g = Published("60.8GiB", "x")
    assert g.number == pytest.approx(60.8 * 2**30) and g.unit == pytest.approx(0.1 * 2**30)
    assert Published("671B", "x").rounds_to(671.4e9) and not Published("37B", "x").rounds_to(
        37.55e9)
    assert math.isclose(Published("1.6T", "x").number, 1.6e12)


@pytest.mark.parametrize("call, error, word", [
    (lambda: anatomy.load("gpt-5"), ValueError, "name"),
    (lambda: anatomy.load(3), TypeError, "name"),
    (lambda: anatomy.count_parameters("mixtral"), TypeError, "card"),
    (lambda: Published("12.9 B", "x"), ValueError, "value"),
    (lambda: Published("12.9B", "x", convention="both"), ValueError, "convention"),
    (lambda: Published("12.9B", "x").rounds_to(0), ValueError, "count"),
    (lambda: ModelCard("a", "A", "llama", "x/y", {}, "s"), ValueError, "family"),
    (lambda: ModelCard("a", "A", "mixtral", "x/y", {"hidden_size": 8}, "s"), ValueError,
     "config"),
    (lambda: anatomy.flops_per_token(anatomy.load("olmoe-1b-7b"), 0), ValueError, "context"),
    (lambda: anatomy.weight_bytes(anatomy.load("olmoe-1b-7b"), 0), ValueError, "bits"),
    (lambda: anatomy.weight_bytes(anatomy.load("olmoe-1b-7b"), 16, -1), ValueError,
     "expert_bits"),
])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call()
