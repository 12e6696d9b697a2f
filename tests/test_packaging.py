"""What the installed package needs: the core imports and runs with torch and numpy only, and
the modules that need the ``book`` extra say so when it is missing. Imports flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe_lib"
BOOK_EXTRA = ("matplotlib", "seaborn", "pandas", "ipywidgets", "tqdm", "IPython")
CORE = ("checks", "runtime", "activations", "routing", "capacity", "permute", "kernels",
        "experts", "dispatch", "losses", "stats", "layer", "models", "data", "inference",
        "parallel", "anatomy", "upcycle")
NEEDS_BOOK = ("plot", "widgets", "notebook", "train")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BOOK_EXTRA!r}:
                raise ImportError(f"No module named {{name!r}} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
""")


def run_without_book_extra(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_core_runs_with_torch_and_numpy_only():
    modules = ", ".join(f"moe_lib.{m}" for m in CORE)
    proc = run_without_book_extra(f"""
        import {modules}
        import torch
        from moe_lib import MoE
        layer = MoE(8, 16, 4, top_k=2, balance_loss="switch", capacity_factor=1.0)
        x = torch.randn(10, 8, requires_grad=True)
        out = layer(x)
        (out.y.sum() + out.aux_loss).backward()
        assert x.grad.shape == (10, 8)
        print("core ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "core ok" in proc.stdout


@pytest.mark.parametrize("module", NEEDS_BOOK)
def test_book_modules_name_the_extra_when_it_is_missing(module):
    proc = run_without_book_extra(f"import moe_lib.{module}")
    assert proc.returncode != 0
    assert 'pip install "moe_lib[book]"' in proc.stderr, proc.stderr


# The layers of DESIGN.md's "Shape of moe_lib 0.2", bottom (0) to top.
LAYER = dict(checks=0, runtime=1, activations=1, routing=1, kernels=2, capacity=2, losses=2,
             stats=2, routers=2, permute=3, experts=3, dispatch=4, shared=4, config=5, layer=6,
             models=7, data=7, inference=7, interop=7, parallel=7, train=8, bench=9, plot=9,
             widgets=9, notebook=9, anatomy=7, upcycle=8)


# The one upward import allowed: MoE.from_hf / MoE.to_hf open moe_lib.interop inside the method
# (a door on the layer; importing moe_lib must not import interop, which needs transformers).
LAZY_DOORS = {("layer", "MoE", "from_hf"): "moe_lib.interop", ("layer", "MoE", "to_hf"):
              "moe_lib.interop"}


def _lazy_door_imports(tree: ast.Module, me: str) -> set[int]:
    """ids of the ``from moe_lib.interop import ...`` nodes directly inside a LAZY_DOORS method."""
    allowed = set()
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            module = LAZY_DOORS.get((me, cls.name, getattr(fn, "name", None)))
            if module is None:
                continue
            allowed.update(id(node) for node in fn.body
                           if isinstance(node, ast.ImportFrom) and node.module == module)
    return allowed


def _imports(path: Path, me: str = "") -> set[str]:
    """moe_lib modules that ``path`` imports (first component after ``moe_lib.``), less the
    imports of LAZY_DOORS."""
    found = set()
    tree = ast.parse(path.read_text())
    doors = _lazy_door_imports(tree, me)
    for node in ast.walk(tree):
        if id(node) in doors:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_lib"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "moe_lib" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_imports_flow_one_way():
    """core -> layer -> models/train -> bench/plot/widgets/notebook: a module imports only
    modules of a lower layer (the order of DESIGN.md), so there is no cycle."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if me == "__init__":
            continue
        assert me in LAYER, f"moe_lib/{rel}: give it a layer in this test"
        for other in _imports(path, me):
            if other != me and LAYER.get(other, 99) >= LAYER[me]:
                bad.append(f"moe_lib/{rel} ({me}, layer {LAYER[me]}) imports {other} "
                           f"(layer {LAYER.get(other)})")
    assert not bad, "\n".join(bad)


def test_every_data_file_of_the_package_is_declared_package_data():
    # A data file that pyproject.toml's [tool.setuptools.package-data] does not match is left out
    # of the wheel: the chapter that loads it works in the clone and fails in Colab.
    import fnmatch

    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    data_files = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                  and "__pycache__" not in p.parts]
    assert data_files, "expected the stored results and the model configurations"
    missing = []
    for path in data_files:
        rel = path.relative_to(ROOT)
        matched = False
        for package, patterns in declared.items():
            base = ROOT.joinpath(*package.split("."))
            if base in path.parents and any(
                    fnmatch.fnmatch(path.relative_to(base).as_posix(), pat) for pat in patterns):
                matched = True
        if not matched:
            missing.append(rel.as_posix())
    assert not missing, f"not declared as package data in pyproject.toml: {missing}"
