"""pytest configuration for the unit tests and for the chapters run under nbval.

pytest loads this file by itself for ``pytest tests``. The notebooks live outside ``tests/``, so
``make nb`` loads it explicitly as a plugin: ``pytest -p tests.conftest --nbval-lax notebooks``.

- A notebook cell tagged ``cuda`` (cell metadata ``"tags": ["cuda"]``), and a unit test marked
  ``@pytest.mark.cuda``, is skipped when ``torch.cuda.is_available()`` is False. Such a cell is
  also tagged ``skip-execution`` so that the book build (myst-nb) skips it too; a test in
  test_notebook_setup.py checks that.
- Unit tests draw with matplotlib's Agg backend (no window). It is selected in this process
  only, not through MPLBACKEND: the nbval kernels inherit the environment, and ipykernel uses the
  inline backend only when MPLBACKEND is unset.
- nbval's wait for a finished cell's output is raised from 5 s to ``OUTPUT_TIMEOUT_S``.
- Nothing is mocked: nbval runs every chapter in a real ipykernel with the real ipywidgets.
"""

from __future__ import annotations

import pytest

CUDA_TAG = "cuda"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Unit tests use tiny tensors: extra intra-op threads only cost time (10x on a busy box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config: pytest.Config) -> None:
    import matplotlib

    matplotlib.use("Agg")


def _needs_cuda(item: pytest.Item) -> bool:
    # nbval's IPyNbCell keeps the notebook cell (an nbformat NotebookNode) as ``item.cell``.
    cell = getattr(item, "cell", None)
    if cell is not None:
        tags = cell.get("metadata", {}).get("tags", [])
        return isinstance(tags, list) and CUDA_TAG in tags
    return item.get_closest_marker(CUDA_TAG) is not None


# nbval waits 5 s (a constant, IPyNbCell.output_timeout) for a cell's output messages after the
# cell has finished; on a loaded 2-core machine that wait has run out and failed a chapter that
# was correct (nbval issues #136, #231). The cell's own time limit stays --nbval-cell-timeout.
OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):  # an nbval cell
            item.output_timeout = OUTPUT_TIMEOUT_S
    cuda_items = [item for item in items if _needs_cuda(item)]
    if not cuda_items:
        return
    import torch  # only when something needs it: keeps collection of CPU-only runs fast

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (tagged 'cuda')")
    for item in cuda_items:
        item.add_marker(skip)
