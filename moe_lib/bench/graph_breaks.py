"""Where ``torch.compile`` breaks the graph of the sorted dispatch, forward and backward."""

from __future__ import annotations

import linecache
import logging
import re
from pathlib import Path

import torch

from moe_lib.bench.impls import check_size, layer_fn
from moe_lib.checks import check_positive_int
from moe_lib.layer import MoE

_GRAPH_BREAK_LOG = "torch._dynamo.symbolic_convert.__graph_breaks"


def compile_report(d: int, h: int, E: int, k: int, T: int = 256) -> str:
    """Where ``torch.compile`` breaks the graph of ``MoE(d, h, E, k, dispatch="sorted")`` on
    ``x: [T, d]``, forward and backward.

    Traces with the "eager" backend (no code generation, so it is quick) and collects dynamo's
    graph-break log. The first line counts the breaks; then one line per place,
    ``"  n x file.py:line (reason): code"``.
    """
    check_size("", d, h, E, k)
    check_positive_int("T", T)
    import torch._dynamo as dynamo

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger(_GRAPH_BREAK_LOG)
    handler = Collect()
    torch._logging.set_logs(graph_breaks=True)
    log.addHandler(handler)
    log.propagate = False
    try:
        torch.manual_seed(0)
        m = MoE(d, h, E, k, dispatch="sorted")
        x = torch.randn(T, d, requires_grad=True)
        dynamo.reset()
        torch.compile(layer_fn(m), backend="eager")(x).sum().backward()
    finally:
        log.removeHandler(handler)
        log.propagate = True
        torch._logging.set_logs()
        dynamo.reset()
    places: dict[str, int] = {}
    for msg in records:
        where = re.search(r"in user code at (\S+):(\d+)", msg)
        if not where:
            continue
        body = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
        reason = body[1] if len(body) > 1 else "?"  # e.g. "Data dependent operator"
        code = linecache.getline(where.group(1), int(where.group(2))).strip()
        key = f"{Path(where.group(1)).name}:{where.group(2)} ({reason}): {code[:60]}"
        places[key] = places.get(key, 0) + 1
    out = [f"torch.compile of moe_lib sorted: {sum(places.values())} graph breaks"]
    out += [f"  {n} x {key}" for key, n in places.items()]
    return "\n".join(out)
