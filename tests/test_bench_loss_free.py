"""moe_lib.bench.loss_free: the loss-free bias against the Switch loss, per micro-batch or
global (chapter 10), at tiny sizes. Only structure, the data each method sees, the schedule of
the bias and the arithmetic of the summary are checked, never a loss or a timing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moe_lib.bench import loss_free as lf
from moe_lib.bench import results
from moe_lib.models import Transformer

STORED = "loss_free_quick_500steps_cpu"
TINY = replace(lf.QUICK, d_model=16, n_layers=1, n_heads=2, h=8, seq_len=16, batch=4, steps=3,
               eval_batches=2, num_experts=8, top_k=2)
METHODS = {m.name: m for m in lf.METHODS}


@pytest.fixture(scope="module")
def corpora():
    return lf.package_corpora()


def test_methods_and_their_models():
    assert lf.METHOD_NAMES == (
        "none", "bias-1e-4", "bias-1e-3", "bias-1e-2", "switch-1e-3", "switch-1e-2",
        "switch-1e-1", "bias-1e-3-frozen", "bias-1e-3+seq-1e-4", "micro-switch-1e-2",
        "global-switch-1e-2")
    for m in lf.METHODS:
        cfg = lf.model_config(TINY, m).moe
        assert (cfg.score, cfg.n_group, cfg.topk_group) == ("sigmoid", lf.N_GROUP, lf.TOPK_GROUP)
        assert cfg.selection_bias == (m.gamma is not None)
        assert cfg.weighting == "renormalize" and cfg.routed_scaling_factor == 1.0
    switch = lf.model_config(TINY, METHODS["switch-1e-1"]).moe
    assert switch.balance_loss == "switch"
    assert switch.balance_coef == pytest.approx(0.1 / TINY.top_k)  # alpha when uniform
    seq = lf.model_config(TINY, METHODS["bias-1e-3+seq-1e-4"]).moe
    assert (seq.balance_loss, seq.balance_coef) == ("sequence_wise", 1e-4)
    assert lf.model_config(TINY, METHODS["global-switch-1e-2"]).moe.balance_loss is None


def test_the_bias_freezes_at_its_fraction_of_the_steps():
    frozen = METHODS["bias-1e-3-frozen"]
    assert [frozen.gamma_at(s, 100) for s in (0, 74, 75, 99)] == [1e-3, 1e-3, 0.0, 0.0]
    assert METHODS["bias-1e-2"].gamma_at(99, 100) == 1e-2
    with pytest.raises(ValueError, match="no bias update"):
        METHODS["none"].gamma_at(0, 10)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"gamma": -1e-3}, "gamma"), ({"freeze_at": 0.5}, "gamma too"),
     ({"gamma": 1e-3, "freeze_at": 1.5}, "freeze_at"), ({"balance_loss": "switch"}, "alpha"),
     ({"balance_loss": "z"}, "balance_loss"), ({"micro_batches": 0}, "micro_batches"),
     ({"global_alpha": 1e-2, "balance_loss": "switch", "alpha": 1e-2}, "global_alpha"),
     ({"name": 3}, "name")],
)
def test_method_checks_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        lf.Method(**{"name": "x", **kwargs})


def test_helpers_refuse_bad_arguments(corpora):
    with pytest.raises(ValueError, match="split"):
        lf.domain_batch(corpora, "dev", 2, 8, torch.Generator())
    with pytest.raises(ValueError, match="windows"):
        lf.domain_batch(corpora, "val", 0, 8, torch.Generator())
    with pytest.raises(TypeError, match="settings"):
        lf.step_batches(corpora, {"batch": 4}, 0, 1)
    with pytest.raises(ValueError, match="seed"):
        lf.step_batches(corpora, TINY, -1, 1)
    with pytest.raises(ValueError, match="seq_len"):
        lf.package_probe(Transformer(lf.model_config(TINY, METHODS["none"])), corpora, 0)


def test_every_method_sees_the_same_windows(corpora):
    """With gradient accumulation the step's micro-batches are drawn one by one; without it
    they arrive as one batch: the same windows, in the same order, each micro-batch from one
    package."""
    whole = lf.step_batches(corpora, TINY, seed=5, micro_batches=1)
    micro = lf.step_batches(corpora, TINY, seed=5, micro_batches=lf.MICRO_BATCHES)
    for step in range(3):
        x, y = whole(step)
        parts = [micro(step * lf.MICRO_BATCHES + i) for i in range(lf.MICRO_BATCHES)]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
        assert x.shape == (TINY.batch, TINY.seq_len) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="micro_batches"):
        lf.step_batches(corpora, TINY, 0, micro_batches=3)


def test_package_probe_shares_sum_to_one_per_package(corpora):
    torch.manual_seed(0)
    model = Transformer(lf.model_config(TINY, METHODS["none"]))
    probe = lf.package_probe(model, corpora, TINY.seq_len, windows=2)
    shares = torch.tensor(probe["package_shares"])               # [L, P, E]
    assert shares.shape == (TINY.n_layers, len(corpora), TINY.num_experts)
    torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[:2], dtype=shares.dtype),
                               atol=1e-4, rtol=0)
    assert len(probe["max_violation"]) == TINY.n_layers
    assert all(0 <= v <= TINY.num_experts / TINY.top_k - 1 + 1e-9
               for row in probe["package_max_violation"] for v in row)


def test_run_records_curves_violations_biases_and_shares():
    methods = (METHODS["bias-1e-2"], METHODS["micro-switch-1e-2"])
    runs = lf.run(TINY, [0, 1], methods, "cpu", progress=False)
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("bias-1e-2", 0), ("micro-switch-1e-2", 0), ("bias-1e-2", 1), ("micro-switch-1e-2", 1)]
    for r in runs:
        assert len(r["max_violation"]) == TINY.steps
        assert all(len(row) == TINY.n_layers for row in r["max_violation"])
        assert r["val_loss"] > 0 and r["curve"]["step"][-1] == TINY.steps - 1
        assert ("shares" in r) == (r["seed"] == 0)
    bias = torch.tensor(runs[0]["bias"])
    assert bias.abs().max() <= TINY.steps * 1e-2 + 1e-6 and bias.abs().max() > 0
    assert torch.equal(torch.tensor(runs[1]["bias"]), torch.zeros(TINY.n_layers,
                                                                  TINY.num_experts))
    shares = torch.tensor(runs[0]["shares"])                     # [steps / every, L, E]
    torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[:2]), atol=1e-3, rtol=0)


def test_global_batch_loss_under_accumulation_is_the_big_batch_loss():
    """Same data, same start: after one step the global-batch Switch loss over 4 micro-batches
    and the Switch loss of the 4 micro-batches as one batch leave the same model."""
    one_step = replace(TINY, steps=1)
    runs = lf.run(one_step, [0], (METHODS["switch-1e-2"], METHODS["global-switch-1e-2"]),
                  "cpu", progress=False)
    assert runs[0]["max_violation"] == runs[1]["max_violation"]
    assert runs[0]["val_loss"] == pytest.approx(runs[1]["val_loss"], rel=1e-4)


def test_mean_max_violation_summary_and_table():
    rows = [{"method": "a", "seed": s, "val_loss": 2.0 + s, "seconds": 1.0,
             "max_violation": [[1.0, 3.0]] * 8 + [[0.0, 1.0]] * 2} for s in (0, 1)]
    assert lf.mean_max_violation(rows[0]) == pytest.approx((8 * 2.0 + 2 * 0.5) / 10)
    assert lf.mean_max_violation(rows[0], 0.8) == pytest.approx(0.5)
    out = lf.summary(rows)
    assert out["val_loss"] == {"a": 2.5} and out["late_max_violation"] == {"a": 0.5}
    assert out["seeds"] == [0, 1] and out["probe_max_violation"] == {}
    assert lf.format_runs(rows).count("\n") == 2


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: lf.run(TINY, [], progress=False), "seeds"),
        (lambda: lf.run(TINY, [0], (), progress=False), "methods"),
        (lambda: lf.run(TINY, [0], (METHODS["none"],) * 2, progress=False), "distinct"),
        (lambda: lf.run(TINY, [0], ("none",), progress=False), r"methods\[0\]"),
        (lambda: lf.run(replace(TINY, batch=6), [0], progress=False), "batch"),
        (lambda: lf.run(TINY, [0], device="tpu?"), "device"),
        (lambda: lf.run(TINY, [0], progress=1), "progress"),
        (lambda: lf.model_config(TINY, "none"), "method"),
        (lambda: lf.model_config({"h": 8}, METHODS["none"]), "settings"),
        (lambda: lf.package_corpora("json"), "packages"),
        (lambda: lf.domain_batch([], "train", 2, 8, torch.Generator()), "corpora"),
        (lambda: lf.domain_batch({}, "train", 2, 8, torch.Generator()), "corpora"),
        (lambda: lf.domain_batch({"json": None}, "train", 2, 8, torch.Generator()),
         r"corpora\['json'\]"),
        (lambda: lf.step_batches({"json": None}, TINY, 0, 1), "corpora"),
        (lambda: lf.package_probe(Transformer(lf.model_config(TINY, METHODS["none"])), {},
                                  16), "corpora"),
        (lambda: lf.mean_max_violation({"max_violation": [[1.0]]}, 0.5, 0.5), "start"),
        (lambda: lf.mean_max_violation({"seed": 0}), "max_violation"),
        (lambda: lf.mean_max_violation({"max_violation": [[1.0]]}, 2.0), "start"),
        (lambda: lf.summary([]), "results"),
        (lambda: lf.format_runs([{"method": "a"}]), r"results\[0\]"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call()


def test_main_prints_runs_and_last_line_json(tmp_path, capsys):
    out_file = tmp_path / "runs.json"
    lf.main(["--quick", "--steps", "2", "--seeds", "0", "--methods", "none", "bias-1e-3",
             "--no-progress", "--device", "cpu", "--out", str(out_file), "--set", "d_model=16",
             "n_layers=1", "n_heads=2", "h=8", "seq_len=16", "batch=4", "eval_batches=2",
             "num_experts=8", "top_k=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["method", "seed"]
    assert [line.split()[0] for line in lines[1:3]] == ["none", "bias-1e-3"]
    last = json.loads(lines[-1])
    stored = json.loads(out_file.read_text())
    assert stored["summary"] == last and len(stored["runs"]) == 2
    meta = stored["meta"]
    assert [m["name"] for m in meta["methods"]] == ["none", "bias-1e-3"]
    assert meta["settings"]["steps"] == 2 and meta["micro_batches"] == lf.MICRO_BATCHES
    assert meta["device"].startswith("CPU: ") and meta["threads"] == 1


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--seeds", "2", "2"], ["--methods", "bias-5"], ["--set", "n_heads=5"],
     ["--threads", "0"], ["--device", "tpu?"]],
)
def test_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lf.main(["--quick", "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(STORED not in results.names(), reason="stored run not produced yet")
def test_the_stored_run_loads_with_every_method_and_seed():
    stored = results.load(STORED)
    assert stored["meta"]["settings"] == lf.QUICK.to_dict()
    assert len(stored["runs"]) == 3 * len(lf.METHODS)
    assert {r["method"] for r in stored["runs"]} == set(lf.METHOD_NAMES)
    assert all(len(r["max_violation"]) == lf.QUICK.steps for r in stored["runs"])
