"""moe_lib.bench.hf_routing: a tiny OLMoE from its config class, read into moe_lib with the same
routing and outputs, and the repeat rates of consecutive tokens with their chance values."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from moe_lib.bench import hf_routing as hf  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return hf.tiny_olmoe(seed=0, num_hidden_layers=2)


def test_tiny_olmoe_reads_bytes_and_its_blocks_become_moe_lib_layers(tiny):
    ids = tiny.encode("def f(x):\n    return x\n")[None]  # [1, S]
    assert ids.max() < 256 and ids.shape[1] == 23
    ins, outs = hf.block_inputs(tiny.model, ids)
    layers = hf.moe_lib_layers(tiny.model)
    assert len(ins) == len(outs) == len(layers) == 2
    for block, layer, x, y in zip(hf.moe_blocks(tiny.model), layers, ins, outs):
        out = layer(x)
        torch.testing.assert_close(out.y, y, atol=1e-6, rtol=1e-5)
        _, _, hf_ids = block.gate(x.reshape(-1, x.shape[-1]))
        assert torch.equal(hf_ids.sort(-1).values, out.routing.expert_ids.sort(-1).values)
        assert layer.config.num_experts == 64 and layer.config.top_k == 8
        assert layer.config.weighting == "raw"  # OLMoE: norm_topk_prob=False


def test_repeat_rates_by_hand():
    ids = torch.tensor([[[0, 1], [0, 2], [2, 1], [4, 5]]])  # [1, 4, 2]
    r = hf.repeat_rates(ids)
    assert r["first"] == pytest.approx(1 / 3)  # first choices 0 0 2 4: one repeat in 3 pairs
    assert r["any"] == pytest.approx(2 / 3)    # {0,1}&{0,2}: 0; {0,2}&{2,1}: 2; {2,1}&{4,5}: -
    u = hf.uniform_repeat_rates(8, 2)
    assert u["first"] == 1 / 8 and u["any"] == pytest.approx(1 - 15 / 28)
    assert hf.uniform_repeat_rates(64, 8)["any"] == pytest.approx(
        1 - math.comb(56, 8) / math.comb(64, 8))


def test_shuffling_keeps_the_loads_and_breaks_the_order():
    runs = torch.arange(4).repeat_interleave(8).reshape(1, 32, 1)  # 0000000011111111...
    assert hf.repeat_rates(runs)["first"] == pytest.approx(28 / 31)
    shuffled = hf.shuffled_repeat_rates(runs, draws=50)
    assert 0.15 < shuffled["first"] < 0.35  # about 7/31 for four equal loads
    constant = torch.zeros(2, 10, 3, dtype=torch.long)
    assert hf.shuffled_repeat_rates(constant)["first"] == pytest.approx(1.0)


@pytest.mark.parametrize("call, error, word", [
    (lambda: hf.tiny_olmoe(seed=-1), ValueError, "seed"),
    (lambda: hf.tiny_olmoe(vocab_size=100), ValueError, "vocab_size"),
    (lambda: hf.moe_blocks(torch.nn.Linear(2, 2)), ValueError, "model"),
    (lambda: hf.block_inputs(torch.nn.Linear(2, 2), torch.ones(2, 3)), TypeError, "ids"),
    (lambda: hf.repeat_rates(torch.zeros(2, 1, 3, dtype=torch.long)), ValueError, "expert_ids"),
    (lambda: hf.uniform_repeat_rates(4, 5), ValueError, "top_k"),
    (lambda: hf.shuffled_repeat_rates(torch.zeros(1, 4, 2, dtype=torch.long), draws=0),
     ValueError, "draws"),
])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call()
