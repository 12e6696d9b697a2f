"""Bad input, across moe_lib's whole public API: every public function and class refuses it before
any work with a ValueError or TypeError that names the argument.

Each case is ``(what, call, exception, word)``: ``call()`` must raise ``exception`` with ``word``
(the argument's name, or the allowed range) in its message. The last test checks that every
public function and class of the core, models, data, train and presentation modules has at
least one case here, so a new public name cannot skip its checks.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import moe_lib
from moe_lib import (
    ExpertBank,
    FeedForward,
    MoE,
    MoEConfig,
    Permutation,
    activations,
    capacity,
    data,
    dispatch,
    inference,
    interop,
    kernels,
    losses,
    permute,
    routers,
    routing,
    runtime,
    stats,
)
from moe_lib.models import Block, SelfAttention, Transformer, TransformerConfig
from moe_lib.shared import SharedExperts
from tests.helpers import random_routing

R = random_routing(4, 3, 2)  # 4 tokens, 3 experts, top-2
X = torch.randn(4, 5)
BANK = ExpertBank(3, 5, 4, "swiglu")
W_IN, W_OUT = torch.randn(3, 5, 8), torch.randn(3, 4, 5)
HUGE = 1e308
NAN, INF = float("nan"), float("inf")


def perm():
    return Permutation.from_routing(R)


CASES = [
    # ---------------------------------------------------------------- runtime
    ("runtime.seed_everything", lambda: runtime.seed_everything(-1), ValueError, "seed"),
    ("runtime.available_device", lambda: runtime.available_device("tpu:x"), ValueError,
     "device"),
    ("runtime.available_device", lambda: runtime.available_device(0, "where"), TypeError,
     "where"),
    ("runtime.seed_everything", lambda: runtime.seed_everything(2**40), ValueError, "seed"),
    ("runtime.seed_everything", lambda: runtime.seed_everything(1.5), TypeError, "seed"),
    ("runtime.as_device", lambda: runtime.as_device("gpu0"), ValueError, "device"),
    ("runtime.as_device", lambda: runtime.as_device(0), TypeError, "device"),
    ("runtime.synchronize", lambda: runtime.synchronize("nowhere"), ValueError, "device"),
    ("runtime.cpu_threads", lambda: runtime.cpu_threads(0).__enter__(), ValueError, "n"),
    ("runtime.cpu_threads", lambda: runtime.cpu_threads(True).__enter__(), TypeError, "n"),
    ("runtime.import_extra", lambda: runtime.import_extra("no_such_module_xyz", "book"),
     ImportError, "moe_lib[book]"),
    ("runtime.import_extra", lambda: runtime.import_extra(None, "book"), TypeError, "module"),
    # ---------------------------------------------------------------- activations
    ("activations.in_width", lambda: activations.in_width(0, "relu"), ValueError, "d_hidden"),
    ("activations.in_width", lambda: activations.in_width(4, "tanh"), ValueError, "kind"),
    ("activations.ffn_params", lambda: activations.ffn_params(-1, 4, "relu"), ValueError,
     "d_model"),
    ("activations.activation", lambda: activations.activation(X, "tanh"), ValueError, "kind"),
    ("activations.activation", lambda: activations.activation(X.long(), "relu"), TypeError, "h"),
    ("activations.activation", lambda: activations.activation(torch.randn(2, 3), "swiglu"),
     ValueError, "even"),
    ("activations.activation_from_saved",
     lambda: activations.activation_from_saved(torch.randn(2, 4), None, "swiglu"), TypeError,
     "silu_gate"),
    ("activations.activation_backward",
     lambda: activations.activation_backward([1.0], torch.randn(2, 4), "relu"), TypeError,
     "grad_act"),
    ("activations.activation_backward",
     lambda: activations.activation_backward(torch.randn(2, 4), torch.randn(2, 4), "elu"),
     ValueError, "kind"),
    ("activations.activation",
     lambda: activations.activation(torch.randn(2, 3), "clamped_swiglu"), ValueError, "even"),
    ("activations.activation_from_saved",
     lambda: activations.activation_from_saved(torch.randn(2, 4), torch.randn(2, 3),
                                               "clamped_swiglu"), ValueError, "silu_gate"),
    ("activations.ffn_params", lambda: activations.ffn_params(4, 4, "relu", bias=1), TypeError,
     "bias"),
    ("activations.ExpertActivation",
     lambda: activations.ExpertActivation("clamped_swiglu", alpha=0.0), ValueError, "alpha"),
    ("activations.ExpertActivation",
     lambda: activations.ExpertActivation("clamped_swiglu", limit=NAN), ValueError, "limit"),
    ("activations.ExpertActivation",
     lambda: activations.ExpertActivation("clamped_swiglu", limit="7"), TypeError, "limit"),
    ("activations.ExpertActivation", lambda: activations.ExpertActivation("relu", limit=3.0),
     ValueError, "clamped_swiglu"),
    ("activations.ExpertActivation", lambda: activations.ExpertActivation("swish"), ValueError,
     "kind"),
    ("activations.activation_spec", lambda: activations.activation_spec("clamped", alpha=1.0),
     ValueError, "kind"),
    ("activations.activation_spec",
     lambda: activations.activation_spec("clamped_swiglu", alpha=INF), ValueError, "alpha"),
    ("activations.activation_spec", lambda: activations.activation_spec("gelu", limit=1.0),
     ValueError, "limit"),
    # ---------------------------------------------------------------- routing
    ("routing.router_dtype", lambda: routing.router_dtype(torch.ones(2, dtype=torch.int32)),
     TypeError, "x"),
    ("routing.no_autocast", lambda: routing.no_autocast("cpu"), TypeError, "device"),
    ("routing.make_routing", lambda: routing.make_routing(torch.tensor([[0, 3]]), torch.ones(1, 2),
                                                          torch.zeros(1, 3)), ValueError, "[0, 2]"),
    ("routing.make_routing", lambda: routing.make_routing(torch.tensor([[0, -1]]),
                                                          torch.ones(1, 2), torch.zeros(1, 3)),
     ValueError, "expert_ids"),
    ("routing.make_routing", lambda: routing.make_routing(torch.tensor([[0.0, 1.0]]),
                                                          torch.ones(1, 2), torch.zeros(1, 3)),
     TypeError, "expert_ids"),
    ("routing.make_routing", lambda: routing.make_routing(torch.tensor([[0, 1]]), torch.ones(2, 2),
                                                          torch.zeros(1, 3)), ValueError,
     "weights"),
    ("routing.make_routing", lambda: routing.make_routing(torch.tensor([[0, 1]]), torch.ones(1, 2),
                                                          torch.zeros(3)), ValueError, "logits"),
    ("routing.topk_weights", lambda: routing.topk_weights(torch.zeros(2, 3), 4, "raw"),
     ValueError, "k"),
    ("routing.topk_weights", lambda: routing.topk_weights(torch.zeros(2, 3), 2, "softmax"),
     ValueError, "weighting"),
    ("routing.topk_weights", lambda: routing.topk_weights(torch.zeros(3), 1, "raw"), ValueError,
     "scores"),
    ("routing.Routing", lambda: R.gates(kept_only="yes"), TypeError, "kept_only"),
    ("routing.Routing", lambda: R.with_kept(torch.ones(4, 2)), TypeError, "kept"),
    ("routing.Routing", lambda: R.with_kept(torch.ones(4, 3, dtype=torch.bool)), ValueError,
     "kept"),
    ("routers.DenseRouter", lambda: routers.DenseRouter(0, 3), ValueError, "d_model"),
    ("routers.DenseRouter", lambda: routers.DenseRouter(5, 3)(torch.randn(4, 6)), ValueError,
     "x"),
    ("routers.DenseRouter", lambda: routers.DenseRouter(5, 3)(torch.randn(2, 4, 5)), ValueError,
     "x"),
    ("routers.DenseRouter", lambda: routers.DenseRouter(5, 3).logits(torch.ones(4, 5).long()),
     TypeError, "x"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 3, top_k=4), ValueError, "top_k"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 3, jitter_eps=1.5), ValueError,
     "jitter_eps"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 3, jitter_eps=NAN), ValueError,
     "jitter_eps"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 3, weighting=None), ValueError,
     "weighting"),
    ("routers.NoisyTopKRouter", lambda: routers.NoisyTopKRouter(5, 3, noise_scale=INF),
     ValueError, "noise_scale"),
    ("routers.NoisyTopKRouter", lambda: routers.NoisyTopKRouter(5, 3, noise_scale="1"),
     TypeError, "noise_scale"),
    ("routing.score_experts", lambda: routing.score_experts(torch.zeros(2, 3), "tanh"),
     ValueError, "score"),
    ("routing.score_experts", lambda: routing.score_experts(torch.zeros(3), "softmax"),
     ValueError, "logits"),
    ("routing.select_experts", lambda: routing.select_experts(torch.zeros(2, 8), 2, n_group=4),
     ValueError, "topk_group"),
    ("routing.select_experts", lambda: routing.select_experts(torch.zeros(2, 8), 2, 3, 1),
     ValueError, "n_group must divide"),
    ("routing.select_experts", lambda: routing.select_experts(torch.zeros(2, 8), 3, 4, 1),
     ValueError, "fewer than top_k"),
    ("routing.check_group_limits", lambda: routing.check_group_limits(8, 2, 0, 1), ValueError,
     "n_group"),
    ("routing.weigh_experts", lambda: routing.weigh_experts(R.expert_ids, R.probs, R.logits,
                                                            "raw", routed_scaling_factor=0.0),
     ValueError, "routed_scaling_factor"),
    ("routing.weigh_experts", lambda: routing.weigh_experts(R.expert_ids.float(), R.probs,
                                                            R.logits, "raw"), TypeError,
     "expert_ids"),
    ("routing.with_groups", lambda: routing.with_groups(R, torch.zeros(3).long(), 2), ValueError,
     "groups"),
    ("routing.with_groups", lambda: routing.with_groups(R, None, 0), ValueError, "num_groups"),
    ("routing.concat_routings", lambda: routing.concat_routings([]), ValueError, "routings"),
    ("routing.concat_routings", lambda: routing.concat_routings(R), TypeError, "routings"),
    ("routing.concat_routings", lambda: routing.concat_routings([R, random_routing(4, 5, 2)]),
     ValueError, "experts"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2, score="relu"), ValueError,
     "score"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2, n_group=4), ValueError,
     "topk_group"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2, routed_scaling_factor=INF),
     ValueError, "routed_scaling_factor"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2, selection_bias=1), TypeError,
     "selection_bias"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2).update_selection_bias(0.1),
     ValueError, "selection_bias=True"),
    ("routers.TopKRouter", lambda: routers.TopKRouter(5, 8, 2, selection_bias=True)
     .update_selection_bias(-1.0), ValueError, "gamma"),
    ("routers.expert_choice_capacity", lambda: routers.expert_choice_capacity(0.0, 4, 2),
     ValueError, "capacity_factor"),
    ("routers.expert_choice_capacity", lambda: routers.expert_choice_capacity(1.0, -4, 2),
     ValueError, "num_tokens"),
    ("routers.ExpertChoiceRouter", lambda: routers.ExpertChoiceRouter(5, 4, NAN), ValueError,
     "capacity_factor"),
    ("routers.ExpertChoiceRouter", lambda: routers.ExpertChoiceRouter(5, 4, bias="no"),
     TypeError, "bias"),
    ("shared.SharedExperts", lambda: SharedExperts(5, 4, n_shared=0), ValueError, "n_shared"),
    ("shared.SharedExperts", lambda: SharedExperts(5, 0), ValueError, "d_shared"),
    ("shared.SharedExperts", lambda: SharedExperts(5, 4, gate=None), TypeError, "gate"),
    # ---------------------------------------------------------------- capacity
    ("capacity.expert_capacity", lambda: capacity.expert_capacity(NAN, 4, 2, 3), ValueError,
     "capacity_factor"),
    ("capacity.expert_capacity", lambda: capacity.expert_capacity(True, 4, 2, 3), TypeError,
     "capacity_factor"),
    ("capacity.expert_capacity", lambda: capacity.expert_capacity(1.0, -1, 2, 3), ValueError,
     "num_tokens"),
    ("capacity.expert_capacity", lambda: capacity.expert_capacity(1.0, 4, 4, 3), ValueError,
     "top_k"),
    ("capacity.expert_capacity", lambda: capacity.expert_capacity(1.0, 4, 2, 0), ValueError,
     "num_experts"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, "1"), TypeError,
     "capacity_factor"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, -1.0), ValueError,
     "capacity_factor"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R.expert_ids, 1.0), TypeError,
     "routing"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, 1.0, capacity=2), ValueError,
     "not both"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, capacity=-1), ValueError,
     "capacity"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, capacity=1.5), TypeError,
     "capacity"),
    ("capacity.apply_capacity", lambda: capacity.apply_capacity(R, 1.0, per_group="yes"),
     TypeError, "per_group"),
    # ---------------------------------------------------------------- permute
    ("permute.sort_by_expert", lambda: permute.sort_by_expert(None), TypeError, "routing"),
    ("permute.Permutation", lambda: Permutation.from_routing("r"), TypeError, "routing"),
    ("permute.permute", lambda: permute.permute(torch.randn(3, 5), perm()), ValueError, "x"),
    ("permute.permute", lambda: permute.permute(X, (1, 2)), TypeError, "perm"),
    ("permute.unpermute_combine", lambda: permute.unpermute_combine(torch.randn(7, 5), R.weights,
                                                                    perm()), ValueError, "out"),
    ("permute.unpermute_combine", lambda: permute.unpermute_combine(torch.randn(8, 5),
                                                                    R.weights.double(), perm()),
     TypeError, "weights"),
    # ---------------------------------------------------------------- kernels
    ("kernels.block_rows", lambda: kernels.block_rows(0, 4), ValueError, "h_in"),
    ("kernels.block_rows", lambda: kernels.block_rows(8, 2.0), TypeError, "itemsize"),
    ("kernels.expert_blocks", lambda: list(kernels.expert_blocks([2, -1], 4)), TypeError,
     "counts"),
    ("kernels.expert_blocks", lambda: list(kernels.expert_blocks([2, 1], 0)), ValueError, "rows"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2], "swiglu"),
     ValueError, "counts"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, True], "swiglu"),
     TypeError, "counts"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "relu"),
     ValueError, "w_in"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN.double(), W_OUT, [2, 2, 0],
                                                      "swiglu"), TypeError, "dtype"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN[0], W_OUT, [4], "swiglu"),
     ValueError, "w_in"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "swiglu",
                                                      max_block_rows=0), ValueError,
     "max_block_rows"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "swiglu",
                                                      b_in=torch.zeros(3, 4)), ValueError, "b_in"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "swiglu",
                                                      b_in=[0.0] * 8), TypeError, "b_in"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "swiglu",
                                                      b_out=torch.zeros(3, 5).double()),
     TypeError, "b_out"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0], "swiglu",
                                                      b_out=torch.zeros(3, 5, device="meta")),
     ValueError, "b_out"),
    ("kernels.expert_mlp", lambda: kernels.expert_mlp(X, W_IN, W_OUT, [2, 2, 0],
                                                      "clamped_swiglu", b_out=torch.zeros(5)),
     ValueError, "b_out"),
    ("kernels.grouped_matmul", lambda: kernels.grouped_matmul(X, W_IN, [4, 0, 0],
                                                              torch.zeros(3, 5)), ValueError,
     "bias"),
    ("kernels.grouped_matmul", lambda: kernels.grouped_matmul(X, W_IN, [4, 0, 0],
                                                              torch.zeros(3, 8).half()), TypeError,
     "bias"),
    ("kernels.grouped_matmul", lambda: kernels.grouped_matmul(X, W_IN, [4]), ValueError,
     "counts"),
    ("kernels.grouped_matmul", lambda: kernels.grouped_matmul(X, W_IN.double(), [4, 0, 0]),
     TypeError, "dtype"),
    ("kernels.grouped_matmul", lambda: kernels.grouped_matmul(X, torch.randn(3, 4, 2), [4, 0, 0]),
     ValueError, "w"),
    ("kernels.grouped_mm_available", lambda: kernels.grouped_mm_available("x", W_IN), TypeError,
     "x"),
    ("kernels.swiglu", lambda: kernels.swiglu(torch.randn(4, 3)), ValueError, "even"),
    ("kernels.swiglu", lambda: kernels.swiglu(torch.randn(4)), ValueError, "h"),
    ("kernels.gather_sum", lambda: kernels.gather_sum(X, torch.zeros(2, 2)), TypeError, "pos"),
    ("kernels.gather_sum", lambda: kernels.gather_sum(X, torch.zeros(2, 2, dtype=torch.long),
                                                      torch.ones(2, 3)), ValueError, "weights"),
    ("kernels.permute_rows", lambda: kernels.permute_rows(X, perm().src.float(), perm().pos),
     TypeError, "src"),
    ("kernels.unpermute_combine_rows",
     lambda: kernels.unpermute_combine_rows(torch.randn(8, 5), R.weights, perm().src,
                                            perm().pos, perm().order[:4]), ValueError, "order"),
    # ---------------------------------------------------------------- experts
    ("experts.compute_dtype", lambda: moe_lib.experts.compute_dtype(None), TypeError, "x"),
    ("experts.FeedForward", lambda: FeedForward(5, 0), ValueError, "d_hidden"),
    ("experts.FeedForward", lambda: FeedForward(5, 4)(torch.randn(3, 6)), ValueError, "d_model"),
    ("experts.FeedForward", lambda: FeedForward(5, 4)(torch.ones(3, 5).long()), TypeError, "x"),
    ("experts.ExpertBank", lambda: ExpertBank(3, 5, 4, "swish"), ValueError, "kind"),
    ("experts.ExpertBank", lambda: ExpertBank(3, 5, 4, bias=1), TypeError, "bias"),
    ("experts.ExpertBank", lambda: ExpertBank(3, 5, 4, "relu", bias=None), TypeError, "bias"),
    ("experts.FeedForward", lambda: FeedForward(5, 4, "clamped_swiglu", bias="yes"), TypeError,
     "bias"),
    ("experts.ExpertBank", lambda: BANK.forward_expert(3, X), ValueError, "e"),
    ("experts.ExpertBank", lambda: BANK.forward_all(torch.randn(4, 6)), ValueError, "x"),
    ("experts.ExpertBank", lambda: BANK.forward_slices(X, [4, 0]), ValueError, "counts"),
    # ---------------------------------------------------------------- dispatch
    ("dispatch.dispatch_loop", lambda: dispatch.dispatch_loop(X[:3], R, BANK), ValueError, "x"),
    ("dispatch.dispatch_sorted", lambda: dispatch.dispatch_sorted(X, "R", BANK), TypeError,
     "routing"),
    ("dispatch.dispatch_sorted", lambda: dispatch.dispatch_sorted(X, random_routing(4, 4, 2),
                                                                  BANK), ValueError, "experts"),
    ("dispatch.dispatch_dense", lambda: dispatch.dispatch_dense(X, R, FeedForward(5, 4)),
     TypeError, "experts"),
    ("dispatch.dispatch_direct", lambda: dispatch.dispatch_direct(X, R, FeedForward(5, 4)),
     TypeError, "experts"),
    ("dispatch.dispatch_direct", lambda: dispatch.dispatch_direct(X[:2], R, BANK), ValueError,
     "x"),
    ("dispatch.direct_plan", lambda: dispatch.direct_plan(R.expert_ids), TypeError, "routing"),
    ("kernels.block_activation", lambda: kernels.block_activation(torch.randn(3, 5), "swiglu"),
     ValueError, "even"),
    ("kernels.block_activation", lambda: kernels.block_activation(X, "tanh"), ValueError,
     "kind"),
    ("experts.ExpertBank", lambda: BANK.forward_rows(-1, X), ValueError, "e"),
    ("experts.ExpertBank", lambda: BANK.forward_rows(0, torch.randn(4, 6)), ValueError, "x"),
    ("experts.ExpertBank", lambda: BANK.forward_copies(X, {0: [8]}, 2), ValueError, "copies"),
    ("experts.ExpertBank", lambda: BANK.forward_copies(X, {0: [1]}, 0), ValueError, "top_k"),
    # ---------------------------------------------------------------- inference
    ("inference.expected_touched", lambda: inference.expected_touched(8, 9, 4), ValueError,
     "top_k"),
    ("inference.expected_touched", lambda: inference.expected_touched(8, 2, -1), ValueError,
     "batch"),
    ("inference.expected_touched_from_shares",
     lambda: inference.expected_touched_from_shares(torch.tensor([0.5, 1.5]), 2), ValueError,
     "shares"),
    ("inference.expected_touched_from_shares",
     lambda: inference.expected_touched_from_shares([0.5, 0.5], 2), TypeError, "shares"),
    ("inference.choice_shares", lambda: inference.choice_shares(R.expert_ids, 2), ValueError,
     "expert_ids"),
    ("inference.choice_shares", lambda: inference.choice_shares(R.expert_ids.float(), 3),
     TypeError, "expert_ids"),
    ("inference.touched_per_batch", lambda: inference.touched_per_batch(R.expert_ids, 3, 5),
     ValueError, "batch"),
    ("inference.touched_per_batch",
     lambda: inference.touched_per_batch(R.expert_ids, 3, 2, mode="sequential"), ValueError,
     "mode"),
    ("inference.touched_per_batch",
     lambda: inference.touched_per_batch(R.expert_ids, 3, 2, generator=0), TypeError,
     "generator"),
    ("inference.simulate_expert_cache",
     lambda: inference.simulate_expert_cache(R.expert_ids, 3, 1), ValueError, "capacity"),
    ("inference.simulate_expert_cache",
     lambda: inference.simulate_expert_cache(R.expert_ids, 3, 2, "fifo"), ValueError,
     "policy"),
    ("inference.simulate_expert_cache",
     lambda: inference.simulate_expert_cache(R.expert_ids, 0, 2), ValueError, "num_experts"),
    ("inference.quantize_int8", lambda: inference.quantize_int8(X.long()), TypeError, "w"),
    ("inference.quantize_int8", lambda: inference.quantize_int8(X, dim=2), ValueError, "dim"),
    ("inference.dequantize_int8", lambda: inference.dequantize_int8(X, X), TypeError, "q"),
    ("inference.dequantize_int8",
     lambda: inference.dequantize_int8(X.to(torch.int8), X.long()), TypeError, "scale"),
    ("inference.Int8ExpertBank", lambda: inference.Int8ExpertBank(FeedForward(5, 4)),
     TypeError, "bank"),
    ("inference.Int8ExpertBank", lambda: inference.Int8ExpertBank(BANK).forward_rows(3, X),
     ValueError, "e"),
    # ---------------------------------------------------------------- losses
    ("losses.cv_squared", lambda: losses.cv_squared(torch.ones(2, 2)), ValueError, "v"),
    ("losses.cv_squared", lambda: losses.cv_squared([1.0, 2.0]), TypeError, "v"),
    ("losses.importance", lambda: losses.importance(None), TypeError, "routing"),
    ("losses.importance_loss", lambda: losses.importance_loss(X), TypeError, "routing"),
    ("losses.smooth_load", lambda: losses.smooth_load({}), TypeError, "routing"),
    ("losses.load_loss", lambda: losses.load_loss(1), TypeError, "routing"),
    ("losses.switch_loss", lambda: losses.switch_loss("routing"), TypeError, "routing"),
    ("losses.z_loss", lambda: losses.z_loss(R.logits), TypeError, "routing"),
    ("losses.switch_loss", lambda: losses.switch_loss(R, per_group=1), TypeError, "per_group"),
    ("losses.switch_loss", lambda: losses.switch_loss(R, global_counts=torch.ones(3)),
     ValueError, "global_tokens"),
    ("losses.switch_loss", lambda: losses.switch_loss(R, global_counts=torch.ones(4),
                                                      global_tokens=8), ValueError,
     "global_counts"),
    ("losses.switch_loss", lambda: losses.switch_loss(R, global_counts=torch.ones(3),
                                                      global_tokens=0), ValueError,
     "global_tokens"),
    ("losses.pooled_switch_loss", lambda: losses.pooled_switch_loss([]), ValueError, "routings"),
    ("losses.pooled_switch_loss", lambda: losses.pooled_switch_loss(R), TypeError, "routings"),
    ("losses.pooled_switch_loss", lambda: losses.pooled_switch_loss([R, random_routing(4, 5, 2)]),
     ValueError, "experts"),
    ("losses.sequence_balance_loss", lambda: losses.sequence_balance_loss(None), TypeError,
     "routing"),
    # ---------------------------------------------------------------- stats
    ("stats.expert_shares", lambda: stats.expert_shares(R, kept_only=None), TypeError,
     "kept_only"),
    ("stats.load_cv", lambda: stats.load_cv(None), TypeError, "routing"),
    ("stats.max_violation", lambda: stats.max_violation(R.tokens_per_expert), TypeError,
     "routing"),
    ("stats.drop_rate", lambda: stats.drop_rate([R]), TypeError, "routing"),
    ("stats.utilisation_by_group", lambda: stats.utilisation_by_group(R, torch.arange(4), 3),
     ValueError, "groups"),
    ("stats.mean_gate_by_group", lambda: stats.mean_gate_by_group(R, torch.zeros(3).long(), 1),
     ValueError, "groups"),
    ("stats.shares_over_steps", lambda: stats.shares_over_steps(()), ValueError, "routings"),
    # ---------------------------------------------------------------- layer
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, capacity_factor=HUGE * 10), ValueError,
     "capacity_factor"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, top_k=None, router="dense", weighting="raw"),
     ValueError, "weighting"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, noise_scale=0.5), ValueError, "noise_scale"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, balance_coef=0.1), ValueError,
     "balance_coef"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, z_loss_coef=INF), ValueError, "z_loss_coef"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, top_k=2, router="dense"), ValueError,
     "top_k"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, None), TypeError, "num_experts"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, dispatch="sorted "), ValueError, "dispatch"),
    ("layer.build_router", lambda: moe_lib.layer.build_router({"router": "topk"}), TypeError,
     "config"),
    ("layer.MoE", lambda: MoE(8, 4, 4, capacity_factor=NAN), ValueError, "capacity_factor"),
    ("layer.MoE", lambda: MoE(8, 4, 4)(torch.randn(3, 8, dtype=torch.complex64)), TypeError,
     "dtype"),
    ("layer.MoE", lambda: MoE(8, 4, 4).from_config({"d_model": 8}), TypeError, "config"),
    ("layer.MoE", lambda: MoE(8, 4, 4).aux_losses(None), TypeError, "routing"),
    ("layer.MoE", lambda: setattr(MoE(8, 4, 4), "capacity_factor", 0.0), ValueError,
     "capacity_factor"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, score="sigmoid", router="noisy_topk"),
     ValueError, "score"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, router="expert_choice"), ValueError,
     "capacity_factor"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, router="expert_choice", top_k=2,
                                           capacity_factor=2.0), ValueError, "top_k"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, router="expert_choice", capacity_factor=2.0,
                                           balance_loss="switch"), ValueError, "balance_loss"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, capacity=2, capacity_factor=1.0),
     ValueError, "not both"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, capacity_per="sequence"), ValueError,
     "capacity_per"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, capacity_per="token"), ValueError,
     "capacity_per"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, d_shared=16), ValueError, "n_shared"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, n_shared=-1), ValueError, "n_shared"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, router="dense", selection_bias=True),
     ValueError, "selection_bias"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 8, n_group=4, topk_group=1, top_k=4),
     ValueError, "top_k"),
    ("config.MoEConfig", lambda: MoEConfig(8, 4, 4, routed_scaling_factor=2.5,
                                           router="noisy_topk"), ValueError,
     "routed_scaling_factor"),
    ("layer.MoE", lambda: MoE(8, 4, 4)(torch.randn(2, 3, 8), mask=torch.ones(2, 4)), TypeError,
     "mask"),
    ("layer.MoE", lambda: MoE(8, 4, 4)(torch.randn(2, 3, 8), mask=torch.ones(3, 2).bool()),
     ValueError, "mask"),
    ("layer.MoE", lambda: MoE(8, 4, 4)(torch.randn(2, 3, 8), mask=torch.full((2, 3), 2)),
     ValueError, "mask"),
    ("layer.MoE", lambda: MoE(8, 4, 4).update_selection_bias(1e-3), ValueError,
     "selection_bias"),
    ("layer.MoE", lambda: MoE(8, 4, 4, n_experts=4), TypeError, "n_experts"),
    ("interop.from_hf", lambda: interop.from_hf(MoE(8, 4, 4)), TypeError, "block"),
    ("interop.from_hf", lambda: interop.from_hf(None), TypeError, "block"),
    ("interop.to_hf", lambda: interop.to_hf(MoE(8, 4, 4), "llama"), ValueError, "family"),
    ("interop.to_hf", lambda: interop.to_hf(torch.nn.Linear(2, 2), "mixtral"), TypeError,
     "layer"),
    ("interop.to_hf", lambda: interop.to_hf(MoE(8, 4, 4, expert_bias=True), "mixtral"),
     ValueError, "expert_bias"),
    ("interop.state_to_hf", lambda: interop.state_to_hf("t5", {}), ValueError, "family"),
    ("interop.state_from_hf", lambda: interop.state_from_hf("mixtral", [1]), TypeError,
     "state"),
    ("interop.family_of", lambda: interop.family_of("block"), TypeError, "block"),
    # ---------------------------------------------------------------- models
    ("models.TransformerConfig", lambda: TransformerConfig(ffn="dense", moe={"top_k": 1}),
     ValueError, "moe"),
    ("models.TransformerConfig", lambda: TransformerConfig(moe={"d_model": 8}), ValueError,
     "d_model"),
    ("models.TransformerConfig", lambda: TransformerConfig(moe=[("top_k", 1)]), TypeError, "moe"),
    ("models.TransformerConfig", lambda: TransformerConfig(moe=MoEConfig(32, 128, 4)),
     ValueError, "d_model"),
    ("models.TransformerConfig", lambda: TransformerConfig(moe={"num_experts": 0}), ValueError,
     "num_experts"),
    ("models.TransformerConfig", lambda: TransformerConfig(dropout=NAN), ValueError, "dropout"),
    ("models.TransformerConfig", lambda: TransformerConfig(num_classes=3), ValueError,
     "num_classes"),
    ("models.SelfAttention", lambda: SelfAttention({"d_model": 8}), TypeError, "cfg"),
    ("models.Block", lambda: Block(None), TypeError, "cfg"),
    ("models.Transformer", lambda: Transformer("lm"), TypeError, "cfg"),
    ("models.Transformer", lambda: Transformer(TransformerConfig(seq_len=8))(
        torch.full((2, 4), 256)), ValueError, "vocab_size"),
    ("models.Transformer", lambda: Transformer(TransformerConfig(seq_len=8))(
        torch.zeros(2, 0, dtype=torch.long)), ValueError, "positions"),
    ("models.Transformer", lambda: Transformer(TransformerConfig(seq_len=8))(torch.zeros(2, 4)),
     TypeError, "idx"),
    ("models.ffn_parameter_counts", lambda: moe_lib.models.ffn_parameter_counts(MoE(8, 4, 4)),
     TypeError, "model"),
    # ---------------------------------------------------------------- data
    ("data.package_files", lambda: data.package_files("../etc"), ValueError, "package"),
    ("data.package_files", lambda: data.package_files(None), TypeError, "package"),
    ("data.split_bounds", lambda: data.split_bounds(-1), ValueError, "n"),
    ("data.read_bytes", lambda: data.read_bytes(3), TypeError, "path"),
    ("data.load_code_corpus", lambda: data.load_code_corpus("json"), TypeError,
     "packages"),
    ("data.load_code_corpus", lambda: data.load_code_corpus(()), ValueError, "packages"),
    ("data.load_code_corpus", lambda: data.load_code_corpus(("json",), max_bytes=3),
     ValueError, "empty"),
    ("data.lm_batch", lambda: data.lm_batch(torch.zeros(100).long(), 0, 8,
                                                    torch.Generator()), ValueError, "batch_size"),
    ("data.lm_batch", lambda: data.lm_batch(torch.zeros(100), 2, 8, torch.Generator()),
     TypeError, "data"),
    ("data.lm_batch", lambda: data.lm_batch(torch.zeros(100).long(), 2, 8, 0), TypeError,
     "generator"),
    ("data.lm_batch", lambda: data.lm_batch(torch.zeros(5).long(), 2, 8,
                                                    torch.Generator()), ValueError, "seq_len"),
    ("data.load_package_snippets", lambda: data.load_package_snippets(("json",), 10**9),
     ValueError, "snippet_len"),
    ("data.load_package_snippets", lambda: data.load_package_snippets(("json",), -2),
     ValueError, "snippet_len"),
    ("data.char_classes", lambda: data.char_classes(torch.tensor([300])), ValueError,
     "[0, 255]"),
    ("data.char_classes", lambda: data.char_classes(torch.tensor([1.0])), TypeError,
     "tokens"),
]


# ---------------------------------------------------------------- parallel (no process group)
from moe_lib import parallel  # noqa: E402

CASES += [
    ("parallel.all_to_all", lambda: parallel.all_to_all([1.0], [1], [1]), TypeError, "x"),
    ("parallel.all_to_all", lambda: parallel.all_to_all(X, [4], [4]), ValueError,
     "init_process_group"),
    ("parallel.sum_over_ranks", lambda: parallel.sum_over_ranks(3.0), TypeError, "t"),
    ("parallel.slot_counts", lambda: parallel.slot_counts(None), TypeError, "routing"),
    ("parallel.kept_across_ranks",
     lambda: parallel.kept_across_ranks(R, torch.zeros(2, 3, 3).long(), 0, 1), ValueError,
     "all_slot_counts"),
    ("parallel.kept_across_ranks",
     lambda: parallel.kept_across_ranks(R, torch.zeros(2, 2, 3).long(), 2, 1), ValueError,
     "rank"),
    ("parallel.kept_across_ranks",
     lambda: parallel.kept_across_ranks(R, torch.zeros(2, 2, 3).long(), 0, -1), ValueError,
     "capacity"),
    ("parallel.traffic_model", lambda: parallel.traffic_model(-1, 2, 8, 4, 2), ValueError,
     "tokens"),
    ("parallel.traffic_model", lambda: parallel.traffic_model(10, 2, 8, 4, 0), ValueError,
     "world_size"),
    ("parallel.ExpertParallelMoE", lambda: parallel.ExpertParallelMoE(BANK), TypeError,
     "layer"),
    ("parallel.expert_parallel", lambda: parallel.expert_parallel(MoE(5, 4, 4)), ValueError,
     "init_process_group"),
    ("parallel.spawn", lambda: parallel.spawn(None, 2), TypeError, "fn"),
    ("parallel.spawn", lambda: parallel.spawn(print, 0), ValueError, "world_size"),
    ("parallel.spawn", lambda: parallel.spawn(print, 2, backend="mpi"), ValueError,
     "backend"),
    ("parallel.spawn", lambda: parallel.spawn(print, 2, start_method="thread"), ValueError,
     "start_method"),
    ("parallel.spawn", lambda: parallel.spawn(print, 2, timeout=-1.0), ValueError, "timeout"),
]


# ---------------------------------------------------------------- anatomy, upcycle (chapter 12)
from moe_lib import anatomy, upcycle  # noqa: E402
from moe_lib.models import TransformerConfig as _TC  # noqa: E402

_CARD = anatomy.load("olmoe-1b-7b")


def _dense():
    return Transformer(_TC(d_model=8, n_layers=1, n_heads=2, d_hidden=8, ffn="dense", seq_len=4))


CASES += [
    ("anatomy.load", lambda: anatomy.load("gpt-5"), ValueError, "name"),
    ("anatomy.load", lambda: anatomy.load(5), TypeError, "name"),
    ("anatomy.Published", lambda: anatomy.Published("12.9 B", "x"), ValueError, "value"),
    ("anatomy.Published", lambda: anatomy.Published("12.9B", 3), TypeError, "where"),
    ("anatomy.Published", lambda: anatomy.Published("12.9B", "x").rounds_to(-1.0), ValueError,
     "count"),
    ("anatomy.ModelCard", lambda: anatomy.ModelCard("a", "A", "llama", "x/y", {}, "s"),
     ValueError, "family"),
    ("anatomy.ModelCard", lambda: anatomy.ModelCard("a", "A", "olmoe", "x/y", {}, "s"),
     ValueError, "config"),
    ("anatomy.ParameterCount", lambda: anatomy.count_parameters(_CARD).share("mlp"), ValueError,
     "component"),
    ("anatomy.count_parameters", lambda: anatomy.count_parameters({}), TypeError, "card"),
    ("anatomy.moe_layers", lambda: anatomy.moe_layers(None), TypeError, "card"),
    ("anatomy.routing", lambda: anatomy.routing("olmoe"), TypeError, "card"),
    ("anatomy.attention_flops", lambda: anatomy.attention_flops(_CARD, 0), ValueError, "context"),
    ("anatomy.flops_per_token", lambda: anatomy.flops_per_token(_CARD, 1.5), TypeError,
     "context"),
    ("anatomy.weight_bytes", lambda: anatomy.weight_bytes(_CARD, 0), ValueError, "bits"),
    ("anatomy.weight_bytes", lambda: anatomy.weight_bytes(_CARD, 16, "4"), TypeError,
     "expert_bits"),
    ("anatomy.transformers_count", lambda: anatomy.transformers_count("olmoe"), TypeError,
     "card"),
    ("upcycle.upcycle", lambda: upcycle.upcycle(torch.nn.Linear(2, 2), 4), TypeError, "ffn"),
    ("upcycle.upcycle", lambda: upcycle.upcycle(FeedForward(5, 4), 0), ValueError,
     "num_experts"),
    ("upcycle.upcycle", lambda: upcycle.upcycle(FeedForward(5, 4), 2, d_model=5), ValueError,
     "d_model"),
    ("upcycle.upcycle_model", lambda: upcycle.upcycle_model(None, 2), TypeError, "model"),
    ("upcycle.upcycle_model", lambda: upcycle.upcycle_model(_dense(), 2, layers=[1]), ValueError,
     "layers"),
    ("upcycle.upcycled_equals_dense",
     lambda: upcycle.upcycled_equals_dense(_dense(), _dense(), torch.ones(2)), ValueError, "idx"),
    ("upcycle.upcycled_equals_dense",
     lambda: upcycle.upcycled_equals_dense(_dense(), "x", torch.ones(1, 2).long()), TypeError,
     "upcycled"),
]


# ---------------------------------------------------------------- bench: chapters 9 and 10
from moe_lib.bench import fine_grained, loss_free  # noqa: E402

CASES += [
    ("bench.fine_grained.Variant", lambda: fine_grained.Variant(0), ValueError, "m"),
    ("bench.fine_grained.Variant", lambda: fine_grained.Variant(1, shared="yes"), TypeError,
     "shared"),
    ("bench.fine_grained.variant_config",
     lambda: fine_grained.variant_config(fine_grained.QUICK, "m=1"), TypeError, "variant"),
    ("bench.fine_grained.variant_config",
     lambda: fine_grained.variant_config(fine_grained.QUICK, fine_grained.Variant(3)),
     ValueError, "must divide"),
    ("bench.fine_grained.probe", lambda: fine_grained.probe(MoE(8, 4, 4), torch.zeros(2, 4)),
     TypeError, "model"),
    ("bench.fine_grained.run", lambda: fine_grained.run(fine_grained.QUICK, []), ValueError,
     "seeds"),
    ("bench.fine_grained.paired_differences",
     lambda: fine_grained.paired_differences([], "m=4"), ValueError, "results"),
    ("bench.fine_grained.summary", lambda: fine_grained.summary(None), TypeError, "results"),
    ("bench.fine_grained.format_runs", lambda: fine_grained.format_runs([{}]), ValueError,
     "results[0]"),
    ("bench.loss_free.Method", lambda: loss_free.Method("x", gamma=-1.0), ValueError, "gamma"),
    ("bench.loss_free.Method", lambda: loss_free.Method("x", balance_loss="switch"), ValueError,
     "alpha"),
    ("bench.loss_free.model_config", lambda: loss_free.model_config(loss_free.QUICK, "none"),
     TypeError, "method"),
    ("bench.loss_free.package_corpora", lambda: loss_free.package_corpora("json"), TypeError,
     "packages"),
    ("bench.loss_free.domain_batch",
     lambda: loss_free.domain_batch([], "train", 2, 8, torch.Generator()), TypeError, "corpora"),
    ("bench.loss_free.step_batches",
     lambda: loss_free.step_batches({}, loss_free.QUICK, 0, 1), ValueError, "corpora"),
    ("bench.loss_free.package_probe", lambda: loss_free.package_probe(MoE(8, 4, 4), {}, 8),
     TypeError, "model"),
    ("bench.loss_free.run", lambda: loss_free.run(loss_free.QUICK, [0, 0]), ValueError,
     "seeds"),
    ("bench.loss_free.mean_max_violation", lambda: loss_free.mean_max_violation({}),
     ValueError, "max_violation"),
    ("bench.loss_free.summary", lambda: loss_free.summary([]), ValueError, "results"),
    ("bench.loss_free.format_runs", lambda: loss_free.format_runs([{"method": "x"}]),
     ValueError, "results[0]"),
]


# ---------------------------------------------------------------- bench.cli
from moe_lib.bench import cli as bench_cli  # noqa: E402

CASES += [
    ("bench.cli.check_seeds", lambda: bench_cli.check_seeds([]), ValueError, "seeds"),
    ("bench.cli.check_seeds", lambda: bench_cli.check_seeds("0 1"), TypeError, "seeds"),
    ("bench.cli.parse_size_list", lambda: bench_cli.parse_size_list(["1,2"], "d,h"), TypeError,
     "text"),
    ("bench.cli.check_results", lambda: bench_cli.check_results([{}], ("seed",)), ValueError,
     "results"),
    ("bench.cli.parse_overrides", lambda: bench_cli.parse_overrides(["x=1"], bench_cli.Clock),
     TypeError, "settings_type"),
    ("bench.cli.experiment_parser",
     lambda: bench_cli.experiment_parser("m", None, seeds=[0], threads=0), ValueError,
     "threads"),
    ("bench.cli.write_results",
     lambda: bench_cli.write_results(3, "m", [], "cpu", None, bench_cli.Clock(), [], {}),
     TypeError, "path"),
]


@pytest.mark.parametrize("what, call, exc, word", CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                               enumerate(CASES)])
def test_bad_input_is_refused_with_the_argument_named(what, call, exc, word):
    with pytest.raises(exc) as info:
        call()
    assert word in str(info.value), f"{what}: {info.value}"


def test_capacity_factor_of_1e308_does_not_overflow():
    """A huge but finite factor is allowed and means "never drop": C is capped at T."""
    assert capacity.expert_capacity(HUGE, 10, 2, 4) == 10
    out = MoE(8, 4, 4, capacity_factor=HUGE)(torch.randn(10, 8))
    assert out.routing.dropped == 0


def test_train_and_data_refuse_before_any_work():
    """The training loop checks everything before its first step (no model step is taken)."""
    from moe_lib.train import evaluate, task_loss, train

    model = Transformer(TransformerConfig(seq_len=8, d_model=16, n_heads=2, d_hidden=8))
    before = [p.detach().clone() for p in model.parameters()]
    bad = [
        (lambda: train(model, None, 2), TypeError, "next_batch"),
        (lambda: train(model, lambda s: None, 0), ValueError, "steps"),
        (lambda: train(model, lambda s: None, 2, lr=INF), ValueError, "lr"),
        (lambda: train(model, lambda s: None, 2, eval_batches=[]), ValueError, "eval_batches"),
        (lambda: train(model, lambda s: None, 2, device="tpu9"), ValueError, "device"),
        (lambda: train(model, lambda s: None, 2, progress="no"), TypeError, "progress"),
        (lambda: train(model, lambda s: None, 2, micro_batches=0), ValueError, "micro_batches"),
        (lambda: train(model, lambda s: None, 2, bias_update=-1.0), ValueError, "bias_update"),
        (lambda: train(model, lambda s: None, 2, global_balance_coef=INF), ValueError,
         "global_balance_coef"),
        (lambda: train(MoE(8, 4, 4), lambda s: None, 2), TypeError, "model"),
        (lambda: evaluate(model, torch.zeros(2, 8), "cpu"), TypeError, "batches"),
        (lambda: evaluate(model, [(torch.zeros(2, 8).long(),)], "cpu"), TypeError, "batches"),
        (lambda: task_loss(model(torch.zeros(2, 8).long()), torch.zeros(2, 8)), TypeError, "y"),
        (lambda: task_loss(model(torch.zeros(2, 8).long()), torch.zeros(2, 7).long()),
         ValueError, "y"),
    ]
    for call, exc, word in bad:
        with pytest.raises(exc, match=word):
            call()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_presentation_refuses_bad_input():
    from moe_lib import plot, widgets

    with pytest.raises(ValueError, match="matrix"):
        plot.utilisation_heatmap(torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        plot.utilisation_heatmap(torch.tensor([[1.0, NAN]]))
    with pytest.raises(TypeError, match="matrix"):
        plot.utilisation_heatmap([[1.0]])
    with pytest.raises(ValueError, match="row_labels"):
        plot.utilisation_heatmap(torch.ones(2, 3), row_labels=["a"])
    with pytest.raises(ValueError, match="uniform"):
        plot.utilisation_heatmap(torch.ones(2, 3), uniform=-1.0)
    with pytest.raises(TypeError, match="draw"):
        widgets.slider(None, [1, 2], "k")
    with pytest.raises(TypeError, match="values"):
        widgets.static_slider_html(lambda v: None, "abc", "k")
    with pytest.raises(ValueError, match="start"):
        widgets.static_slider_html(lambda v: None, [1, 2], "k", start=2)
    with pytest.raises(TypeError, match="fig"):
        widgets.figure_png(None)


def test_setup_refuses_bad_seed_and_threads(monkeypatch):
    from moe_lib.notebook import THREADS_ENV, setup

    with pytest.raises(ValueError, match="seed"):
        setup(seed=-3)
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match=THREADS_ENV):
        setup()


MODULES = ("runtime", "activations", "routing", "routers", "config", "shared", "capacity",
           "permute", "kernels", "experts", "inference",
           "dispatch", "losses", "stats", "layer", "models", "data", "train", "interop")
# Records built by the library itself (their constructors take what a validated function made),
# autograd Functions (called through the checked functions of moe_lib.kernels), and functions
# without arguments.
NO_ARGUMENTS_TO_CHECK = {
    "routing.Routing": "a record built by make_routing (checked) and the routers",
    "layer.MoEOutput": "a record built by MoE.forward", "layer.ParameterCounts": "a record",
    "models.ModelOutput": "a record built by Transformer.forward",
    "data.ByteCorpus": "a record built by load_code_corpus",
    "data.SnippetDataset": "a record built by load_package_snippets",
    "runtime.default_device": "takes no argument", "data.stdlib_root": "takes no argument",
    "data.language_reference": "takes no argument",
    "train.TrainResult": "a record built by train",
    "inference.CacheResult": "a record built by simulate_expert_cache",
    "interop.Family": "a record of the family registry, built in the module",
}


MODULES += ("parallel",)
NO_ARGUMENTS_TO_CHECK["parallel.Traffic"] = "a record built by ExpertParallelMoE.forward"
NO_ARGUMENTS_TO_CHECK["parallel.free_port"] = "takes no argument"


# chapter 12: anatomy, upcycle (their cases are above the test that runs CASES)
MODULES += ("anatomy", "upcycle")
NO_ARGUMENTS_TO_CHECK["anatomy.names"] = "takes no argument"
NO_ARGUMENTS_TO_CHECK["anatomy.load_all"] = "takes no argument"


# chapters 9 and 10: the experiment modules behind their stored runs, and their command line
MODULES += ("bench.fine_grained", "bench.loss_free", "bench.cli")
NO_ARGUMENTS_TO_CHECK["bench.cli.Clock"] = "takes no argument"
NO_ARGUMENTS_TO_CHECK["bench.cli.settings_from_args"] = (
    "a command line's parse: bad options end in parser.error naming the option "
    "(tests/test_bench_cli.py)")
NO_ARGUMENTS_TO_CHECK["bench.fine_grained.main"] = (
    "a command line: bad options are usage errors (tests/test_bench_fine_grained.py)")
NO_ARGUMENTS_TO_CHECK["bench.loss_free.main"] = (
    "a command line: bad options are usage errors (tests/test_bench_loss_free.py)")


def _public_names(module_name: str) -> list[str]:
    mod = importlib.import_module(f"moe_lib.{module_name}")
    names = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
            continue  # reached through the checked wrappers of moe_lib.kernels
        if inspect.isfunction(obj) or inspect.isclass(obj):
            names.append(f"{module_name}.{name}")
    return names


def test_every_public_name_has_a_bad_input_case():
    # train's functions are checked in test_train_and_data_refuse_before_any_work
    covered = {c[0] for c in CASES} | {"train.train", "train.evaluate", "train.task_loss"}
    public = [n for m in MODULES for n in _public_names(m)]
    missing = [n for n in public if n not in covered and n not in NO_ARGUMENTS_TO_CHECK]
    assert not missing, f"public names without a bad-input case in this file: {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_available_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="where must be available: cuda needs a CUDA GPU"):
        runtime.available_device("cuda", "where")
    assert runtime.available_device("cpu") == torch.device("cpu")
