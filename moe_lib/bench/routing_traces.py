"""Routing traces of a trained MoE language model, and its loss with quantized experts.

Trains the MoE byte-level language model of chapter 8 (:mod:`moe_lib.bench.moe_vs_dense`'s
``QUICK`` settings: d_model 64, 2 layers, 8 SwiGLU experts of hidden 64, top-2, Switch balance
loss and z-loss), the same way and on the same batches as that module does for the MoE of each
seed, then:

- routes ``tokens`` consecutive bytes of the validation split, each byte with the ``seq_len - 1``
  bytes before it as context (one window per byte, ending at it, as in training), and records
  each layer's expert ids: the trace ``[tokens, k]`` per layer, in text order;
- evaluates the validation loss (nats per byte, the same fixed validation batches for every
  variant) with the experts in float32 as trained, rounded to bfloat16, and in weight-only int8
  (:class:`moe_lib.inference.Int8ExpertBank`); the differences are paired (same model, same
  data).

The command line prints a table and, last, one line of JSON (the losses per seed);
``--out FILE`` writes the traces too, with the machine and settings.

    python -m moe_lib.bench.routing_traces --steps 1500 --seeds 0 1 2 --out traces.json

Needs the ``book`` extra (pandas, tqdm) for :mod:`moe_lib.train`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from moe_lib.bench.machine import machine_record
from moe_lib.bench.moe_vs_dense import QUICK, Settings, model_configs
from moe_lib.checks import check_int, check_positive_int, check_type
from moe_lib.data import lm_batch, load_code_corpus
from moe_lib.inference import Int8ExpertBank
from moe_lib.layer import MoE
from moe_lib.models import Transformer
from moe_lib.runtime import as_device, cpu_threads
from moe_lib.train import evaluate, train

VARIANTS = ("float32", "bfloat16", "int8")


def route_positions(model: Transformer, data: torch.Tensor, start: int, tokens: int,
                    chunk: int = 256) -> list[torch.Tensor]:
    """Each MoE layer's expert ids ``[tokens, k]`` for the bytes ``data[start : start + tokens]``,
    each routed at the end of the window of ``seq_len`` bytes that ends at it (eval mode, no
    gradient; ``chunk`` windows per forward pass)."""
    check_type("model", model, Transformer)
    check_positive_int("tokens", tokens)
    check_positive_int("chunk", chunk)
    S = model.cfg.seq_len
    check_int("start", start, low=S - 1, high=data.numel() - tokens)
    device = model.tok.weight.device
    was_training = model.training
    model.eval()
    out: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for a in range(start, start + tokens, chunk):
            ends = torch.arange(a, min(a + chunk, start + tokens))  # [n] last byte of each
            windows = data[ends[:, None] + torch.arange(-S + 1, 1)].long()  # [n, S]
            routings = model(windows.to(device)).routings
            for layer, r in enumerate(routings):
                last = r.expert_ids.view(len(ends), S, -1)[:, -1].cpu()  # [n, k]
                if layer == len(out):
                    out.append([])
                out[layer].append(last)
    model.train(was_training)
    return [torch.cat(parts) for parts in out]


def with_experts(model: Transformer, variant: str) -> Transformer:
    """A copy of ``model`` whose MoE experts are ``variant``: "float32" (as trained),
    "bfloat16" (weights rounded to bfloat16, computed in float32) or "int8"
    (:class:`~moe_lib.inference.Int8ExpertBank`)."""
    check_type("model", model, Transformer)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model = copy.deepcopy(model)
    for block in model.blocks:
        if not isinstance(block.ffn, MoE):
            continue
        bank = block.ffn.experts
        if variant == "bfloat16":
            with torch.no_grad():
                for p in bank.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        elif variant == "int8":
            block.ffn.experts = Int8ExpertBank(bank)
    return model


def run(settings: Settings, seeds: list[int], tokens: int = 4096, eval_batches: int = 32,
        device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Train the MoE of ``settings`` with each seed; return its traces and losses.

    Returns ``{"seeds": [...], "num_experts", "top_k", "start", "tokens", "traces": {seed:
    [layer][token][k] expert ids}, "val_loss": {seed: {variant: loss}}, "train_seconds":
    {seed: s}}``.
    """
    check_type("settings", settings, Settings)
    if not isinstance(seeds, list) or not seeds:
        raise TypeError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    for i, seed in enumerate(seeds):
        check_int(f"seeds[{i}]", seed, low=0, high=2**32 - 1)
    check_positive_int("tokens", tokens)
    check_positive_int("eval_batches", eval_batches)
    device = as_device(device)
    s = settings
    corpus = load_code_corpus(max_bytes=s.max_bytes)
    g = torch.Generator().manual_seed(1234)  # moe_vs_dense's validation batches ...
    val = [lm_batch(corpus["val"], s.batch, s.seq_len, g) for _ in range(s.eval_batches)]
    g_more = torch.Generator().manual_seed(4321)  # ... and more of them for the variants
    val_more = val + [lm_batch(corpus["val"], s.batch, s.seq_len, g_more)
                      for _ in range(max(0, eval_batches - len(val)))]
    start = s.seq_len - 1
    if start + tokens > corpus["val"].numel():
        raise ValueError(f"tokens must be <= {corpus['val'].numel() - start} for this "
                         f"validation split, got {tokens}")
    cfg = model_configs(s)["moe"]
    out: dict = {"seeds": seeds, "num_experts": s.num_experts, "top_k": s.top_k,
                 "start": start, "tokens": tokens, "traces": {}, "val_loss": {},
                 "train_seconds": {}}
    for seed in seeds:
        torch.manual_seed(seed)
        model = Transformer(cfg)
        data_gen = torch.Generator().manual_seed(seed)  # the batches of moe_vs_dense.run

        def next_batch(step: int, gen: torch.Generator = data_gen) -> tuple:
            return lm_batch(corpus["train"], s.batch, s.seq_len, gen)

        res = train(model, next_batch, s.steps, lr=s.lr, eval_batches=val,
                    eval_every=max(1, s.steps // 5), device=device, seed=seed,
                    progress=progress, desc=f"moe seed {seed}")
        traces = route_positions(model, corpus["val"], start, tokens)
        out["traces"][str(seed)] = [t.tolist() for t in traces]
        out["val_loss"][str(seed)] = {v: evaluate(with_experts(model, v), val_more, device)
                                      for v in VARIANTS}
        out["train_seconds"][str(seed)] = res.seconds
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line (``python -m moe_lib.bench.routing_traces --help``)."""
    p = argparse.ArgumentParser(prog="python -m moe_lib.bench.routing_traces",
                                description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        settings = replace(QUICK, steps=args.steps)
        device = as_device(args.device)
        check_positive_int("threads", args.threads)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    start = time.perf_counter()
    with cpu_threads(args.threads):
        result = run(settings, args.seeds, args.tokens, args.eval_batches, device,
                     progress=not args.no_progress)
        machine = machine_record(device)
    seconds = time.perf_counter() - start
    print(f"{'seed':>5}" + "".join(f"{v:>12}" for v in VARIANTS) + f"{'train s':>9}")
    for seed in args.seeds:
        losses = result["val_loss"][str(seed)]
        print(f"{seed:>5}" + "".join(f"{losses[v]:>12.5f}" for v in VARIANTS)
              + f"{result['train_seconds'][str(seed)]:>9.0f}")
    if args.out:
        meta = {**machine, "settings": settings.to_dict(), "seconds": seconds,
                "eval_batches": args.eval_batches}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, **result}, f)
    print(json.dumps({"val_loss": result["val_loss"], "seeds": args.seeds}))


if __name__ == "__main__":
    main()
