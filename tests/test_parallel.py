"""Expert parallelism (moe_lib.parallel): N gloo ranks on the CPU against one process.

Two launches (2 and 4 ranks, started with ``fork`` so that they skip importing torch again) run
every case of :data:`CASES` inside the ranks: each rank compares its output, input gradient,
routing, losses and expert gradients with the single-process MoE on all ranks' tokens
concatenated, and the router's gradient summed over the ranks with the single-process one. A
case's result is "ok" or the traceback; the pytest tests read them. The pure functions (global
capacity from per-rank counts, the traffic model) are tested in this process; the launcher is
tested for errors and time-outs.
"""

from __future__ import annotations

import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from moe_lib import MoE, apply_capacity
from moe_lib.bench import parallel as bench
from moe_lib.parallel import (
    Traffic,
    expert_parallel,
    kept_across_ranks,
    slot_counts,
    spawn,
    traffic_model,
)
from tests.helpers import random_routing

D, H = 6, 5
TIMEOUT = 120.0  # seconds for a whole launch (and each collective)

# name -> (MoE options, tokens per rank (or (sequences, length) for 3-D input), extras)
CASES = {
    "dropless_switch_z": (dict(balance_loss="switch", z_loss_coef=1e-3), [5, 9, 4, 7], {}),
    "capacity_pooled": (dict(capacity_factor=1.0, balance_loss="switch", router_bias=True),
                        [7, 6, 8, 3], {"skew": 1.5}),
    "capacity_slots": (dict(capacity=3, top_k=1), [6, 8, 2, 5], {}),
    "per_sequence": (dict(capacity_factor=1.0, capacity_per="sequence",
                          balance_loss="switch_per_sequence"),
                     [(2, 5), (1, 5), (3, 5), (2, 5)], {}),
    "deepseek": (dict(score="sigmoid", n_group=2, topk_group=1, selection_bias=True,
                      routed_scaling_factor=2.5, n_shared=1, balance_loss="sequence_wise"),
                 [(2, 4), (1, 4), (2, 4), (1, 4)], {"mask": True, "bias_update": True}),
    "qwen_shared_gate": (dict(weighting="raw", n_shared=1, shared_gate=True,
                              balance_loss="switch"), [4, 6, 5, 3], {}),
    "gpt_oss": (dict(weighting="topk_softmax", router_bias=True, expert="clamped_swiglu",
                     expert_bias=True, z_loss_coef=1e-3), [5, 4, 6, 2], {}),
    "noisy_importance": (dict(router="noisy_topk", balance_loss="importance"), [6, 5, 4, 7],
                         {"eval": True}),
    "expert_choice": (dict(router="expert_choice", capacity_factor=2.0, z_loss_coef=1e-3),
                      [6, 7, 3, 5], {}),
    "dense_router": (dict(router="dense"), [3, 4, 2, 5], {}),
    "zero_tokens": (dict(capacity_factor=1.25, balance_loss="switch", z_loss_coef=1e-3),
                    [0, 8, 0, 6], {}),
    "idle_expert": (dict(router_bias=True, balance_loss="switch"), [6, 5, 7, 4],
                    {"idle": 1}),
    "very_skewed": (dict(router_bias=True, capacity_factor=2.0, balance_loss="switch"),
                    [8, 6, 9, 5], {"skew": 30.0}),
    "bf16": (dict(balance_loss="switch"), [6, 5, 4, 7], {"dtype": torch.bfloat16}),
}
TWO_RANKS = list(CASES)
FOUR_RANKS = ["dropless_switch_z", "capacity_pooled", "expert_choice",
              "zero_tokens", "idle_expert", "very_skewed", "bf16"]


def _inputs(name: str, world: int, dtype: torch.dtype):
    """Every rank's input and output gradient (the same on every rank: seeded per case)."""
    _, sizes, extra = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    xs, gs, masks = [], [], []
    for size in sizes[:world]:
        shape = (size, D) if isinstance(size, int) else (*size, D)
        xs.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        gs.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        masks.append(torch.rand(shape[:-1], generator=g) > 0.3 if extra.get("mask") else None)
    return xs, gs, masks


def _layer(name: str, num_experts: int, dtype: torch.dtype) -> MoE:
    options, _, extra = CASES[name]
    torch.manual_seed(0)
    layer = MoE(D, H, num_experts, **options)
    with torch.no_grad():
        if "skew" in extra:  # push tokens towards expert 0 (on rank 0)
            layer.router.gate.weight.mul_(0.1)
            layer.router.gate.bias.zero_()
            layer.router.gate.bias[0] = extra["skew"]
        if "idle" in extra:  # no token ever picks this expert
            layer.router.gate.bias[extra["idle"]] = -1e4
    layer = layer.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return layer.eval() if extra.get("eval") else layer.train()


def _close(a, b, what, dtype):
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def _check_case(name: str, rank: int, world: int) -> None:
    """Run case ``name`` on this rank and compare with one process on all ranks' tokens.

    Every collective runs first and every comparison after, so a failed comparison on one rank
    cannot leave the others waiting in a collective."""
    _, _, extra = CASES[name]
    dtype = extra.get("dtype", torch.float64)
    E = 2 * world
    xs, gs, masks = _inputs(name, world, dtype)

    def cat(ts):
        return None if ts[0] is None else torch.cat(ts)

    ref = _layer(name, E, dtype)
    x_all = cat(xs).clone().requires_grad_()
    ref_out = ref(x_all, mask=cat(masks))
    ((ref_out.y * cat(gs)).sum() + ref_out.aux_loss).backward()

    layer = _layer(name, E, dtype)
    ep = expert_parallel(layer)
    x = xs[rank].clone().requires_grad_()
    out = ep(x, mask=masks[rank])
    ((out.y * gs[rank]).sum() + out.aux_loss).backward()

    # ---- collectives
    replicated = dict(ep.router.named_parameters(prefix="router"))
    if ep.shared is not None:
        replicated.update(ep.shared.named_parameters(prefix="shared"))
    summed = {}
    for pname, p in replicated.items():
        total = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(total)  # the data-parallel sum, the caller's job
        summed[pname] = total
    chosen = out.routing.chosen_counts()
    dist.all_reduce(chosen)
    t = ep.last_traffic
    table = [torch.empty(world, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(table, torch.tensor(t.send_rows))
    if extra.get("bias_update"):
        ref_change = ref.update_selection_bias(1e-3)
        change = ep.update_selection_bias(1e-3)

    # ---- comparisons: this rank's rows of the single-process tensors
    start = sum(v.shape[0] for v in xs[:rank])
    mine = slice(start, start + x.shape[0])
    _close(out.y, ref_out.y[mine], "y", dtype)
    _close(x.grad, x_all.grad[mine], "input gradient", dtype)
    _close(out.aux_loss, ref_out.aux_loss, "aux_loss", dtype)
    assert out.losses.keys() == ref_out.losses.keys(), (out.losses, ref_out.losses)
    for key, value in out.losses.items():
        _close(value, ref_out.losses[key], f"loss {key}", dtype)
    real = [int(m.sum()) if m is not None else v.reshape(-1, D).shape[0]
            for v, m in zip(xs, masks)]
    rows = slice(sum(real[:rank]), sum(real[: rank + 1]))
    r, ref_r = out.routing, ref_out.routing
    assert torch.equal(r.expert_ids, ref_r.expert_ids[rows]), "expert ids"
    assert torch.equal(r.kept, ref_r.kept[rows]), "kept mask (global capacity)"
    ids = r.expert_ids[r.kept]
    assert torch.equal(r.tokens_per_expert, torch.bincount(ids, minlength=E)), "counts"
    local = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
    for pname in ("w_in", "w_out", "b_in", "b_out"):
        p = getattr(ep.experts, pname)
        if p is not None:
            _close(p.grad, getattr(ref.experts, pname).grad[local], f"expert {pname} gradient",
                   dtype)
    ref_params = dict(ref.named_parameters())
    for pname, total in summed.items():
        ref_grad = ref_params[pname].grad
        _close(total, ref_grad if ref_grad is not None else torch.zeros_like(total),
               f"{pname} gradient summed over ranks", dtype)
    if "idle" in extra:
        assert int(ref_r.tokens_per_expert[extra["idle"]]) == 0
    if "skew" in extra:  # expert 0 is chosen by most tokens
        assert int(chosen[0]) > 0.8 * sum(real), chosen
    if extra.get("bias_update"):
        _close(change, ref_change, "selection bias update", dtype)
        _close(ep.router.selection_bias, ref.router.selection_bias, "selection bias", dtype)
    # rank r received from s what s sent to r
    assert torch.stack(table)[:, rank].tolist() == t.recv_rows, (table, t.recv_rows)
    outside = sum(t.send_rows) - t.send_rows[rank] + sum(t.recv_rows) - t.recv_rows[rank]
    assert t.rows_sent == outside


def _check_refusals(rank: int, world: int) -> None:
    """Errors every rank raises alike: E not divisible by N; ranks that disagree."""
    torch.manual_seed(0)
    try:
        expert_parallel(MoE(D, H, 2 * world + 1))
    except ValueError as err:
        assert "divisible" in str(err)
    else:
        raise AssertionError("E not divisible by N was accepted")
    ep = expert_parallel(MoE(D, H, 2 * world))
    x = torch.randn(4, D) if rank == 0 else torch.randn(1, 4, D)  # 2-D on rank 0 only
    try:
        ep(x)
    except ValueError as err:
        assert "same number of input dimensions" in str(err)
    else:
        raise AssertionError("ranks with different input dimensions were accepted")


def _run_cases(rank: int, world: int, names: list[str]) -> dict[str, str]:
    """Inside a rank: every case, "ok" or its traceback."""
    results = {}
    for name in [*names, "refusals"]:
        try:
            if name == "refusals":
                _check_refusals(rank, world)
            else:
                _check_case(name, rank, world)
            results[name] = "ok"
        except Exception:  # reported by the pytest test of this case
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(_run_cases, 2, (TWO_RANKS,), timeout=TIMEOUT, start_method="fork")


@pytest.fixture(scope="module")
def four_ranks():
    return spawn(_run_cases, 4, (FOUR_RANKS,), timeout=TIMEOUT, start_method="fork")


def _assert_ok(results, name):
    for rank, res in enumerate(results):
        assert res[name] == "ok", f"rank {rank}:\n{res[name]}"


@pytest.mark.parametrize("name", [*TWO_RANKS, "refusals"])
def test_two_ranks_equal_one_process(two_ranks, name):
    _assert_ok(two_ranks, name)


@pytest.mark.parametrize("name", [*FOUR_RANKS, "refusals"])
def test_four_ranks_equal_one_process(four_ranks, name):
    _assert_ok(four_ranks, name)


# ------------------------------------------------------------------ in this process


@pytest.mark.parametrize("seed", range(6))
def test_global_capacity_from_counts_equals_one_process(seed):
    """Each rank's kept mask from the gathered slot counts equals apply_capacity on the
    concatenated batch (empty ranks included)."""
    g = torch.Generator().manual_seed(seed)
    N = 1 + seed % 4
    E, k = 4, 1 + seed % 3
    sizes = torch.randint(0, 9, (N,), generator=g).tolist()
    whole = random_routing(sum(sizes), E, k, seed=seed)
    for C in (0, 1, 3, 100):
        expected = apply_capacity(whole, capacity=C).kept
        parts, start = [], 0
        for n in sizes:
            part = random_routing(0, E, k) if n == 0 else random_routing(n, E, k, seed=seed)
            rows = slice(start, start + n)
            part.expert_ids = whole.expert_ids[rows]
            part.kept = whole.kept[rows]
            parts.append(part)
            start += n
        counts = torch.stack([slot_counts(p) for p in parts])
        got = torch.cat([kept_across_ranks(p, counts, r, C) for r, p in enumerate(parts)])
        assert torch.equal(got, expected), (sizes, C)


def test_slot_counts_count_each_slot():
    r = random_routing(7, 5, 3, seed=1)
    counts = slot_counts(r)
    assert counts.shape == (3, 5)
    for j in range(3):
        assert torch.equal(counts[j], torch.bincount(r.expert_ids[:, j], minlength=5))


def test_traffic_model_and_record():
    assert traffic_model(100, 2, 64, 4, 1) == 0.0
    assert traffic_model(100, 2, 64, 4, 4) == 2 * 100 * 2 * 64 * 4 * 3 / 4
    t = Traffic(rank=1, send_rows=[3, 5, 2], recv_rows=[4, 5, 0], dispatch_row_bytes=8,
                combine_row_bytes=4, count_bytes=0)
    assert t.rows_sent == (3 + 2) + (4 + 0)
    assert t.bytes_sent == (3 + 2) * 8 + (4 + 0) * 4
    assert t.bytes_received == (4 + 0) * 8 + (3 + 2) * 4


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        expert_parallel(MoE(D, H, 4))


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    time.sleep(60)  # rank 0 would keep the launch waiting without the launcher's clean-up


def _sleep(rank, world):
    time.sleep(60)


def test_a_failing_rank_stops_the_launch():
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 gives up"):
        spawn(_fail_on_rank_1, 2, timeout=60, start_method="fork")
    assert time.monotonic() - start < 30


def test_a_hanging_launch_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout"):
        spawn(_sleep, 2, timeout=2.0, start_method="fork")
    assert time.monotonic() - start < 15


def test_benchmark_counts_the_bytes_it_sends():
    """Two tiny ranks: rows and bytes follow the model's formula for what they counted, and the
    bytes written to sockets are at least the rows' bytes (gloo adds headers)."""
    s = bench.ParallelSettings(d_model=8, d_hidden=8, num_experts=4, tokens=32, steps=1,
                               warmup=0)
    rows, raw = bench.run(s, [2], [0.0], start_method="fork", timeout=TIMEOUT)
    row, records = rows[0], raw[0]
    assert row["world_size"] == 2 and len(records) == 2
    for rec in records:
        assert rec["bytes_sent"] == rec["rows_sent"] * s.d_model * 4
        if rec["wire_fwd"]:
            assert rec["wire_fwd"][0] >= rec["bytes_sent"]
    assert row["bytes_model"] == traffic_model(32, 2, 8, 4, 2)
    assert "counted/model" in bench.format_table(rows)


def test_benchmark_command_line_prints_a_table_and_a_json_line(capsys, tmp_path):
    out = tmp_path / "parallel.json"
    bench.main(["--world-sizes", "2", "--skews", "0", "2", "--start-method", "fork",
                "--set", "tokens=16", "steps=1", "warmup=0", "d_model=8", "d_hidden=8",
                "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert [(r["world_size"], r["skew"]) for r in summary["rows"]] == [(2, 0.0), (2, 2.0)]
    stored = json.loads(out.read_text())
    assert stored["meta"]["settings"]["tokens"] == 16 and stored["meta"]["threads"] == 1
    assert len(stored["ranks"]) == 2 and len(stored["ranks"][0]) == 2
