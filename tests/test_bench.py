"""moe_lib.bench: the implementation registry, timing and memory helpers, the dispatch
benchmark's config, table and command line, the MoE-vs-dense experiment, the stored results.

Everything runs at tiny sizes (the whole file in seconds). Nothing here compares timings: the
machine is shared, so only the structure of the results is checked, never a ratio.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from moe_lib import MoE
from moe_lib.bench import dispatch as bench
from moe_lib.bench import moe_vs_dense, results
from moe_lib.bench.baselines import GroupedMMBank, IndexAddMoE, MaskLoopMoE
from moe_lib.bench.machine import cpu_model, describe_device, machine_record
from moe_lib.bench.stages import STAGES, stage_times
from moe_lib.bench.timing import Impl, get_clock, peak_memory, time_impls, train_step
from moe_lib.models import Transformer, ffn_parameter_counts
from tests.helpers import bench_impls, tiny_lm_settings

TINY = (8, 8, 4, 2, 32)  # d, h, E, k, T (torch._grouped_mm needs rows of 16-byte multiples)
STORED = "moe_vs_dense_quick_1500steps_cpu"


def _x(T=32, d=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------- registry


def test_registry_holds_the_builtin_implementations_in_table_order():
    assert bench.IMPLS == ("dense bound", "dense (nn.Linear)", "dense gating", "mask loop",
                           "index_add (HF)", "module loop", "moe_lib loop", "moe_lib sorted",
                           "sorted+grouped_mm", "sorted+compile")
    assert set(bench.QUICK_IMPLS) <= set(bench.IMPLS)
    assert bench.SLOW == ("dense gating", "mask loop", "index_add (HF)", "moe_lib loop",
                          "deepseek-style loop")
    assert [n for n, e in bench.REGISTRY.items() if not e.compare] == [
        "dense bound", "dense (nn.Linear)", "dense gating", "deepseek dense bound",
        "deepseek-style sorted", "deepseek-style loop"]
    assert set(bench.DEEPSEEK_IMPLS) <= set(bench.REGISTRY)


def test_deepseek_style_rows_are_measured_against_their_own_dense_ffn():
    """The DeepSeek-style layer does the FLOPs of a dense FFN of hidden (k + 1) h (k routed
    experts and the shared one); its ratios are to that FFN, and it agrees with its loop."""
    from torch.utils.flop_counter import FlopCounterMode

    impls = bench.build_impls(16, 8, 8, 2, names=bench.DEEPSEEK_IMPLS)
    x = torch.randn(64, 16)
    with FlopCounterMode(display=False) as dense:
        impls["deepseek dense bound"].fn(x)
    with FlopCounterMode(display=False) as moe:
        y = impls["deepseek-style sorted"].fn(x)
    router = 2 * 64 * 16 * 8
    assert moe.get_total_flops() == dense.get_total_flops() + router
    torch.testing.assert_close(impls["deepseek-style loop"].fn(x), y)
    rows = bench.run_benchmark(bench.DispatchBenchConfig([(16, 8, 8, 2, 64)],
                                                         bench.DEEPSEEK_IMPLS, rounds=1,
                                                         memory=False, threads=1))
    by = {r["impl"]: r for r in rows}
    assert by["deepseek dense bound"]["fwd_ratio"] == 1.0
    assert by["dense bound"]["fwd_ratio"] == 1.0


def test_every_registered_name_builds():
    impls = bench_impls()
    assert tuple(impls) == bench.IMPLS
    for name, impl in impls.items():
        assert impl.name == name and impl.params, name
        assert all(p.dtype == torch.float32 for p in impl.params), name
        if name == "sorted+compile":  # not compiled unless asked for
            assert impl.fn is None and "--compile" in impl.note
        else:
            assert callable(impl.fn), name
    assert "E/k = 2" in impls["dense gating"].note


def test_topk_implementations_agree_in_output_and_input_gradient():
    impls = bench_impls()
    x = _x()
    g = _x(seed=2)
    ys, dxs = {}, {}
    for name, impl in impls.items():
        if impl.fn is None or not bench.REGISTRY[name].compare:
            continue
        xi = x.clone().requires_grad_()
        y = impl.fn(xi)
        y.backward(g)
        ys[name], dxs[name] = y.detach(), xi.grad
    assert set(ys) == {"mask loop", "index_add (HF)", "module loop", "moe_lib loop",
                       "moe_lib sorted", "sorted+grouped_mm"}
    for name in ys:
        torch.testing.assert_close(ys[name], ys["moe_lib sorted"], msg=name)
        torch.testing.assert_close(dxs[name], dxs["moe_lib sorted"], msg=name)
    assert bench.check_outputs(impls, x) == {}


def test_check_outputs_reports_a_failing_implementation_and_refuses_a_wrong_one():
    impls = bench_impls(["moe_lib sorted", "mask loop"])

    def broken(x):
        raise RuntimeError("no kernel here\nsecond line")

    impls["broken"] = Impl("broken", broken, [])
    assert bench.check_outputs(impls, _x()) == {"broken": "RuntimeError: no kernel here"}
    impls["wrong"] = Impl("wrong", lambda x: impls["moe_lib sorted"].fn(x) + 1, [])
    del impls["broken"]
    with pytest.raises(AssertionError, match="wrong"):
        bench.check_outputs(impls, _x())


def test_unknown_or_repeated_names_are_refused():
    with pytest.raises(ValueError, match="names.*'nope'"):
        bench.build_impls(*TINY[:4], names=["nope"])
    with pytest.raises(ValueError, match="impls.*unknown implementation 'nope'"):
        bench.DispatchBenchConfig([TINY], impls=["moe_lib sorted", "nope"])
    with pytest.raises(ValueError, match="must not repeat"):
        bench.DispatchBenchConfig([TINY], impls=["mask loop", "mask loop"])
    with pytest.raises(TypeError, match="impls must be a list"):
        bench.DispatchBenchConfig([TINY], impls="mask loop")
    with pytest.raises(ValueError, match="already registered"):
        bench.register("mask loop")


def test_register_adds_an_implementation_that_the_benchmark_runs():
    name = "test: sorted with capacity 1.0"

    @bench.register(name, compare=False)
    def _capacity(ctx):
        m = ctx.twin(dispatch="sorted", capacity_factor=1.0)
        return bench.Built(m, bench.layer_fn(m), "capacity 1.0")

    try:
        impls = bench_impls(["moe_lib sorted", name])
        assert impls[name].note == "capacity 1.0"
        ref = impls["moe_lib sorted"].params
        assert all(torch.equal(a, b) for a, b in zip(impls[name].params, ref))
        config = bench.DispatchBenchConfig([TINY], ["dense bound", name], rounds=1, threads=1,
                                           memory=False)
        rows = bench.run_benchmark(config)
        assert [r["impl"] for r in rows] == ["dense bound", name]
    finally:
        del bench.REGISTRY[name]


def test_context_and_builders_are_checked():
    ref = MoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match="reference must be an MoE of d=8, h=6"):
        bench.Context(8, 6, 4, 2, 0, False, ref)
    with pytest.raises(TypeError, match="compile"):
        bench.Context(8, 8, 4, 2, 0, "no", ref)
    name = "test: returns a tuple"
    bench.register(name)(lambda ctx: (ctx.reference, None, ""))
    try:
        with pytest.raises(TypeError, match="must return a Built"):
            bench_impls([name])
    finally:
        del bench.REGISTRY[name]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"name": 3}, "name"),
        ({"name": " "}, "name"),
        ({"name": "x", "slow": 1}, "slow"),
        ({"name": "x", "compare": None}, "compare"),
        ({"name": "x", "compiles": "no"}, "compiles"),
    ],
)
def test_register_errors_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        bench.register(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((0, 6, 4, 2), {}, "d"),
        ((8, 6, 4, 5), {}, "k"),
        ((8, 6, True, 2), {}, "E"),
        (TINY[:4], {"device": "tpu?"}, "device"),
        (TINY[:4], {"dtype": torch.int64}, "dtype"),
        (TINY[:4], {"dtype": "float32"}, "dtype"),
        (TINY[:4], {"compile_fast": 1}, "compile_fast"),
        (TINY[:4], {"seed": -1}, "seed"),
        (TINY[:4], {"names": []}, "names"),
    ],
)
def test_build_impls_errors_name_the_argument(args, kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        bench.build_impls(*args, **kwargs)


# ---------------------------------------------------------------------------------- baselines


def test_baselines_refuse_a_layer_they_do_not_compute():
    with pytest.raises(TypeError, match="moe"):
        MaskLoopMoE(torch.nn.Linear(2, 2))
    for kwargs in ({"capacity_factor": 1.0}, {"router": "noisy_topk"}, {"top_k": 1},
                   {"score": "sigmoid"}, {"n_shared": 1}, {"router_bias": True}):
        with pytest.raises(ValueError, match="moe must be a plain top-k layer"):
            IndexAddMoE(MoE(8, 6, 4, **kwargs))
    with pytest.raises(ValueError, match="x must have shape"):
        MaskLoopMoE(MoE(8, 6, 4, 2))(torch.randn(3, 5))


def test_linear_swiglu_and_the_module_loop_compute_the_same_ffn():
    from moe_lib import FeedForward
    from moe_lib.bench.baselines import LinearSwiGLU, ModuleLoopMoE

    ffn = FeedForward(8, 6, "swiglu")
    lin = LinearSwiGLU.from_swiglu(ffn.w_in.detach(), ffn.w_out.detach())
    x = _x()
    torch.testing.assert_close(lin(x), ffn(x))
    assert [tuple(p.shape) for p in lin.parameters()] == [(6, 8), (6, 8), (8, 6)]
    with pytest.raises(ValueError, match="w_in"):
        LinearSwiGLU.from_swiglu(ffn.w_in.detach()[:, :6], ffn.w_out.detach())
    with pytest.raises(ValueError, match="SwiGLU experts"):
        ModuleLoopMoE(MoE(8, 6, 4, 2, expert="gelu"))


def test_grouped_mm_bank_checks_counts():
    bank = GroupedMMBank(4, 8, 6, "swiglu")
    x = torch.randn(5, 8)
    for counts, match in (([1, 2, 2], "list of 4"), ([1, 1, 1, 1], "sum to the 5 rows"),
                          ([6, -1, 0, 0], "ints >= 0"), ((1, 2, 2, 0), "list of 4")):
        with pytest.raises(ValueError, match=match):
            bank.forward_slices(x, counts)


# ------------------------------------------------------------------------------------- timing


def test_time_impls_interleaves_and_stops_slow_ones_after_min_rounds():
    impls = bench_impls(["dense bound", "mask loop"])
    x = _x().requires_grad_()
    g = _x(seed=2)
    out = time_impls(impls, x, g, rounds=3, min_rounds=1, budget_s=0.0, slow=["mask loop"],
                     warmup=1)
    assert out["dense bound"]["rounds"] == 3 and out["mask loop"]["rounds"] == 1
    for t in out.values():
        assert 0 < t["fwd"] <= t["fwdbwd"] < 10


def test_time_impls_and_peak_memory_errors_name_the_argument():
    impls = bench_impls(["dense bound"])
    x, g = _x().requires_grad_(), _x(seed=2)
    with pytest.raises(ValueError, match="rounds"):
        time_impls(impls, x, g, rounds=0)
    with pytest.raises(TypeError, match="slow"):
        time_impls(impls, x, g, slow="mask loop")
    with pytest.raises(ValueError, match="budget_s"):
        time_impls(impls, x, g, budget_s=math.inf)
    with pytest.raises(ValueError, match="clock"):
        time_impls(impls, x, g, clock="cpu")
    with pytest.raises(ValueError, match="x must require gradients"):
        peak_memory(impls["dense bound"].fn, impls["dense bound"].params, x.detach(), g)
    with pytest.raises(ValueError, match="g must have shape"):
        train_step(impls["dense bound"].fn, impls["dense bound"].params, x, g[:3])
    with pytest.raises(TypeError, match="fn must be callable"):
        Impl("a", 3, [])


def test_peak_memory_counts_at_least_the_output_and_is_repeatable():
    impls = bench_impls(["dense bound"])
    impl = impls["dense bound"]
    x, g = _x(T=64).requires_grad_(), _x(T=64, seed=2)
    first = peak_memory(impl.fn, impl.params, x, g)
    assert first >= x.numel() * 4  # y and the input gradient are new tensors of x's size
    assert peak_memory(impl.fn, impl.params, x, g) == first  # exact, not sampled


def test_process_clock_needs_one_cpu_thread():
    assert get_clock("wall", "cpu") is not None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="one thread"):
            get_clock("process", "cpu")
        torch.set_num_threads(1)
        assert get_clock("process", "cpu")() >= 0
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- config


def test_config_resolves_its_defaults():
    c = bench.DispatchBenchConfig([list(TINY)], rounds=2)
    assert c.sizes == (TINY,) and c.impls == bench.IMPLS
    assert c.device == torch.device("cpu") and c.min_rounds == 2 and c.budget_s == 30.0
    assert bench.DispatchBenchConfig([TINY], rounds=9).min_rounds == 3
    with pytest.raises(AttributeError):
        c.rounds = 3  # frozen: a changed config is made with dataclasses.replace, checked again
    with pytest.raises(ValueError, match="min_rounds"):
        replace(c, min_rounds=5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sizes": []}, "sizes"),
        ({"sizes": TINY}, "sizes"),
        ({"sizes": "8,6,4,2,32"}, "sizes"),
        ({"sizes": [TINY[:4]]}, r"sizes\[0\]"),
        ({"sizes": [(8, 6, 4, 5, 32)]}, r"sizes\[0\]\.k"),
        ({"sizes": [(8, 6, 4, 2, 0)]}, r"sizes\[0\]\.T"),
        ({"sizes": [(8, 6.0, 4, 2, 32)]}, r"sizes\[0\]\.h"),
        ({"sizes": [TINY, (8, 6, 4, 2, True)]}, r"sizes\[1\]\.T"),
        ({"sizes": [None]}, r"sizes\[0\]"),
        ({"impls": []}, "impls"),
        ({"impls": None}, "impls"),
        ({"device": "tpu?"}, "device"),
        ({"device": 0}, "device"),
        ({"dtype": torch.int32}, "dtype"),
        ({"dtype": None}, "dtype"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": 2.0}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"min_rounds": 0}, "min_rounds"),
        ({"rounds": 2, "min_rounds": 3}, "min_rounds"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"budget_s": math.nan}, "budget_s"),
        ({"budget_s": "30"}, "budget_s"),
        ({"threads": 0}, "threads"),
        ({"threads": True}, "threads"),
        ({"compile": 1}, "compile"),
        ({"memory": None}, "memory"),
        ({"flops": "yes"}, "flops"),
        ({"progress": 0}, "progress"),
        ({"clock": "cpu"}, "clock"),
        ({"clock": "process", "threads": 2}, "clock='process'"),
    ],
)
def test_config_errors_name_the_argument(kwargs, name):
    args = {"sizes": [TINY], **kwargs}
    with pytest.raises((TypeError, ValueError), match=name):
        bench.DispatchBenchConfig(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_config_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device must be available"):
        bench.DispatchBenchConfig([TINY], device="cuda")


def test_run_benchmark_refuses_anything_but_a_config():
    with pytest.raises(TypeError, match="config"):
        bench.run_benchmark([TINY])


# ------------------------------------------------------------------------------ run and table


def test_run_benchmark_rows_at_a_tiny_size():
    config = bench.DispatchBenchConfig([TINY], ["dense bound", "moe_lib sorted",
                                                "sorted+compile"], rounds=2, threads=1,
                                       clock="process", flops=True)
    rows = bench.run_benchmark(config)
    assert [r["impl"] for r in rows] == ["dense bound", "moe_lib sorted", "sorted+compile",
                                         "dense GEMM"]
    dense, fast, compiled, gemm = rows
    assert dense["fwd_ratio"] == dense["fwdbwd_ratio"] == dense["mem_ratio"] == 1.0
    assert fast["rounds"] == 2 and fast["peak_mib"] > 0 and fast["tflops_fwd"] > 0
    assert "fwd_ms" not in compiled and "--compile" in compiled["note"]
    assert gemm["note"] == "same FLOPs, one GEMM" and gemm["fwdbwd_ms"] > 0
    assert all((r["d"], r["h"], r["E"], r["k"], r["T"]) == TINY for r in rows)


def test_format_table_blocks_per_size_with_na_and_notes():
    rows = [
        dict(d=8, h=6, E=4, k=2, T=32, impl="dense bound", note="", fwd_ms=1.0, fwd_ratio=1.0,
             fwdbwd_ms=2.0, fwdbwd_ratio=1.0, peak_mib=0.5, mem_ratio=1.0),
        dict(d=8, h=6, E=4, k=2, T=32, impl="sorted+compile", note="not run"),
        dict(d=8, h=6, E=8, k=2, T=32, impl="moe_lib sorted", note="", fwd_ms=1.5,
             fwd_ratio=float("nan"), fwdbwd_ms=3.0),
    ]
    lines = bench.format_table(rows).splitlines()
    assert lines[1] == "d_model=8 d_hidden=6 experts=4 k=2 tokens=32"
    assert lines[2].split()[:3] == ["implementation", "fwd", "ms"]
    assert "TFLOP/s" not in lines[2]
    assert lines[4].split() == ["dense", "bound", "1.0", "1.00", "2.0", "1.00", "0.5", "1.00"]
    assert lines[5].split()[1:7] == ["n/a"] * 6 and lines[5].endswith("(not run)")
    assert "experts=8" in lines[7]
    assert lines[-1].split()[2:5] == ["1.5", "n/a", "3.0"]
    with_flops = bench.format_table([dict(rows[0], tflops_fwd=0.1, tflops_fwdbwd=0.2)])
    assert "TFLOP/s" in with_flops and with_flops.splitlines()[-1].split()[-2:] == ["0.1", "0.2"]
    assert bench.format_table([]) == ""


def test_format_table_errors_name_the_argument():
    with pytest.raises(TypeError, match="rows"):
        bench.format_table({"impl": "x"})
    with pytest.raises(TypeError, match=r"rows\[0\]"):
        bench.format_table(["x"])
    with pytest.raises(ValueError, match=r"rows\[0\].*misses \['T'\]"):
        bench.format_table([dict(d=1, h=1, E=1, k=1, impl="x")])


def test_stage_times_at_a_tiny_size():
    out = stage_times(*TINY, rounds=2, threads=1, clock="process")
    assert tuple(out) == STAGES
    assert all(math.isfinite(v) and v >= 0 for v in out.values())
    assert out["experts"] > 0 and out["dense bound"] > 0


@pytest.mark.parametrize(
    "kwargs, name",
    [({"T": 0}, "T"), ({"rounds": 0}, "rounds"), ({"threads": 0}, "threads"),
     ({"clock": "cpu"}, "clock"), ({"dtype": torch.int64}, "dtype"), ({"k": 5}, "k")],
)
def test_stage_times_errors_name_the_argument(kwargs, name):
    args = dict(zip("dhEkT", TINY), **kwargs)
    with pytest.raises((TypeError, ValueError), match=name):
        stage_times(**args)


def test_flops_and_sizes():
    assert bench.expert_flops(T=10, d=4, h=3, k=2) == 2 * 10 * 2 * 3 * 4 * 3
    with pytest.raises(ValueError, match="k"):
        bench.expert_flops(10, 4, 3, 0)
    assert bench.parse_sizes("1,2,3,4,5;6,7,8,2,9") == [(1, 2, 3, 4, 5), (6, 7, 8, 2, 9)]
    for bad in ("1,2,3", "1,2,x,4,5"):
        with pytest.raises(Exception, match="d,h,E,k,T"):
            bench.parse_sizes(bad)


# --------------------------------------------------------------------------- command lines


def test_dispatch_main_prints_the_table(capsys):
    bench.main(["--sizes", "8,8,4,2,32", "--rounds", "1", "--threads", "1", "--clock",
                "process", "--impls", "dense bound,mask loop,moe_lib sorted"])
    out = capsys.readouterr().out
    assert "device=cpu dtype=torch.float32 threads=1 clock=process" in out
    assert "d_model=8 d_hidden=8 experts=4 k=2 tokens=32" in out
    table = [line.split()[0] for line in out.splitlines() if line.startswith(("dense", "mask",
                                                                              "moe_lib"))]
    assert table == ["dense", "mask", "moe_lib"]
    assert "1-minute load average" in out


@pytest.mark.parametrize(
    "argv",
    [["--sizes", "8,6,4"], ["--impls", "nope"], ["--rounds", "0"], ["--threads", "2",
                                                                    "--clock", "process"],
     ["--dtype", "int8"]],
)
def test_dispatch_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sizes", "8,8,4,2,32", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_moe_vs_dense_main_prints_runs_and_last_line_json(tmp_path, capsys):
    out_file = tmp_path / "runs.json"
    moe_vs_dense.main(["--quick", "--steps", "2", "--seeds", "0", "--no-progress", "--device",
                       "cpu", "--out", str(out_file), "--set", "d_model=16", "n_layers=1",
                       "n_heads=2", "h=8", "seq_len=16", "batch=4", "max_bytes=20000",
                       "eval_batches=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "seed", "val", "loss", "active", "total", "time", "s"]
    assert [line.split()[0] for line in lines[1:4]] == ["moe", "dense_active", "dense_total"]
    last = json.loads(lines[-1])
    assert last["seeds"] == [0] and last["moe_active_params"] < last["moe_total_params"]
    stored = json.loads(out_file.read_text())
    assert stored["summary"] == last and len(stored["runs"]) == 3
    meta = stored["meta"]
    assert meta["settings"]["d_model"] == 16 and meta["settings"]["steps"] == 2
    assert meta["device"].startswith("CPU: ") and meta["torch"] == torch.__version__
    assert meta["threads"] >= 1 and meta["seconds"] > 0


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--seeds", "1", "1"], ["--set", "n_heads=5"], ["--set", "width=3"],
     ["--set", "lr=fast"], ["--device", "tpu?"]],
)
def test_moe_vs_dense_main_reports_bad_options_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        moe_vs_dense.main(["--quick", "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------ moe_vs_dense


def test_bench_configs_match_active_and_total():
    s = replace(moe_vs_dense.QUICK, d_model=16, n_heads=2, h=8, seq_len=16)
    cfgs = moe_vs_dense.model_configs(s)
    assert set(cfgs) == set(moe_vs_dense.MODELS)
    counts = {name: ffn_parameter_counts(Transformer(c)) for name, c in cfgs.items()}
    router = s.n_layers * s.d_model * moe_vs_dense.NUM_EXPERTS
    assert counts["dense_active"]["total"] == counts["moe"]["active"] - router
    assert counts["dense_total"]["total"] == counts["moe"]["total"] - router
    assert cfgs["moe"].moe.top_k == moe_vs_dense.TOP_K == s.top_k
    assert cfgs["moe"].moe.num_experts == moe_vs_dense.NUM_EXPERTS


def test_bench_configs_follow_the_number_of_experts():
    s = replace(moe_vs_dense.QUICK, d_model=16, n_heads=2, h=8, num_experts=4, top_k=1)
    cfgs = moe_vs_dense.model_configs(s)
    assert cfgs["moe"].moe.num_experts == 4 and cfgs["moe"].moe.top_k == 1
    assert (cfgs["dense_active"].d_hidden, cfgs["dense_total"].d_hidden) == (8, 32)


def test_bench_run_and_summary():
    s = tiny_lm_settings()
    kept: dict = {}
    runs = moe_vs_dense.run(s, [0, 1], "cpu", progress=False, keep=kept)
    names = moe_vs_dense.MODELS
    assert set(kept) == {(m, seed) for m in names for seed in (0, 1)}
    assert all(isinstance(m, Transformer) and not m.training for m in kept.values())
    assert len(runs) == 6 and {r["model"] for r in runs} == set(names)
    for r in runs:
        assert r["val_loss"] > 0 and r["curve"]["step"] == [0, 1]
    out = moe_vs_dense.summary(runs, [0, 1])
    assert out["seeds"] == [0, 1]
    mean = sum(r["val_loss"] for r in runs if r["model"] == "moe") / 2
    assert out["moe_val_loss"] == pytest.approx(mean)
    assert out["moe_active_params"] < out["moe_total_params"]
    assert out["dense_active_params"] < out["dense_total_params"]
    assert moe_vs_dense.format_runs(runs).count("\n") == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_run_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device must be available"):
        moe_vs_dense.run(tiny_lm_settings(), [0], "cuda")


def test_quick_and_full_settings():
    assert moe_vs_dense.QUICK.steps == 300 and moe_vs_dense.FULL.max_bytes is None
    assert moe_vs_dense.QUICK.to_dict() == {
        "d_model": 64, "n_layers": 2, "n_heads": 4, "h": 64, "seq_len": 64, "batch": 16,
        "steps": 300, "lr": 3e-3, "max_bytes": 400_000, "eval_batches": 8, "num_experts": 8,
        "top_k": 2}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"d_model": 0}, "d_model"),
        ({"n_heads": 3}, "n_heads"),
        ({"steps": 1.5}, "steps"),
        ({"steps": None}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"lr": "3e-3"}, "lr"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"eval_batches": True}, "eval_batches"),
        ({"top_k": 9}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_settings_errors_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        replace(moe_vs_dense.QUICK, **kwargs)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: moe_vs_dense.model_configs({"d_model": 16}), "settings"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [], "cpu"), "seeds"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), 0, "cpu"), "seeds"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [0, 0], "cpu"), "seeds"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [-1], "cpu"), r"seeds\[0\]"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [0], "tpu?"), "device"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [0], "cpu", progress=None), "progress"),
        (lambda: moe_vs_dense.run(tiny_lm_settings(), [0], "cpu", keep=[]), "keep"),
        (lambda: moe_vs_dense.summary([], [0]), "every model"),
        (lambda: moe_vs_dense.summary([{"model": "moe"}], [0]), r"results\[0\]"),
        (lambda: moe_vs_dense.summary(None, [0]), "results"),
        (lambda: moe_vs_dense.format_runs([{"model": "moe", "seed": 0}]), r"results\[0\]"),
        (lambda: moe_vs_dense.parse_overrides(["steps"]), "FIELD=VALUE"),
    ],
)
def test_moe_vs_dense_errors_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call()


# ------------------------------------------------------------------------- results, machine


def test_load_the_stored_result():
    assert STORED in results.names()
    stored = results.load(STORED)
    assert results.load(STORED + ".json") == stored
    assert set(stored) == {"meta", "runs", "summary"}
    assert stored["meta"]["settings"]["steps"] == 1500
    assert len(stored["runs"]) == 9 and stored["summary"]["seeds"] == [0, 1, 2]
    assert {r["model"] for r in stored["runs"]} == set(moe_vs_dense.MODELS)


def test_load_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=f"name must be one of the stored results.*{STORED}"):
        results.load("moe_vs_dense_full")
    with pytest.raises(TypeError, match="name"):
        results.load(None)


def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test  CPU 9000\n")
    assert cpu_model(info) == "Test CPU 9000"
    assert cpu_model(tmp_path / "missing")  # platform's answer, never empty
    with pytest.raises(TypeError, match="cpuinfo"):
        cpu_model("/proc/cpuinfo")
    assert describe_device("cpu").startswith("CPU: ")
    record = machine_record("cpu")
    assert set(record) == {"device", "cpu_count", "threads", "torch", "python"}
