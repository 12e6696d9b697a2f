"""Serve MathJax from the built book, so that its formulas render with no network.

Sphinx loads MathJax from a CDN by default. This extension copies the MathJax 3 ``es5``
distribution of the pinned pip package ``django-static-mathjax`` (see requirements.txt; it
installs a plain folder of static files, importable as ``mathjax``, and needs no Django) into
``_static/mathjax/es5`` of the HTML output; ``_config.yml`` points ``mathjax_path`` there. The
browser test (tests/browser) checks that every formula is typeset and that pages request nothing
from another host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx

TARGET = Path("_static") / "mathjax" / "es5"


def mathjax_es5() -> Path:
    """The ``es5`` folder of the installed MathJax 3 (``tex-mml-chtml.js``, fonts, components)."""
    try:
        import mathjax
    except ImportError as err:  # the book's requirements were not installed
        raise RuntimeError("MathJax is served from the book: pip install the django-static-mathjax "
                           "version pinned in requirements.txt") from err
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        raise RuntimeError(f"no MathJax es5 distribution in {es5}")
    return es5


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(mathjax_es5(), Path(app.outdir) / TARGET, dirs_exist_ok=True)


def setup(app: Sphinx) -> dict:
    mathjax_es5()  # fail at the start of a build, not at its end
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
