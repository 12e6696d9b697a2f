"""moe_lib.bench.lm_experts: chance and measured repeat rates (Mixtral's table 5), the Switch
sweep's models, runs with a clock, the command line; bad input is refused before any work."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch

from moe_lib.bench import lm_experts, moe_vs_dense
from moe_lib.models import Transformer, ffn_parameter_counts
from tests.helpers import tiny_lm_settings


def test_chance_repeats_are_mixtrals_reference_values():
    first, shared = lm_experts.chance_repeats(8, 2)
    assert first == 1 / 8
    assert shared == pytest.approx(1 - (6 / 8) * (5 / 7))  # "about 46%" in Mixtral's table 5
    assert lm_experts.chance_repeats(16, 1) == (1 / 16, pytest.approx(1 / 16))
    assert lm_experts.chance_repeats(4, 4) == (0.25, 1.0)
    # by simulation: two independent uniform top-2 sets of 8 experts
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20000, 8, generator=g).topk(2).indices
    b = torch.rand(20000, 8, generator=g).topk(2).indices
    overlap = (a[:, :, None] == b[:, None, :]).flatten(1).any(1).float().mean().item()
    assert overlap == pytest.approx(1 - comb(6, 2) / comb(8, 2), abs=0.01)


def test_consecutive_repeats_counts_pairs_inside_each_sequence():
    # two sequences of 3 tokens, k = 2: pairs (0,1), (1,2) of each; never across sequences
    ids = torch.tensor([[0, 1], [0, 2], [3, 4],     # seq 0: first same; then {0,2} vs {3,4}: no
                        [5, 6], [6, 5], [6, 7]])    # seq 1: first differs but shared; then same
    first, shared = lm_experts.consecutive_repeats(ids, 3)
    assert first == pytest.approx(2 / 4)
    assert shared == pytest.approx(3 / 4)
    assert lm_experts.consecutive_repeats(ids[:, :1], 3) == (0.5, 0.5)  # k = 1: the same rate


def test_switch_models_use_dense_actives_ffn_per_token():
    s = tiny_lm_settings()
    cfgs = lm_experts.model_configs(s, (2, 4))
    assert list(cfgs) == [*moe_vs_dense.MODELS, "switch_E2", "switch_E4"]
    dense = ffn_parameter_counts(Transformer(cfgs["dense_active"]))
    for n in (2, 4):
        moe = cfgs[f"switch_E{n}"].moe
        assert (moe.num_experts, moe.top_k, moe.weighting) == (n, 1, "raw")
        assert moe.capacity_factor is None
        counts = ffn_parameter_counts(Transformer(cfgs[f"switch_E{n}"]))
        router = s.n_layers * s.d_model * n
        assert counts["active"] == dense["active"] + router
        assert counts["total"] == n * dense["total"] + router


def test_run_records_curves_clocks_shares_and_repeats():
    s = tiny_lm_settings(steps=4)
    kept = {}
    runs = lm_experts.run(s, [0], experts=(2,), eval_every=2, progress=False,
                          models=("dense_active", "switch_E2", "moe"), keep=kept)
    by = {r["model"]: r for r in runs}
    assert [r["model"] for r in runs] == ["dense_active", "switch_E2", "moe"]
    assert set(kept) == {("dense_active", 0), ("switch_E2", 0), ("moe", 0)}
    for r in runs:
        c = r["curve"]
        assert c["step"] == [0, 2, 4] and r["val_loss"] == c["val_loss"][-1]
        assert c["cpu_s"][0] == 0.0 and c["cpu_s"] == sorted(c["cpu_s"])
        assert c["wall_s"] == sorted(c["wall_s"])
    assert "shares" not in by["dense_active"] and by["dense_active"]["num_experts"] == 1
    shares = torch.tensor(by["moe"]["shares"])  # [intervals, layers, E]
    assert shares.shape == (2, s.n_layers, s.num_experts)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, s.n_layers))
    rep = by["switch_E2"]["repeats"]
    assert len(rep["first"]) == s.n_layers and rep["first"] == rep["shared"]  # top-1
    assert all(0 <= v <= 1 for v in rep["first"] + by["moe"]["repeats"]["shared"])
    # same seed, same batches, same initial weights: moe_vs_dense's runs, with a clock added
    ref = {r["model"]: r for r in moe_vs_dense.run(s, [0], progress=False)}
    for name in ("dense_active", "moe"):
        assert by[name]["val_loss"] == pytest.approx(ref[name]["val_loss"], abs=1e-6)
    out = lm_experts.summary(runs)
    assert out["seeds"] == [0] and out["moe_val_loss"] == by["moe"]["val_loss"]
    assert lm_experts.format_runs(runs).splitlines()[0].split()[0] == "model"


def test_main_writes_the_file_and_prints_json_last(tmp_path, capsys):
    out = tmp_path / "r.json"
    lm_experts.main(["--steps", "2", "--eval-every", "1", "--seeds", "0", "--experts", "2",
                     "--no-progress", "--device", "cpu", "--out", str(out), "--set",
                     "d_model=16", "n_layers=1", "n_heads=2", "h=8", "seq_len=16", "batch=4",
                     "max_bytes=20000", "eval_batches=2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    stored = json.loads(out.read_text())
    assert stored["summary"] == summary and set(stored) == {"meta", "runs", "summary"}
    assert stored["meta"]["experts"] == [2] and stored["meta"]["eval_every"] == 1
    assert stored["meta"]["threads"] == 1 and stored["meta"]["settings"]["steps"] == 2


@pytest.mark.parametrize("argv", [["--seeds", "-1"], ["--experts", "1"], ["--eval-every", "0"],
                                  ["--threads", "0"], ["--set", "nope=1"], ["--steps", "0"]])
def test_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as err:
        lm_experts.main(["--no-progress", *argv])
    assert err.value.code == 2


S = tiny_lm_settings()
BAD = [
    (lambda: lm_experts.chance_repeats(0, 1), ValueError, "num_experts"),
    (lambda: lm_experts.chance_repeats(4, 5), ValueError, "top_k"),
    (lambda: lm_experts.consecutive_repeats(torch.zeros(6, 2), 3), TypeError, "expert_ids"),
    (lambda: lm_experts.consecutive_repeats(torch.zeros(7, 2, dtype=torch.long), 3), ValueError,
     "seq_len"),
    (lambda: lm_experts.consecutive_repeats(torch.zeros(6, 2, dtype=torch.long), 1), ValueError,
     "seq_len"),
    (lambda: lm_experts.model_configs("quick"), TypeError, "settings"),
    (lambda: lm_experts.model_configs(S, (1, 2)), ValueError, "experts"),
    (lambda: lm_experts.model_configs(S, (2, 2)), ValueError, "distinct"),
    (lambda: lm_experts.run(S, [0], models=("nope",), progress=False), ValueError, "models"),
    (lambda: lm_experts.run(S, [], progress=False), ValueError, "seeds"),
    (lambda: lm_experts.run(S, [0], eval_every=0, progress=False), ValueError, "eval_every"),
    (lambda: lm_experts.run(S, [0], keep=[], progress=False), TypeError, "keep"),
    (lambda: lm_experts.summary([]), ValueError, "results"),
    (lambda: lm_experts.summary([{"model": "moe"}]), ValueError, "results"),
    (lambda: lm_experts.format_runs("runs"), TypeError, "results"),
]


@pytest.mark.parametrize("call, exc, word", BAD)
def test_bad_input_is_refused_with_a_message_that_names_it(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
