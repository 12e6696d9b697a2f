"""The command line shared by the training experiments of :mod:`moe_lib.bench`.

Every experiment (``moe_vs_dense``, ``fine_grained``, ``loss_free``, ``expert_choice``,
``upcycling``, ...) trains a few models over a few seeds with a ``QUICK`` (CPU) or ``FULL``
settings record and writes ``{"meta", "runs", "summary"}`` to a JSON file. This module holds
what their command lines have in common:

- :func:`experiment_parser`: ``--quick``, ``--seeds``, ``--steps``, ``--device``, ``--threads``,
  ``--out``, ``--no-progress``, ``--set FIELD=VALUE ...``;
- :func:`check_seeds`, :func:`parse_overrides` (``--set``) and :func:`check_results` (what
  ``run()`` returned), which refuse bad values with the argument's name;
- :func:`write_results`: the machine, the settings, the wall and CPU time and the command line in
  ``meta``, then the runs and the summary.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moe_lib.bench.machine import machine_record
from moe_lib.checks import check_int, check_type
from moe_lib.runtime import as_device, default_device


def check_seeds(seeds: object) -> list[int]:
    """``seeds`` as a list of distinct ints in ``[0, 2**32 - 1]`` (at least one)."""
    if not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds must be a list of ints, got {type(seeds).__name__} {seeds!r}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    for i, seed in enumerate(seeds):
        check_int(f"seeds[{i}]", seed, low=0, high=2**32 - 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    return list(seeds)


def parse_overrides(items: list[str], settings_type: type, strings: bool = False) -> dict:
    """``["d_model=128", "max_bytes=None"]`` -> ``{"d_model": 128, "max_bytes": None}`` for
    ``dataclasses.replace(settings, **overrides)`` (which checks the values); every FIELD must be
    a field of the dataclass ``settings_type``. A VALUE is a Python literal; with
    ``strings=True`` one that is not is kept as a string (``dtype=bfloat16``)."""
    check_type("items", items, list)
    if not (isinstance(settings_type, type) and is_dataclass(settings_type)):
        raise TypeError(f"settings_type must be a dataclass, got {settings_type!r}")
    known = [f.name for f in fields(settings_type)]
    out = {}
    for item in items:
        check_type("items[...]", item, str)
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"an override is FIELD=VALUE with FIELD one of {known}, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            if not strings:
                raise ValueError(f"the value of {key} must be a number or None, "
                                 f"got {text!r}") from err
            out[key] = text
    return out


def parse_size_list(text: str, fields: str) -> list[tuple[int, ...]]:
    """``"1,2,3;4,5,6"`` with ``fields="d,h,E"`` -> ``[(1, 2, 3), (4, 5, 6)]``: the ``--sizes``
    of the benchmarks, one tuple of ``len(fields.split(","))`` ints per ``;``-separated part. A
    malformed part raises ``argparse.ArgumentTypeError``, which argparse reports as a usage error
    naming the option."""
    check_type("text", text, str)
    check_type("fields", fields, str)
    n = len(fields.split(","))
    sizes = []
    for part in text.split(";"):
        try:
            vals = tuple(int(v) for v in part.split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"a size is {fields} ({n} ints); got {part!r}")
        sizes.append(vals)
    return sizes


def experiment_parser(module: str, doc: str | None, seeds: list[int],
                      settings_help: str = "fields of Settings",
                      threads: int | None = 1) -> argparse.ArgumentParser:
    """The parser of ``python -m moe_lib.bench.<module>`` with the options every experiment has
    (an experiment adds its own: ``--variants``, ``--methods`` ...). ``threads``: the default of
    ``--threads`` (None: leave torch's default)."""
    check_type("module", module, str)
    check_seeds(seeds)
    if threads is not None:
        check_int("threads", threads, low=1)
    p = argparse.ArgumentParser(prog=f"python -m moe_lib.bench.{module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-scale settings (used by the book)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads (default {threads or 'torch default'})")
    p.add_argument("--out", default=None, help="also write all runs to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help=f"override settings ({settings_help})")
    return p


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, quick: object,
                       full: object, with_steps: Callable[[Any, int], Any] | None = None,
                       ) -> tuple[Any, list[int], torch.device]:
    """The settings (``quick`` or ``full``, then ``--set``, then ``--steps`` through
    ``with_steps(settings, steps)``, by default ``replace(settings, steps=steps)``), the seeds and
    the device of a parsed command line; sets torch's CPU threads. A bad value ends the program
    through ``parser.error`` with the option's name."""
    try:
        s = replace(quick if args.quick else full, **parse_overrides(args.set, type(quick)))
        if args.steps is not None:
            s = with_steps(s, args.steps) if with_steps else replace(s, steps=args.steps)
        seeds = check_seeds(args.seeds)
        device = as_device(args.device)
        if args.threads is not None:
            check_int("--threads", args.threads, low=1)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return s, seeds, device


def check_results(results: object, keys: tuple[str, ...], nonempty: bool = False) -> list[dict]:
    """``results`` as what an experiment's ``run()`` returns: a list of dicts, each holding
    ``keys`` (and at least one when ``nonempty``)."""
    check_type("results", results, list)
    if nonempty and not results:
        raise ValueError("results must hold at least one run of run(), got none")
    for i, r in enumerate(results):
        check_type(f"results[{i}]", r, dict)
        missing = [key for key in keys if key not in r]
        if missing:
            raise ValueError(f"results[{i}] must be a result of run(), misses {missing}")
    return results


class Clock:
    """Wall and process CPU time since construction: ``Clock().seconds()`` -> ``(wall, cpu)``."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def write_results(path: str | Path, module: str, argv: list[str] | None, device: object,
                  settings: object, clock: Clock, runs: list, summary: dict,
                  **meta: object) -> None:
    """Write ``{"meta", "runs", "summary"}`` to ``path``. ``meta`` holds the machine
    (:func:`~moe_lib.bench.machine.machine_record`), ``settings.to_dict()``, ``seconds`` (wall)
    and ``cpu_seconds`` since ``clock`` started, the ``command`` and the experiment's own keys."""
    check_type("path", path, (str, Path))
    check_type("clock", clock, Clock)
    check_type("runs", runs, list)
    check_type("summary", summary, dict)
    wall, cpu = clock.seconds()
    args = sys.argv[1:] if argv is None else argv
    record = {**machine_record(device), "settings": settings.to_dict(), "seconds": wall,
              "cpu_seconds": cpu, "command": f"python -m moe_lib.bench.{module} " + " ".join(args),
              **meta}
    with open(path, "w") as f:
        json.dump({"meta": record, "runs": runs, "summary": summary}, f)
