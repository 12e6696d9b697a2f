"""moe_lib.bench.upcycling: the three arms at a tiny size (the upcycled model starts where the
dense model stopped; scratch sees every batch), the summary and the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moe_lib.bench import results
from moe_lib.bench import upcycling as up
from moe_lib.models import Transformer, ffn_parameter_counts

TINY = replace(up.QUICK, d_model=16, n_layers=1, n_heads=2, h=8, seq_len=16, batch=4,
               dense_steps=3, steps=2, max_bytes=20_000, eval_batches=2, eval_every=1,
               num_experts=4)
STORED = "upcycling_lm_cpu"


def test_configs_match_chapter_8_and_the_upcycled_shape():
    dense, moe = up.dense_config(TINY), up.moe_config(TINY)
    assert dense.ffn == "dense" and dense.d_hidden == TINY.top_k * TINY.h
    assert moe.moe.num_experts == 4 and moe.moe.d_hidden == dense.d_hidden
    d, m = ffn_parameter_counts(Transformer(dense)), ffn_parameter_counts(Transformer(moe))
    router = TINY.d_model * 4
    assert m["active"] == TINY.top_k * d["total"] + router  # two experts of the dense width
    assert m["total"] == 4 * d["total"] + router


def test_run_pairs_the_arms():
    runs = up.run(TINY, [0], "cpu", progress=False)
    by = {r["arm"]: r for r in runs}
    assert set(by) == set(up.ARMS)
    assert by["dense"]["start_val_loss"] == by["upcycled"]["start_val_loss"]
    assert by["upcycled"]["start_diff"] < 1e-5
    assert by["upcycled"]["curve"]["step"][-1] == TINY.steps - 1
    assert by["scratch"]["curve"]["step"][-1] == TINY.dense_steps + TINY.steps - 1
    assert len(by["upcycled"]["expert_spread"]) == TINY.n_layers
    s = up.summary(runs)
    assert s["dense_minus_upcycled"] == [by["dense"]["val_loss"] - by["upcycled"]["val_loss"]]
    assert up.format_runs(runs).count("\n") == 3


def test_main_writes_the_results(tmp_path, capsys):
    out = tmp_path / "up.json"
    up.main(["--quick", "--dense-steps", "2", "--steps", "2", "--seeds", "0", "--no-progress",
             "--device", "cpu", "--out", str(out), "--set", "d_model=16", "n_layers=1",
             "n_heads=2", "h=8", "seq_len=16", "batch=4", "max_bytes=20000", "eval_batches=2",
             "num_experts=4"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads(out.read_text())
    assert stored["summary"] == last and stored["meta"]["settings"]["dense_steps"] == 2
    assert stored["meta"]["moe_options"]["top_k"] == 2


@pytest.mark.skipif(STORED not in results.names(), reason="the stored run is not there yet")
def test_the_stored_run_is_complete():
    stored = results.load(STORED)
    f = up.final_losses(stored["runs"])
    assert len(f["seeds"]) >= 3 and stored["meta"]["settings"] == up.QUICK.to_dict()
    assert all(r["start_diff"] < 1e-4 for r in stored["runs"] if r["arm"] == "upcycled")


@pytest.mark.parametrize("call, error, word", [
    (lambda: replace(up.QUICK, top_k=1), ValueError, "top_k"),
    (lambda: replace(up.QUICK, dense_steps=0), ValueError, "dense_steps"),
    (lambda: up.dense_config("quick"), TypeError, "settings"),
    (lambda: up.expert_spread("layer"), TypeError, "layer"),
    (lambda: up.run(TINY, [0, 0]), ValueError, "seeds"),
    (lambda: up.summary([]), ValueError, "results"),
])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call()
