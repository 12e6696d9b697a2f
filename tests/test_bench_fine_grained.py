"""moe_lib.bench.fine_grained: fine-grained and shared-expert variants of chapter 8's language
model (chapter 9), at tiny sizes. Nothing here compares losses or timings: only structure,
parameter counts and the arithmetic of the summary are checked."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from moe_lib import MoE
from moe_lib.bench import fine_grained as fg
from moe_lib.bench import results
from moe_lib.models import Transformer, ffn_parameter_counts
from tests.helpers import tiny_lm_settings

STORED = "fine_grained_quick_1000steps_cpu"


def test_variants_hold_expert_parameters_equal_and_grow_the_router_only():
    s = tiny_lm_settings()  # d 16, h 8, E 8, k 2, one block
    d, h, E, k = s.d_model, s.h, s.num_experts, s.top_k
    for v in fg.VARIANTS:
        cfg = fg.variant_config(s, v)
        counts = ffn_parameter_counts(Transformer(cfg))
        routed = v.m * E - int(v.shared)
        router = d * routed
        assert cfg.moe.num_experts == routed and cfg.moe.top_k == v.m * k - int(v.shared)
        assert cfg.d_hidden == h // v.m and cfg.moe.weighting == "raw"
        assert cfg.moe.balance_coef == pytest.approx(fg.BALANCE_ALPHA / cfg.moe.top_k)
        assert (cfg.moe.n_shared, cfg.moe.d_shared) == ((1, h // v.m) if v.shared else (0, None))
        assert counts["total"] - router == 3 * d * E * h, v.name
        assert counts["active"] - router == 3 * d * k * h, v.name
    assert [v.name for v in fg.VARIANTS] == ["m=1", "m=1 + shared", "m=2", "m=2 + shared",
                                             "m=4", "m=4 + shared"]


def test_a_split_layer_with_copied_router_rows_reproduces_the_coarse_layer():
    """Chapter 9's identity: m pieces of width h/m per expert, each router row m times, gates
    times m (routed_scaling_factor) give the coarse layer's output exactly."""
    d, h, E, k, m = 6, 8, 4, 2, 4
    torch.manual_seed(0)
    coarse = MoE(d, h, E, top_k=k, weighting="raw")
    fine = MoE(d, h // m, m * E, top_k=m * k, weighting="raw", routed_scaling_factor=float(m))
    w_in, w_out = coarse.experts.w_in.detach(), coarse.experts.w_out.detach()

    def split(t):
        return t.reshape(E, d, m, h // m).permute(0, 2, 1, 3).reshape(E * m, d, h // m)

    with torch.no_grad():
        fine.router.gate.weight.copy_(coarse.router.gate.weight.repeat_interleave(m, dim=0))
        fine.experts.w_in.copy_(torch.cat([split(w_in[..., :h]), split(w_in[..., h:])], -1))
        fine.experts.w_out.copy_(w_out.reshape(E * m, h // m, d))
    x = torch.randn(20, d)
    torch.testing.assert_close(fine(x).y, coarse(x).y)


def test_variant_checks_name_the_argument():
    s = tiny_lm_settings()
    with pytest.raises(ValueError, match="m"):
        fg.Variant(0)
    with pytest.raises(TypeError, match="shared"):
        fg.Variant(2, shared=1)
    with pytest.raises(ValueError, match="must divide"):
        fg.variant_config(s, fg.Variant(3))
    with pytest.raises(ValueError, match="no routed expert"):
        fg.variant_config(replace(s, top_k=1), fg.Variant(1, shared=True))
    with pytest.raises(TypeError, match="variant"):
        fg.variant_config(s, "m=1")
    with pytest.raises(TypeError, match="settings"):
        fg.variant_config({"h": 8}, fg.Variant(1))


def test_run_records_every_variant_and_seed_with_the_same_probe():
    s = tiny_lm_settings()
    variants = (fg.Variant(1), fg.Variant(2, shared=True))
    runs = fg.run(s, [0, 1], variants, "cpu", progress=False)
    assert [(r["variant"], r["seed"]) for r in runs] == [
        ("m=1", 0), ("m=2 + shared", 0), ("m=1", 1), ("m=2 + shared", 1)]
    for r in runs:
        assert r["val_loss"] > 0 and r["curve"]["step"] == [0, 1] and r["seconds"] > 0
        probe = r["probe"]
        assert len(probe["class_utilisation"]) == s.n_layers
        rows = torch.tensor(probe["class_utilisation"][0])          # [classes, routed experts]
        assert rows.shape == (len(fg.CHAR_CLASSES), r["routed_experts"])
        present = torch.tensor(probe["class_share"]) > 0
        torch.testing.assert_close(rows[present].sum(1), torch.ones(int(present.sum())),
                                   atol=1e-4, rtol=0)
        assert all(v >= 0 for v in probe["max_violation"])
    shared = [r for r in runs if r["shared"]]
    assert {r["routed_experts"] for r in shared} == {2 * s.num_experts - 1}
    assert runs[0]["probe"]["class_share"] == runs[2]["probe"]["class_share"]  # same windows


def test_summary_and_paired_differences_by_hand():
    rows = [{"variant": v, "seed": seed, "val_loss": loss, "active_params": 10,
             "total_params": 20, "seconds": 1.0}
            for v, seed, loss in [("m=1", 0, 2.0), ("m=1", 1, 2.2), ("m=4", 0, 1.9),
                                  ("m=4", 1, 2.3)]]
    assert fg.paired_differences(rows, "m=4") == pytest.approx([-0.1, 0.1])
    out = fg.summary(rows)
    assert out["val_loss"] == pytest.approx({"m=1": 2.1, "m=4": 2.1})
    assert out["vs_baseline"]["m=4"]["mean"] == pytest.approx(0.0)
    assert out["vs_baseline"]["m=4"]["std"] == pytest.approx(math.sqrt(0.02))
    assert out["seeds"] == [0, 1] and "m=1" not in out["vs_baseline"]
    assert fg.format_runs(rows).count("\n") == 4


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: fg.run(tiny_lm_settings(), [], progress=False), "seeds"),
        (lambda: fg.run(tiny_lm_settings(), [0], (), progress=False), "variants"),
        (lambda: fg.run(tiny_lm_settings(), [0], [fg.Variant(1)] * 2, progress=False),
         "distinct"),
        (lambda: fg.run(tiny_lm_settings(), [0], [fg.Variant(3)], progress=False),
         r"variants\[0\]"),
        (lambda: fg.run(tiny_lm_settings(), [0], "m=1", progress=False), "variants"),
        (lambda: fg.run(tiny_lm_settings(), [0], device="tpu?"), "device"),
        (lambda: fg.run(tiny_lm_settings(), [0], progress="no"), "progress"),
        (lambda: fg.summary([]), "results"),
        (lambda: fg.summary([{"variant": "m=1"}]), r"results\[0\]"),
        (lambda: fg.paired_differences([{"variant": "m=1", "seed": 0, "val_loss": 1.0,
                                         "active_params": 1, "total_params": 1,
                                         "seconds": 1.0}], "m=4"), "common seed"),
        (lambda: fg.probe(MoE(8, 4, 4), torch.zeros(2, 4).long()), "model"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call()


def test_main_prints_runs_and_last_line_json(tmp_path, capsys):
    out_file = tmp_path / "runs.json"
    fg.main(["--quick", "--steps", "2", "--seeds", "0", "--variants", "m=1", "m=2+shared",
             "--no-progress", "--device", "cpu", "--out", str(out_file), "--set", "d_model=16",
             "n_layers=1", "n_heads=2", "h=8", "seq_len=16", "batch=4", "max_bytes=20000",
             "eval_batches=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["variant", "seed"]
    assert [line.split()[0] for line in lines[1:3]] == ["m=1", "m=2"]
    last = json.loads(lines[-1])
    stored = json.loads(out_file.read_text())
    assert stored["summary"] == last and len(stored["runs"]) == 2
    assert set(last["vs_baseline"]) == {"m=2 + shared"}
    meta = stored["meta"]
    assert meta["settings"]["steps"] == 2 and meta["variants"] == ["m=1", "m=2 + shared"]
    assert meta["device"].startswith("CPU: ") and meta["threads"] == 1 and meta["seconds"] > 0


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--seeds", "1", "1"], ["--variants", "m=3"], ["--set", "h=6"],
     ["--threads", "0"], ["--device", "tpu?"]],
)
def test_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fg.main(["--quick", "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_quick_settings_are_chapter_8s_with_more_steps():
    from moe_lib.bench import moe_vs_dense

    assert fg.QUICK == replace(moe_vs_dense.QUICK, steps=1000)


@pytest.mark.skipif(STORED not in results.names(), reason="stored run not produced yet")
def test_the_stored_run_loads_with_every_variant_and_seed():
    stored = results.load(STORED)
    assert set(stored) == {"meta", "runs", "summary"}
    assert stored["meta"]["settings"] == fg.QUICK.to_dict()
    assert len(stored["runs"]) == 18 and stored["summary"]["seeds"] == [0, 1, 2]
    assert {r["variant"] for r in stored["runs"]} == {v.name for v in fg.VARIANTS}
    expert_weights = {r["total_params"] - r["routed_experts"] * fg.QUICK.d_model
                      * fg.QUICK.n_layers for r in stored["runs"]}
    assert len(expert_weights) == 1  # the same expert weights in every variant
