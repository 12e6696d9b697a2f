"""Checks on the chapters as files: the table of contents, stripped outputs, the set-up cell.

These read the notebooks as JSON; they do not execute them (``make nb`` does that with nbval).
While ``notebooks/`` holds no notebook yet, every test here is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


def _notebook_paths() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _toc_files(node: object) -> list[str]:
    """Every ``file:`` entry of _toc.yml (root included), in order, at any depth."""
    found: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                found.append(node[key])
        for value in node.values():
            if isinstance(value, (dict, list)):
                found += _toc_files(value)
    elif isinstance(node, list):
        for value in node:
            found += _toc_files(value)
    return found


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


@pytest.fixture(scope="module")
def notebooks() -> dict[str, dict]:
    paths = _notebook_paths()
    if not paths:
        pytest.skip("no notebooks in notebooks/ yet")
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in paths}


@pytest.fixture(scope="module")
def toc_notebooks() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    return [f for f in _toc_files(toc) if f.startswith("notebooks/")]


@pytest.fixture(scope="module")
def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"]
    assert url.startswith("https://"), url
    return url.rstrip("/")


def test_every_toc_notebook_exists(notebooks, toc_notebooks):
    assert toc_notebooks, "_toc.yml lists no notebooks/ entries"
    missing = [
        entry
        for entry in toc_notebooks
        if not (ROOT / entry).with_suffix(".ipynb").is_file() and not (ROOT / entry).is_file()
    ]
    assert not missing, f"listed in _toc.yml but not found: {missing}"


def test_every_notebook_is_in_the_toc(notebooks, toc_notebooks):
    listed = {Path(entry).with_suffix("").as_posix() for entry in toc_notebooks}
    unlisted = [name for name in notebooks if f"notebooks/{Path(name).stem}" not in listed]
    assert not unlisted, f"notebooks missing from _toc.yml: {unlisted}"


def test_notebooks_are_stripped(notebooks):
    """No outputs, execution counts or widget state are committed (run `make strip`)."""
    dirty = []
    for name, nb in notebooks.items():
        for index, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            if cell.get("outputs"):
                dirty.append(f"{name} cell {index}: outputs")
            if cell.get("execution_count") is not None:
                dirty.append(f"{name} cell {index}: execution_count")
        if "widgets" in nb.get("metadata", {}):
            dirty.append(f"{name}: widget state in the notebook metadata")
    assert not dirty, "run `make strip`:\n" + "\n".join(dirty)


def test_cells_hold_no_control_characters(notebooks):
    # A "\\b" written into JSON unescaped becomes a backspace: "\\binom" renders as "inom".
    bad = [(name, i) for name, nb in notebooks.items() for i, cell in enumerate(nb["cells"])
           if any(ch in _source(cell) for ch in "\x07\x08\x0b\x0c")]
    assert not bad, f"control characters (a lost backslash?) in cells: {bad}"


def test_setup_cell_is_shared_and_installs_from_the_repository(notebooks, repository_url):
    first_cells = {}
    for name, nb in notebooks.items():
        code = [_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, f"{name} has no code cell"
        first_cells[name] = code[0]

    reference_name = min(first_cells)
    reference = first_cells[reference_name]
    different = [name for name, src in first_cells.items() if src != reference]
    assert not different, (
        f"the first code cell (the set-up cell) differs from {reference_name}'s in: {different}"
    )
    assert repository_url in reference, (
        f"the set-up cell does not install from the repository in _config.yml ({repository_url})"
    )


def test_cuda_cells_are_not_executed_by_the_book_build(notebooks):
    """A cell tagged "cuda" must also be tagged "skip-execution".

    nbval skips "cuda" cells on a machine without CUDA (tests/conftest.py), but the book build
    (myst-nb, on a CPU) executes every cell except those tagged "skip-execution".
    """
    untagged = []
    for name, nb in notebooks.items():
        for index, cell in enumerate(nb["cells"]):
            tags = cell.get("metadata", {}).get("tags", [])
            if "cuda" in tags and "skip-execution" not in tags:
                untagged.append(f"{name} cell {index}")
    assert not untagged, f"tagged 'cuda' but not 'skip-execution': {untagged}"


# A chapter runs from the installed package alone (as in Colab): it imports moe_lib and the
# libraries of requirements.txt, never code from the clone, and downloads nothing.
ALLOWED_IMPORTS = {"moe_lib", "torch", "numpy", "matplotlib", "seaborn", "pandas", "ipywidgets",
                   "tqdm", "IPython"}
FORBIDDEN_STDLIB = {"urllib", "importlib", "http", "ftplib", "runpy", "pkgutil", "zipimport"}
FORBIDDEN_CODE = ("sys.path", "urlretrieve", "Path.cwd", "__file__", "os.chdir",
                  "raw.githubusercontent", "git clone", "wget ", "curl ")
FORBIDDEN_CALLS = {"exec", "eval", "compile", "__import__"}
FORBIDDEN_ANYWHERE = ("bench/", "tests/", "raw.githubusercontent", "git clone")


def _code_without_magics(source: str) -> str:
    """Cell source with IPython magics and shell escapes (``%pip``, ``!ls``) blanked out."""
    lines = source.splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def _imported_roots(code: str) -> tuple[set[str], set[str]]:
    """Top-level modules the code imports, and the forbidden builtins it calls by name."""
    import ast

    roots, calls = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
    return roots, calls & FORBIDDEN_CALLS


def test_chapters_import_only_moe_lib_and_the_required_libraries(notebooks):
    import sys

    problems = []
    for name, nb in notebooks.items():
        code_cells = [_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
        for index, source in enumerate(code_cells):
            roots, calls = _imported_roots(_code_without_magics(source))
            if calls:
                problems.append(f"{name} code cell {index}: calls {sorted(calls)}")
            if index == 0:
                roots.discard("google")  # the set-up cell's Colab branch
            stdlib = roots & set(sys.stdlib_module_names)
            bad = (roots - ALLOWED_IMPORTS - stdlib) | (stdlib & FORBIDDEN_STDLIB)
            if bad:
                problems.append(f"{name} code cell {index}: imports {sorted(bad)}")
            body = source if index else _code_without_magics(source)
            problems += [f"{name} code cell {index}: {word!r}" for word in FORBIDDEN_CODE
                         if word in body]
        for index, cell in enumerate(nb["cells"]):
            text = _source(cell)
            problems += [f"{name} cell {index}: mentions {word!r}"
                         for word in FORBIDDEN_ANYWHERE if word in text]
    assert not problems, "\n".join(problems)


def test_setup_cell_installs_the_book_extra(notebooks):
    first = next(_source(c) for c in next(iter(notebooks.values()))["cells"]
                 if c["cell_type"] == "code")
    assert '"moe_lib[book] @ git+' in first, first
