"""moe_lib.upcycle: an MoE layer of copies of a dense FFN computes what the FFN computed when its
gate weights sum to one; training pulls the copies apart; the dense model is left alone."""

from __future__ import annotations

import pytest
import torch

from moe_lib import MoE
from moe_lib.bench.upcycling import expert_spread
from moe_lib.experts import FeedForward
from moe_lib.models import Transformer, TransformerConfig
from moe_lib.upcycle import upcycle, upcycle_model, upcycled_equals_dense


def dense_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layers=2, n_heads=2, d_hidden=24, ffn="dense", seq_len=12, **kw)
    return Transformer(TransformerConfig(**cfg))


@pytest.mark.parametrize("kind, bias, options", [
    ("swiglu", False, dict(top_k=2)),
    ("relu", False, dict(top_k=3, weighting="renormalize")),
    ("gelu", True, dict(top_k=2, weighting="topk_softmax")),
    ("clamped_swiglu", True, dict(top_k=2, weighting="topk_softmax")),
    ("swiglu", False, dict(top_k=1, weighting="renormalize")),
])
def test_upcycled_layer_computes_the_ffn(kind, bias, options):
    torch.manual_seed(0)
    ffn = FeedForward(8, 6, kind, bias=bias).double()
    layer = upcycle(ffn, 4, **options)
    x = torch.randn(20, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x).y, ffn(x))
    for e in range(4):
        assert torch.equal(layer.experts.w_in[e], ffn.w_in)
        assert torch.equal(layer.experts.w_out[e], ffn.w_out)
    assert layer.experts.w_in.dtype == torch.float64 and layer.config.expert == kind


def test_raw_weights_scale_the_ffn_by_the_chosen_probability():
    torch.manual_seed(0)
    ffn = FeedForward(8, 6, "relu")
    layer = upcycle(ffn, 4, top_k=1, weighting="raw")
    x = torch.randn(10, 8)
    out = layer(x)
    torch.testing.assert_close(out.y, out.routing.weights[:, :1] * ffn(x))


def test_upcycle_model_keeps_the_logits_and_leaves_the_dense_model_alone():
    dense = dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    up = upcycle_model(dense, 4, top_k=2, balance_loss="switch")
    idx = torch.randint(0, 256, (3, 12))
    assert upcycled_equals_dense(dense, up, idx) < 1e-5
    assert up.cfg.ffn == "moe" and up.cfg.moe.num_experts == 4 and up.cfg.moe.d_hidden == 24
    assert len(up.moe_layers()) == 2 and dense.cfg.ffn == "dense"
    # one step of training: the copies move apart, the dense model does not move
    opt = torch.optim.SGD(up.parameters(), lr=0.1)
    out = up(idx)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    opt.step()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    assert all(expert_spread(m) > 0 for m in up.moe_layers())
    assert upcycled_equals_dense(dense, up, idx) > 1e-4


def test_upcycling_some_layers_keeps_the_dense_config():
    dense = dense_model()
    up = upcycle_model(dense, 4, layers=[1], top_k=2)
    assert isinstance(up.blocks[1].ffn, MoE) and isinstance(up.blocks[0].ffn, FeedForward)
    assert up.cfg.ffn == "dense"
    assert upcycled_equals_dense(dense, up, torch.randint(0, 256, (2, 12))) < 1e-5


def test_expert_spread_is_zero_for_copies():
    layer = upcycle(FeedForward(8, 6, "swiglu"), 3, top_k=2)
    assert expert_spread(layer) < 1e-6  # the mean of equal copies, up to rounding


@pytest.mark.parametrize("call, error, word", [
    (lambda: upcycle(torch.nn.Linear(2, 2), 4), TypeError, "ffn"),
    (lambda: upcycle(FeedForward(8, 6), 0), ValueError, "num_experts"),
    (lambda: upcycle(FeedForward(8, 6), 4, d_hidden=3), ValueError, "d_hidden"),
    (lambda: upcycle(FeedForward(8, 6), 4, expert="relu"), ValueError, "expert"),
    (lambda: upcycle_model("model", 4), TypeError, "model"),
    (lambda: upcycle_model(dense_model(), 4, layers=[2]), ValueError, "layers"),
    (lambda: upcycle_model(dense_model(), 4, layers=[0, 0]), ValueError, "layers"),
    (lambda: upcycle_model(upcycle_model(dense_model(), 2, top_k=2), 4), ValueError, "dense"),
    (lambda: upcycled_equals_dense(dense_model(), dense_model(), torch.ones(3)), ValueError,
     "idx"),
])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call()
