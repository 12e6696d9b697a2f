"""moe_lib.interop: Hugging Face MoE blocks into moe_lib and back, with identical results.

Tiny blocks are built from each family's config class (no download) with every parameter and
buffer drawn from a seeded generator, in float64. Against the block: router logits, chosen
experts, gate weights, output, input gradient, every parameter gradient (mapped to HF's names),
and the auxiliary losses against Hugging Face's own functions. The maximum absolute difference of
each quantity is recorded in DIFFS; the last test prints them as a table (``pytest -s``).

Precision: Hugging Face computes several routers in float32 even in a float64 block (the
softmax of Mixtral, Qwen2/3-MoE and OLMoE; all of DeepSeek-V3's router; Switch at
router_dtype="float32"; the Mixtral loss function accumulates in float32), while moe_lib's
router runs in float64: those comparisons allow float32 rounding (FLOAT32_TOL). gpt-oss stays in
float64, and so does Switch once its router attribute is set to float64: those are exact to
rounding (EXACT_TOL).
"""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    load_balancing_loss_func as hf_balance_loss,
)
from transformers.models.switch_transformers import (  # noqa: E402
    modeling_switch_transformers as hf_switch,
)

from moe_lib import MoE, losses  # noqa: E402
from moe_lib.interop import (  # noqa: E402
    FAMILIES,
    family_of,
    from_hf,
    state_from_hf,
    state_to_hf,
    to_hf,
)

H, W, B, S = 8, 6, 3, 7  # hidden, expert width, batch, sequence
EXACT_TOL = 1e-12
# float32 rounding of routers that Hugging Face computes in float32: about 80 float32 ulps (eps
# 1.19e-7), since gradients sum rounded terms over tokens and the order of the sum differs between
# CPUs (1.18e-6 relative was seen on one machine where another gave under 1e-6).
FLOAT32_TOL = 1e-5
DIFFS: dict[tuple[str, str], float] = {}

SPECS = {
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock",
                dict(hidden_size=H, intermediate_size=W, num_local_experts=8,
                     num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                  dict(hidden_size=H, moe_intermediate_size=W, shared_expert_intermediate_size=10,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                  dict(hidden_size=H, moe_intermediate_size=W, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeSparseMoeBlock",
              dict(hidden_size=H, intermediate_size=W, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3MoE",
                    dict(hidden_size=H, moe_intermediate_size=W, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True)),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersSparseMLP",
                            dict(d_model=H, d_ff=W, num_experts=4, expert_capacity=S,
                                 router_bias=True, router_jitter_noise=0.0, dropout_rate=0.0,
                                 dense_act_fn="gelu")),
    "gpt_oss": ("GptOssConfig", "GptOssMLP",
                dict(hidden_size=H, intermediate_size=W, num_local_experts=8,
                     num_experts_per_tok=2, swiglu_limit=7.0)),
}
EXACT = {"gpt_oss", "switch_transformers"}  # float64 throughout (Switch: router set to float64)
MIXTRAL_STYLE_LOSS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


def make_block(family, dtype=torch.float64, seed=0, router_float64=True, **overrides):
    """A tiny block of ``family``; every parameter and buffer ~ N(0, 0.5^2) (routers N(0, 1)),
    drawn from a seeded generator (Hugging Face's own init leaves some at zero or empty)."""
    config_name, block_name, fields = SPECS[family]
    fields = {"experts_implementation": "eager", **fields, **overrides}
    config = getattr(transformers, config_name)(**fields)
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    block = getattr(module, block_name)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
            scale = 1.0 if ("gate.weight" in name or "router" in name) else 0.5
            t.copy_(scale * torch.randn(t.shape, generator=g, dtype=torch.float64))
    block.to(dtype)
    if family == "switch_transformers" and router_float64 and dtype == torch.float64:
        # The config allows no float64 router_dtype; the forward reads this attribute.
        block.router.dtype = torch.float64
    return block


def random_input(seed=1, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, S, H, generator=g, dtype=torch.float64)).to(dtype)


def record(case, quantity, actual, expected, tol):
    """Assert ``|actual - expected| <= tol * max(1, max |expected|)`` elementwise (relative to
    the values' scale, for gradients of tens) and keep the largest absolute difference."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (case, quantity, actual.shape, expected.shape)
    diff = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    DIFFS[(case, quantity)] = max(DIFFS.get((case, quantity), 0.0), diff)
    assert diff <= tol * scale, f"{case} {quantity}: {diff:.3g} > {tol:.1g} x {scale:.3g}"


def hf_routing(family, block, x):
    """Hugging Face's router logits ``[T, E]``, chosen experts ``[T, k]``, dense gate weights
    ``[T, E]`` and, for Switch, which tokens capacity kept ``[T]``."""
    T = x.shape[0] * x.shape[1]
    with torch.no_grad():
        if family == "switch_transformers":
            index, probs, logits = block.router(x.clone())
            logits = logits.reshape(T, -1)
            ids, weights = logits.argmax(-1, keepdim=True), probs.reshape(T, 1)
            kept = index.reshape(T, -1).sum(-1) > 0
        else:
            router = block.router if family == "gpt_oss" else block.gate
            logits, weights, ids = router(x.reshape(T, -1))
            kept = None
    gates = torch.zeros(logits.shape, dtype=torch.float64).scatter(1, ids, weights.double())
    return logits, ids, gates, kept


def hf_forward(family, block, x):
    y = block(x)
    return y[0] if family == "gpt_oss" else y


def grads_by_hf_name(module):
    return {n: p.grad if p.grad is not None else torch.zeros_like(p)
            for n, p in module.named_parameters()}


def compare(case, family, block, layer, x, tol):
    """Every quantity of one forward and backward, moe_lib against the block."""
    logits, ids, gates, kept = hf_routing(family, block, x)
    x_h, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_h = hf_forward(family, block, x_h)
    out = layer(x_m)
    r = out.routing
    record(case, "logits", r.logits, logits, tol)
    mismatch = (r.expert_ids.sort(-1).values != ids.sort(-1).values).any(-1)
    record(case, "experts", mismatch.double(), torch.zeros(len(mismatch)), 0)
    record(case, "gates", r.gates(), gates, tol)
    if kept is not None:
        record(case, "kept", r.kept.squeeze(1).double(), kept.double(), 0)
    record(case, "y", out.y, y_h, tol)
    cotangent = torch.randn(y_h.shape, generator=torch.Generator().manual_seed(7),
                            dtype=torch.float64).to(y_h.dtype)
    (y_h * cotangent).sum().backward()
    (out.y * cotangent).sum().backward()
    record(case, "grad x", x_m.grad, x_h.grad, tol)
    mapped = state_to_hf(family, grads_by_hf_name(layer))
    theirs = grads_by_hf_name(block)
    assert set(mapped) == set(theirs)
    for name, g in theirs.items():
        record(case, "grad params", mapped[name], g, tol)
    return out


CASES = [
    ("mixtral", "mixtral", {}),
    ("qwen2_moe", "qwen2_moe", {}),
    ("qwen2_moe norm", "qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", "qwen3_moe", {}),
    ("qwen3_moe raw", "qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", "olmoe", {}),
    ("olmoe norm", "olmoe", {"norm_topk_prob": True}),
    ("deepseek_v3", "deepseek_v3", {}),
    ("deepseek_v3 raw", "deepseek_v3", {"norm_topk_prob": False, "routed_scaling_factor": 1.0}),
    ("switch_transformers", "switch_transformers", {}),
    ("switch relu, no bias", "switch_transformers", {"dense_act_fn": "relu",
                                                     "router_bias": False}),
    ("gpt_oss", "gpt_oss", {}),
]


@pytest.mark.parametrize("case,family,overrides", CASES, ids=[c[0] for c in CASES])
def test_float64_block_and_layer_agree(case, family, overrides):
    block = make_block(family, **overrides)
    layer = from_hf(block)
    assert family_of(block) == family
    assert layer.experts.w_in.dtype == torch.float64
    tol = EXACT_TOL if family in EXACT else FLOAT32_TOL
    compare(case, family, block, layer, random_input(), tol)


def test_layer_is_also_built_by_the_door_on_moe():
    block = make_block("qwen2_moe")
    layer = MoE.from_hf(block)
    assert layer.config == from_hf(block).config
    assert layer.config.n_shared == 1 and layer.config.shared_gate
    assert layer.config.d_shared == 10 and layer.config.weighting == "raw"
    again = layer.to_hf("qwen2_moe")
    assert type(again).__name__ == "Qwen2MoeSparseMoeBlock"


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_cuda_block_gives_a_cuda_layer(family):
    block = make_block(family).cuda()
    layer = from_hf(block)
    assert layer.experts.w_in.device == block.experts.gate_up_proj.device
    assert to_hf(layer, family).experts.down_proj.is_cuda
    x = random_input().cuda()
    y = layer(x).y
    assert y.is_cuda
    record(f"{family} cuda", "y", y, hf_forward(family, block, x), FLOAT32_TOL)


def test_switch_with_the_default_float32_router():
    block = make_block("switch_transformers", router_float64=False)
    layer = from_hf(block)
    assert layer.router.gate.weight.dtype == torch.float64
    compare("switch router float32", "switch_transformers", block, layer, random_input(),
            FLOAT32_TOL)
    assert block.router.classifier.weight.dtype == torch.float32  # HF converted it in place


def test_switch_capacity_drops_the_same_tokens():
    block = make_block("switch_transformers", expert_capacity=2)
    with torch.no_grad():
        block.router.classifier.bias[0] += 4.0  # most tokens choose expert 0
    layer = from_hf(block)
    assert (layer.config.capacity, layer.config.capacity_per) == (2, "sequence")
    out = compare("switch dropping", "switch_transformers", block, layer, random_input(),
                  EXACT_TOL)
    assert out.routing.dropped > B  # several tokens of each sequence were dropped
    dropped = ~out.routing.kept.squeeze(1)
    assert (out.y.reshape(-1, H)[dropped] == 0).all()  # a dropped token gets nothing


def test_deepseek_correction_bias_changes_choices():
    block = make_block("deepseek_v3")
    layer = from_hf(block)
    bias = block.gate.e_score_correction_bias
    assert bias.abs().min() > 0
    torch.testing.assert_close(layer.router.selection_bias, bias, rtol=0, atol=0)
    x = random_input()
    _, ids, _, _ = hf_routing("deepseek_v3", block, x)
    with torch.no_grad():
        bias.zero_()
    _, ids_unbiased, _, _ = hf_routing("deepseek_v3", block, x)
    assert (ids.sort(-1).values != ids_unbiased.sort(-1).values).any()
    assert layer.config.n_group == 4 and layer.config.routed_scaling_factor == 2.5


def test_gpt_oss_with_active_clamps():
    block = make_block("gpt_oss", swiglu_limit=1.0)
    layer = from_hf(block)
    assert layer.config.swiglu_limit == 1.0
    x = random_input(scale=4.0)
    with torch.no_grad():  # both clamps bind for some of the pre-activations
        gate_up = torch.einsum("th,ehf->etf", x.reshape(-1, H), block.experts.gate_up_proj)
        gate_up = gate_up + block.experts.gate_up_proj_bias[:, None]
    assert (gate_up[..., ::2] > 1.0).any() and (gate_up[..., ::2] < 1.0).any()
    assert (gate_up[..., 1::2].abs() > 1.0).any() and (gate_up[..., 1::2].abs() < 1.0).any()
    compare("gpt_oss clamps", "gpt_oss", block, layer, x, EXACT_TOL)


def test_gpt_oss_interleave_is_a_column_permutation():
    block = make_block("gpt_oss")
    layer = from_hf(block)
    gu = block.experts.gate_up_proj
    torch.testing.assert_close(layer.experts.w_in[..., :W], gu[..., ::2], rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w_in[..., W:], gu[..., 1::2], rtol=0, atol=0)
    back = state_to_hf("gpt_oss", {"experts.w_in": layer.experts.w_in})
    torch.testing.assert_close(back["experts.gate_up_proj"], gu, rtol=0, atol=0)


# ----------------------------------------------------------------------------- aux losses


@pytest.mark.parametrize("family", MIXTRAL_STYLE_LOSS)
def test_balance_loss_matches_hugging_face(family):
    blocks = [make_block(family, seed=s) for s in (0, 1)]
    k = blocks[0].router.top_k if family == "gpt_oss" else blocks[0].gate.top_k
    E = SPECS[family][2].get("num_experts", SPECS[family][2].get("num_local_experts"))
    layers = [from_hf(b, balance_loss="switch") for b in blocks]
    xs = [random_input(seed=s) for s in (1, 2)]
    logits = [hf_routing(family, b, x)[0] for b, x in zip(blocks, xs)]
    outs = [layer(x) for layer, x in zip(layers, xs)]
    # HF's loss function accumulates in float32
    record(family, "aux loss", outs[0].losses["switch"], hf_balance_loss((logits[0],), E, k),
           FLOAT32_TOL)
    record(family, "aux loss", losses.switch_loss(outs[0].routing),
           hf_balance_loss((logits[0],), E, k), FLOAT32_TOL)
    record(family, "pooled loss", losses.pooled_switch_loss([o.routing for o in outs]),
           hf_balance_loss(tuple(logits), E, k), FLOAT32_TOL)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    masked = [layer(x, mask=mask) for layer, x in zip(layers, xs)]
    record(family, "masked loss", masked[0].losses["switch"],
           hf_balance_loss((logits[0],), E, k, attention_mask=mask), FLOAT32_TOL)
    record(family, "masked loss", losses.pooled_switch_loss([o.routing for o in masked]),
           hf_balance_loss(tuple(logits), E, k, attention_mask=mask), FLOAT32_TOL)
    assert masked[0].routing.num_tokens == int(mask.sum())


def test_switch_losses_match_hugging_face():
    block = make_block("switch_transformers", expert_capacity=2)
    layer = from_hf(block, balance_loss="switch_per_sequence", z_loss_coef=1e-3)
    x = random_input()
    with torch.no_grad():
        _, _, logits = block.router(x.clone())  # [B, S, E]
    out = layer(x)
    # HF's expert mask is float32, so its fractions f_i are float32
    expected = hf_switch.load_balancing_loss_func(logits.softmax(-1), logits.argmax(-1))
    record("switch_transformers", "aux loss", out.losses["switch"], expected, FLOAT32_TOL)
    record("switch_transformers", "z loss", out.losses["z"],
           hf_switch.router_z_loss_func(logits), EXACT_TOL)
    torch.testing.assert_close(out.aux_loss, 1e-2 * out.losses["switch"] + 1e-3 * out.losses["z"])


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("family", list(SPECS))
def test_bf16_block_gives_a_bf16_layer(family):
    block = make_block(family, dtype=torch.bfloat16)
    layer = from_hf(block)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    x = random_input(dtype=torch.bfloat16)
    out = layer(x)
    assert out.y.dtype == torch.bfloat16 and torch.isfinite(out.y).all()
    _, ids, _, _ = hf_routing(family, block, x)
    with torch.no_grad():
        y_h = hf_forward(family, block, x)
    # HF's bf16 logits vs moe_lib's float32 ones can flip near-ties: compare where both agree
    same = (out.routing.expert_ids.sort(-1).values == ids.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.75
    record(f"{family} bf16", "y", out.y.reshape(-1, H)[same], y_h.reshape(-1, H)[same], 0.1)


def test_bf16_deepseek_keeps_its_float32_correction_bias():
    block = make_block("deepseek_v3", dtype=torch.bfloat16)
    bias = block.gate.e_score_correction_bias
    block.gate.e_score_correction_bias = (bias.float() + 1e-3).contiguous()  # not bf16-exact
    layer = from_hf(block)
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert layer.router.selection_bias.dtype == torch.float32
    torch.testing.assert_close(layer.router.selection_bias, block.gate.e_score_correction_bias,
                               rtol=0, atol=0)
    x = random_input(dtype=torch.bfloat16)
    logits, ids, gates, _ = hf_routing("deepseek_v3", block, x)
    r = layer(x).routing  # both routers run in float32 on the same bf16 values
    record("deepseek_v3 bf16", "logits", r.logits, logits, 0)
    record("deepseek_v3 bf16", "experts", (r.expert_ids.sort(-1).values
                                           != ids.sort(-1).values).any(-1).double(),
           torch.zeros(B * S), 0)
    record("deepseek_v3 bf16", "gates", r.gates(), gates, 1e-6)
    again = to_hf(layer, "deepseek_v3")
    assert again.gate.e_score_correction_bias.dtype == torch.float32
    assert again.experts.gate_up_proj.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", list(SPECS))
def test_round_trip_from_block(family):
    block = make_block(family)
    layer = from_hf(block)
    block2 = to_hf(layer, family)
    assert type(block2) is type(block)
    theirs, ours = block.state_dict(), block2.state_dict()
    assert set(theirs) == set(ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), rtol=0, atol=0)
    layer2 = from_hf(block2)
    assert layer2.config == layer.config
    for (n1, t1), (n2, t2) in zip(layer.state_dict().items(), layer2.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t2, t1, rtol=0, atol=0)


LAYERS = {
    "mixtral": dict(top_k=2),
    "qwen2_moe": dict(top_k=2, weighting="raw", n_shared=1, d_shared=5, shared_gate=True),
    "qwen3_moe": dict(top_k=3),
    "olmoe": dict(top_k=2, weighting="raw"),
    "deepseek_v3": dict(top_k=3, score="sigmoid", n_group=4, topk_group=2, selection_bias=True,
                        routed_scaling_factor=2.5, n_shared=2, d_shared=W),
    "switch_transformers": dict(top_k=1, expert="relu", weighting="raw", router_bias=True,
                                capacity=3, capacity_per="sequence"),
    "gpt_oss": dict(top_k=2, expert="clamped_swiglu", expert_bias=True, router_bias=True,
                    weighting="topk_softmax", swiglu_limit=2.0),
}


def random_layer(family, **extra):
    layer = MoE(H, W, 8, **{**LAYERS[family], **extra}).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in itertools.chain(layer.parameters(), layer.buffers()):
            if t.is_floating_point():
                t.copy_(0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("family", list(SPECS))
def test_round_trip_from_layer(family):
    layer = random_layer(family)
    block = to_hf(layer, family)
    layer2 = from_hf(block)
    assert layer2.config == layer.config
    for (n1, t1), (n2, t2) in zip(layer.state_dict().items(), layer2.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(t2, t1, rtol=0, atol=0)
    x = random_input()
    torch.testing.assert_close(layer2(x).y, layer(x).y, rtol=0, atol=0)
    tol = EXACT_TOL if family == "gpt_oss" else FLOAT32_TOL  # HF's Switch router is float32
    record(f"{family} to_hf", "y", hf_forward(family, block, x), layer(x).y, tol)


def test_to_hf_keeps_dtype_mode_and_losses():
    layer = random_layer("mixtral", balance_loss="switch", balance_coef=0.02).eval()
    block = layer.to_hf("mixtral")
    assert not block.training and block.experts.gate_up_proj.dtype == torch.float64
    config = block.experts.config  # the config to_hf made from the layer's sizes
    assert (config.hidden_size, config.intermediate_size, config.num_local_experts) == (H, W, 8)
    assert config.router_aux_loss_coef == 0.02 and config.output_router_logits
    layer32 = MoE(H, W, 8, **LAYERS["gpt_oss"])
    block32 = to_hf(layer32, "gpt_oss")
    assert block32.experts.down_proj.dtype == torch.float32 and block32.training
    assert block32.experts.limit == 2.0 and block32.experts.alpha == 1.702


def test_zero_biases_express_a_layer_without_them():
    layer = random_layer("gpt_oss", expert_bias=False, router_bias=False)
    block = to_hf(layer, "gpt_oss")
    assert block.router.bias.abs().max() == 0 and block.experts.down_proj_bias.abs().max() == 0
    x = random_input()
    record("gpt_oss to_hf", "y", hf_forward("gpt_oss", block, x), layer(x).y, EXACT_TOL)
    plain = random_layer("deepseek_v3", selection_bias=False)
    assert to_hf(plain, "deepseek_v3").gate.e_score_correction_bias.abs().max() == 0


# ----------------------------------------------------------------------------- refusals


def refused(exc, word, call):
    with pytest.raises(exc) as info:
        call()
    assert word in str(info.value), str(info.value)
    return str(info.value)


BLOCK_REFUSALS = [
    ("mixtral jitter", lambda: make_block("mixtral", router_jitter_noise=0.1), {},
     ValueError, "router_jitter_noise"),
    ("mixtral gelu", lambda: make_block("mixtral", hidden_act="gelu"), {}, ValueError,
     "hidden_act='gelu'"),
    ("qwen2 gelu", lambda: make_block("qwen2_moe", hidden_act="gelu"), {}, ValueError,
     "hidden_act='gelu'"),
    ("qwen3 gelu", lambda: make_block("qwen3_moe", hidden_act="relu"), {}, ValueError,
     "hidden_act='relu'"),
    ("olmoe gelu", lambda: make_block("olmoe", hidden_act="gelu_new"), {}, ValueError,
     "hidden_act='gelu_new'"),
    ("deepseek gelu", lambda: make_block("deepseek_v3", hidden_act="gelu"), {}, ValueError,
     "hidden_act='gelu'"),
    ("qwen2 shared width 0", lambda: make_block("qwen2_moe", shared_expert_intermediate_size=0),
     {}, ValueError, "shared_expert_intermediate_size=0"),
    ("deepseek no shared", lambda: make_block("deepseek_v3", n_shared_experts=0), {},
     ValueError, "n_shared_experts=0"),
    ("switch capacity 0", lambda: make_block("switch_transformers", expert_capacity=0), {},
     ValueError, "expert_capacity=0"),
    ("deepseek groups of one", lambda: make_block("deepseek_v3", n_group=8, topk_group=4), {},
     ValueError, "n_group=8"),
    ("switch gelu_new", lambda: make_block("switch_transformers", dense_act_fn="gelu_new"), {},
     ValueError, "dense_act_fn='gelu_new'"),
    ("switch gelu_python", lambda: make_block("switch_transformers",
                                              dense_act_fn="gelu_python"), {},
     ValueError, "dense_act_fn='gelu_python'"),
    ("switch dropout", lambda: make_block("switch_transformers", dropout_rate=0.1), {},
     ValueError, "dropout_rate"),
    ("switch jitter", lambda: make_block("switch_transformers", router_jitter_noise=0.01), {},
     ValueError, "router_jitter_noise"),
    ("switch bf16 router", lambda: make_block("switch_transformers", router_float64=False,
                                              router_dtype="bfloat16"), {},
     ValueError, "router_dtype"),
    ("experts implementation", lambda: make_block("qwen3_moe",
                                                  experts_implementation="batched_mm"), {},
     ValueError, "experts_implementation"),
    ("unknown option", lambda: make_block("mixtral"), {"capacity_factor": 1.0}, TypeError,
     "capacity_factor"),
    ("bad jitter", lambda: make_block("mixtral"), {"jitter": "on"}, ValueError, "jitter"),
    ("jitter without jitter", lambda: make_block("olmoe"), {"jitter": "off"}, ValueError,
     "jitter"),
    ("dropout option", lambda: make_block("gpt_oss"), {"drop_expert_dropout": True},
     ValueError, "drop_expert_dropout"),
    ("dropout option type", lambda: make_block("switch_transformers"),
     {"drop_expert_dropout": "yes"}, TypeError, "drop_expert_dropout"),
    ("not a block", lambda: torch.nn.Linear(3, 3), {}, TypeError, "Linear"),
    ("experts alone", lambda: make_block("mixtral").experts, {}, TypeError, "MixtralExperts"),
    ("not a module", lambda: {"gate.weight": torch.zeros(2, 2)}, {}, TypeError, "block"),
]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
@pytest.mark.parametrize("case,build,options,exc,word", BLOCK_REFUSALS,
                         ids=[c[0] for c in BLOCK_REFUSALS])
def test_from_hf_refuses(case, build, options, exc, word):
    def call():
        make = build()
        return from_hf(make, **options)

    refused(exc, word, call)


def test_refusals_name_the_keyword_that_accepts_the_block():
    msg = refused(ValueError, "jitter='router_only'",
                  lambda: from_hf(make_block("switch_transformers", router_jitter_noise=0.01)))
    assert "in place" in msg and "experts' input" in msg
    msg = refused(ValueError, "drop_expert_dropout=True",
                  lambda: from_hf(make_block("switch_transformers", dropout_rate=0.1)))
    mixtral = make_block("mixtral", router_jitter_noise=0.1)
    assert from_hf(mixtral, jitter="router_only").config.jitter_eps == 0.1
    assert from_hf(mixtral, jitter="off").config.jitter_eps == 0.0
    switch = make_block("switch_transformers", dropout_rate=0.1, router_jitter_noise=0.01)
    layer = from_hf(switch, drop_expert_dropout=True, jitter="router_only")
    assert layer.config.jitter_eps == 0.01
    switch.eval()  # dropout and jitter are off in eval: then the block and layer agree
    layer.eval()
    compare("switch dropout eval", "switch_transformers", switch, layer, random_input(),
            EXACT_TOL)


LAYER_REFUSALS = [
    ("mixtral", dict(expert_bias=True), "expert_bias"),
    ("mixtral", dict(router_bias=True), "router_bias"),
    ("mixtral", dict(weighting="raw"), "weighting"),
    ("mixtral", dict(capacity_factor=1.0), "capacity_factor"),
    ("olmoe", dict(capacity=4), "capacity"),
    ("qwen3_moe", dict(n_shared=1), "n_shared"),
    ("qwen3_moe", dict(score="sigmoid"), "score"),
    ("qwen3_moe", dict(n_group=4, topk_group=2), "n_group"),
    ("qwen3_moe", dict(selection_bias=True), "selection_bias"),
    ("qwen3_moe", dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    ("qwen3_moe", dict(jitter_eps=0.1), "jitter_eps"),
    ("qwen3_moe", dict(router="noisy_topk"), "router"),
    ("qwen3_moe", dict(router="expert_choice", capacity_factor=1.0), "router"),
    ("qwen3_moe", dict(expert="gelu"), "expert"),
    ("qwen2_moe", dict(), "n_shared"),
    ("qwen2_moe", dict(n_shared=1), "shared_gate"),
    ("deepseek_v3", dict(score="sigmoid", n_shared=1, shared_gate=True), "shared_gate"),
    ("deepseek_v3", dict(score="sigmoid", n_shared=1, d_shared=4), "d_shared"),
    ("deepseek_v3", dict(n_shared=1), "score"),
    ("deepseek_v3", dict(score="sigmoid", n_shared=1, n_group=8, topk_group=4), "n_group"),
    ("switch_transformers", dict(top_k=1, expert="relu", capacity=2), "capacity_per"),
    ("switch_transformers", dict(top_k=1, expert="relu", capacity_factor=1.0), "capacity"),
    ("switch_transformers", dict(top_k=2, expert="relu", capacity=2, capacity_per="sequence"),
     "top_k"),
    ("switch_transformers", dict(top_k=1, capacity=2, capacity_per="sequence"), "expert"),
    ("gpt_oss", dict(), "expert"),
    ("gpt_oss", dict(expert="clamped_swiglu", weighting="raw"), "weighting"),
    ("mixtral", dict(balance_loss="sequence_wise"), "balance_loss"),
    ("mixtral", dict(z_loss_coef=1e-3), "z_loss_coef"),
    ("deepseek_v3", dict(score="sigmoid", n_shared=1, balance_loss="switch"), "balance_loss"),
    ("switch_transformers", dict(top_k=1, expert="relu", capacity=2, capacity_per="sequence",
                                 balance_loss="switch"), "balance_loss"),
]


@pytest.mark.parametrize("family,options,word", LAYER_REFUSALS,
                         ids=[f"{c[0]}-{c[2]}" for c in LAYER_REFUSALS])
def test_to_hf_refuses(family, options, word):
    layer = MoE(H, W, 8, **options)
    msg = refused(ValueError, f"{word}=", lambda: to_hf(layer, family))
    assert family in msg


def test_to_hf_drops_losses_on_request():
    layer = random_layer("mixtral", balance_loss="sequence_wise", z_loss_coef=1e-3)
    block = to_hf(layer, "mixtral", drop_losses=True)
    assert not block.experts.config.output_router_logits


@pytest.mark.parametrize("call,exc,word", [
    (lambda: to_hf(torch.nn.Linear(2, 2), "mixtral"), TypeError, "layer"),
    (lambda: to_hf(MoE(H, W, 8), "llama"), ValueError, "family"),
    (lambda: to_hf(MoE(H, W, 8), "mixtral", drop_losses=1), TypeError, "drop_losses"),
    (lambda: state_to_hf("mixtral", {"experts.b_in": torch.zeros(2)}), ValueError,
     "experts.b_in"),
    (lambda: state_to_hf("mixtral", [torch.zeros(2)]), TypeError, "state"),
    (lambda: state_to_hf("mixtral", {"experts.w_in": 1.0}), TypeError, "experts.w_in"),
    (lambda: state_from_hf("qwen2_moe", {"shared_expert.gate_proj.weight": torch.zeros(2, 2)}),
     ValueError, "shared_expert.up_proj.weight"),
    (lambda: state_from_hf("olmoe", {"gate.bias": torch.zeros(2)}), ValueError, "gate.bias"),
    (lambda: state_from_hf("phi", {}), ValueError, "family"),
    (lambda: family_of("MixtralSparseMoeBlock"), TypeError, "block"),
])
def test_bad_arguments(call, exc, word):
    refused(exc, word, call)


@pytest.mark.slow
def test_importing_moe_lib_does_not_import_transformers():
    code = ("import sys, moe_lib, moe_lib.interop, moe_lib.layer\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_every_family_is_tested():
    assert set(SPECS) == set(FAMILIES) == set(LAYERS)


def test_print_max_differences():
    """The largest |moe_lib - Hugging Face| per family and quantity (run with -s to see it)."""
    assert DIFFS, "run the whole file: the comparisons above fill DIFFS"
    cases = sorted({c for c, _ in DIFFS})
    quantities = sorted({q for _, q in DIFFS}, key=lambda q: (
        ["logits", "experts", "gates", "kept", "y", "grad x", "grad params", "aux loss",
         "pooled loss", "masked loss", "z loss"] + [q]).index(q))
    width = max(len(c) for c in cases)
    lines = [" " * width + " | " + " | ".join(f"{q:>11}" for q in quantities)]
    for c in cases:
        cells = [f"{DIFFS[(c, q)]:11.1e}" if (c, q) in DIFFS else " " * 10 + "-"
                 for q in quantities]
        lines.append(f"{c:<{width}} | " + " | ".join(cells))
    print("\nmax |moe_lib - Hugging Face| (experts, kept: tokens that differ)")
    print("\n".join(lines))
