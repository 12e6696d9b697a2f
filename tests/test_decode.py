"""moe_lib.bench.decode (the decode benchmark) and moe_lib.bench.routing_traces, at tiny sizes.

Nothing here compares timings (the machine is shared): only the structure of the rows, the
bound's formula and the byte and FLOP counts are checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_lib import MoE
from moe_lib.bench import decode
from moe_lib.bench import routing_traces as traces
from moe_lib.inference import Int8ExpertBank, expected_touched
from moe_lib.models import Transformer
from tests.helpers import tiny_lm_settings

TINY = dict(sizes=[(16, 16, 4, 2)], batches=[1, 3], dispatches=["sorted", "direct"], rounds=2,
            probe_mib=1, gemm_dim=16)


@pytest.fixture(scope="module")
def rows():
    return decode.run_decode(decode.DecodeBenchConfig(**TINY))


def test_rows_hold_every_implementation_and_batch(rows):
    assert [(r["B"], r["impl"]) for r in rows] == [
        (B, n) for B in (1, 3) for n in ("moe sorted", "moe direct", "dense_active",
                                          "dense_total")]
    for r in rows:
        assert r["ms"] > 0 and r["rounds"] == 2
        assert r["bandwidth_gbs"] > 0 and r["gemm_gflops"] > 0


def test_bytes_flops_and_bound_follow_the_formulas(rows):
    d, h, E, k = 16, 16, 4, 2
    expert, router = 3 * d * h, d * E
    torch.manual_seed(0)
    layer = MoE(d, h, E, k).eval()  # the benchmark's weights: seeded with config.seed = 0
    gen = torch.Generator().manual_seed(1)
    for B in (1, 3):
        x = torch.randn(B, d, generator=gen)
        touched = int(torch.unique(layer.router(x).expert_ids).numel())
        by = {r["impl"]: r for r in rows if r["B"] == B}
        for name in ("moe sorted", "moe direct"):
            r = by[name]
            assert r["touched"] == touched and r["expected_touched"] == expected_touched(E, k, B)
            assert r["nbytes"] == 4 * (router + touched * expert)
            assert r["flops"] == 2 * B * (router + k * expert)
        assert by["dense_active"]["nbytes"] == 4 * k * expert
        assert by["dense_total"]["flops"] == 2 * B * E * expert
        assert by["dense_active"]["x_active"] == 1.0
        for r in by.values():
            bound = max(r["nbytes"] / (r["bandwidth_gbs"] * 1e9),
                        r["flops"] / (r["gemm_gflops"] * 1e9))
            assert r["bound_ms"] == pytest.approx(1e3 * bound)
            assert r["x_bound"] == pytest.approx(r["ms"] / r["bound_ms"])


def test_table_and_summary(rows):
    text = decode.format_table(rows)
    assert "d_model=16 d_hidden=16 experts=4 k=2" in text and "moe direct" in text
    s = decode.summary(rows)
    assert set(s["16,16,4,2"]) == {"bandwidth_gbs", "gemm_gflops", "moe sorted", "moe direct"}
    assert set(s["16,16,4,2"]["moe direct"]) == {"1", "3"}
    with pytest.raises(ValueError, match="rows"):
        decode.format_table([{"impl": "x"}])


def test_decode_bound():
    assert decode.decode_bound(100, 10, 50.0, 1.0) == 10.0
    assert decode.decode_bound(100, 10, 5.0, 10.0) == 20.0
    with pytest.raises(ValueError, match="bandwidth"):
        decode.decode_bound(1, 1, 0.0, 1.0)
    with pytest.raises(ValueError, match="nbytes"):
        decode.decode_bound(-1, 1, 1.0, 1.0)


def test_config_resolves_its_defaults():
    c = decode.DecodeBenchConfig()
    assert c.sizes == decode.DEFAULT_SIZES and c.batches == decode.DEFAULT_BATCHES
    assert c.dispatches == ("loop", "sorted", "direct") and c.clock == "process"
    assert c.to_dict()["sizes"][0] == [512, 1024, 8, 2]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sizes": []}, "sizes"),
        ({"sizes": "16,16,4,2"}, "sizes"),
        ({"sizes": [(16, 16, 4)]}, r"sizes\[0\]"),
        ({"sizes": [(16, 16, 4, 5)]}, r"sizes\[0\]\.k"),
        ({"sizes": [(16, 0, 4, 2)]}, r"sizes\[0\]\.h"),
        ({"batches": []}, "batches"),
        ({"batches": [1, 0]}, r"batches\[1\]"),
        ({"batches": [2, 2]}, "batches"),
        ({"batches": 8}, "batches"),
        ({"dispatches": ["sorted", "fast"]}, r"dispatches\[1\]"),
        ({"dispatches": "sorted"}, "dispatches"),
        ({"dispatches": ["sorted", "sorted"]}, "dispatches"),
        ({"rounds": 0}, "rounds"),
        ({"threads": 2}, "clock='process'"),
        ({"clock": "cpu"}, "clock"),
        ({"probe_mib": 0}, "probe_mib"),
        ({"gemm_dim": 1.5}, "gemm_dim"),
        ({"seed": -1}, "seed"),
        ({"progress": 1}, "progress"),
    ],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        decode.DecodeBenchConfig(**kwargs)


def test_main_prints_the_table_and_a_json_last_line(tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode.main(["--sizes", "16,16,4,2", "--batches", "1,2", "--dispatches", "direct",
                 "--rounds", "1", "--probe-mib", "1", "--gemm-dim", "16", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "size d=16 h=16 E=4 k=2, batch 1"  # progress, then the header
    assert any("x bound" in line for line in printed)
    assert json.loads(printed[-1])["16,16,4,2"]["moe direct"].keys() == {"1", "2"}
    stored = json.loads(out.read_text())
    assert set(stored) == {"meta", "rows", "summary"}
    assert stored["meta"]["settings"]["batches"] == [1, 2] and "device" in stored["meta"]


@pytest.mark.parametrize("argv", [["--sizes", "16,16,4"], ["--batches", "1,x"],
                                  ["--threads", "2", "--clock", "process"]])
def test_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit):
        decode.main(argv)
    assert "usage" in capsys.readouterr().err


# ------------------------------------------------------------------------------ routing traces


def _tiny_model():
    from moe_lib.bench.moe_vs_dense import model_configs

    torch.manual_seed(0)
    return Transformer(model_configs(tiny_lm_settings())["moe"])


def test_route_positions_routes_each_byte_at_the_end_of_its_window():
    model = _tiny_model()
    S = model.cfg.seq_len
    data = torch.randint(0, 256, (200,), dtype=torch.uint8)
    got = traces.route_positions(model, data, start=S - 1 + 5, tokens=40, chunk=7)
    assert len(got) == 1 and got[0].shape == (40, 2)
    p = S - 1 + 5 + 13  # one position, routed alone
    with torch.no_grad():
        r = model(data[p - S + 1 : p + 1].long()[None]).routings[0]
    assert torch.equal(got[0][13], r.expert_ids[-1])
    with pytest.raises(ValueError, match="start"):
        traces.route_positions(model, data, start=0, tokens=4)


def test_with_experts_variants():
    model = _tiny_model()
    q = traces.with_experts(model, "int8")
    assert isinstance(q.blocks[0].ffn.experts, Int8ExpertBank)
    assert not isinstance(model.blocks[0].ffn.experts, Int8ExpertBank)  # a copy
    b = traces.with_experts(model, "bfloat16")
    w = b.blocks[0].ffn.experts.w_in
    assert torch.equal(w, w.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="variant"):
        traces.with_experts(model, "int4")


def test_run_returns_traces_and_paired_losses():
    s = tiny_lm_settings(steps=1)
    out = traces.run(s, [0], tokens=30, eval_batches=3, progress=False)
    assert out["seeds"] == [0] and out["tokens"] == 30 and out["start"] == s.seq_len - 1
    layer0 = out["traces"]["0"][0]
    assert len(layer0) == 30 and all(len(ids) == s.top_k for ids in layer0)
    assert set(out["val_loss"]["0"]) == set(traces.VARIANTS)
    with pytest.raises(ValueError, match="tokens"):
        traces.run(s, [0], tokens=10**7, progress=False)
