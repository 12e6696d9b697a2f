"""Stored results of runs too long to repeat whenever the book is built (package data).

Each ``<name>.json`` here was written by a benchmark's ``--out`` option (see ``README.md`` in
this folder for the command and the machine of each). They are read with
``importlib.resources``, so they load the same from a clone, an editable install or a wheel::

    from moe_lib.bench import results
    stored = results.load("moe_vs_dense_quick_1500steps_cpu")   # {"meta", "runs", "summary"}
"""

from __future__ import annotations

import json
from importlib import resources

from moe_lib.checks import check_type


def names() -> list[str]:
    """The names of the stored results, sorted (file names without ``.json``)."""
    folder = resources.files(__name__)
    return sorted(f.name[: -len(".json")] for f in folder.iterdir() if f.name.endswith(".json"))


def load(name: str) -> dict:
    """The stored result ``name`` (with or without ``.json``) as a dict."""
    check_type("name", name, str)
    stem = name[: -len(".json")] if name.endswith(".json") else name
    available = names()
    if stem not in available:
        raise ValueError(f"name must be one of the stored results {available}, got {name!r}")
    text = resources.files(__name__).joinpath(f"{stem}.json").read_text(encoding="utf-8")
    return json.loads(text)
