"""Real text that ships with every Python, loaded offline: no download, ever.

Sources (both are part of CPython, under the Python Software Foundation License):

- the standard library's own source files (``sysconfig.get_paths()["stdlib"]``), used for a
  byte-level language model and for a classification task: which standard-library package a
  snippet of source code comes from;
- the language reference prose of ``pydoc_data.topics`` (what ``help("if")`` prints).

The exact bytes depend on the Python version (this book is tested on 3.11); splits are
deterministic for a given version. Splits are made inside each file, by position: the first
80% of a file trains, the next 10% validates, the last 10% tests, so no snippet straddles two
splits and every package appears in every split.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_lib.checks import check_int, check_positive_int, check_tensor, check_type

PROVENANCE = (
    f"CPython {sys.version.split()[0]} standard library source and pydoc_data.topics; "
    "Python Software Foundation License"
)
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
CLASSIFIER_PACKAGES = ("asyncio", "email", "logging", "multiprocessing", "unittest", "xml")
LM_PACKAGES = ("json", "logging", "email", "asyncio", "unittest", "importlib", "concurrent")


def stdlib_root() -> Path:
    """The folder of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def package_files(package: str) -> list[Path]:
    """Sorted ``.py`` files of a standard-library package, leaving out its test folders."""
    check_type("package", package, str)
    if not package or "/" in package or "\\" in package or package.startswith("."):
        raise ValueError(f"package must be the name of a standard-library package, got "
                         f"{package!r}")
    root = stdlib_root()
    folder = root / package
    if not folder.is_dir():
        raise ValueError(f"package {package!r} is not a standard-library package in {root}")
    files = [
        f for f in folder.rglob("*.py")
        if not any("test" in part for part in f.relative_to(folder).parts[:-1])
    ]
    return sorted(files)


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each split for a sequence of length ``n`` (80/10/10 by position)."""
    check_int("n", n, low=0)
    a = int(n * SPLIT_FRACTIONS[0])
    b = int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


def read_bytes(path: Path) -> bytes:
    """A source file's bytes with Windows line ends normalised."""
    check_type("path", path, (Path, str))
    return Path(path).read_bytes().replace(b"\r\n", b"\n")


@dataclass
class ByteCorpus:
    """Byte-level text for a language model: ``splits[name]: [n_bytes]`` uint8 tensors."""

    splits: dict[str, Tensor]
    files: list[Path]
    provenance: str = PROVENANCE

    def __getitem__(self, split: str) -> Tensor:
        return self.splits[split]


def load_code_corpus(
    packages: tuple[str, ...] = LM_PACKAGES, max_bytes: int | None = None
) -> ByteCorpus:
    """Standard-library source of ``packages`` as bytes, split 80/10/10 inside each file.

    ``max_bytes`` caps the total (files are taken in order until the cap).
    """
    _check_packages(packages)
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes)
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    used, total = [], 0
    for package in packages:
        for path in package_files(package):
            text = read_bytes(path)
            if max_bytes is not None and total + len(text) > max_bytes:
                text = text[: max_bytes - total]
            for split, (a, b) in split_bounds(len(text)).items():
                parts[split].append(text[a:b])
            used.append(path)
            total += len(text)
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    splits = {
        s: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()
        if any(chunks) else torch.zeros(0, dtype=torch.uint8)
        for s, chunks in parts.items()
    }
    empty = [s for s, t in splits.items() if t.numel() == 0]
    if empty:
        raise ValueError(f"the corpus of {packages} (max_bytes={max_bytes}) leaves the "
                         f"{'/'.join(empty)} split(s) empty; use more packages or bytes")
    return ByteCorpus(splits=splits, files=used)


def _check_packages(packages: object) -> None:
    if isinstance(packages, str) or not isinstance(packages, (tuple, list)):
        raise TypeError(f"packages must be a tuple of package names, got "
                        f"{type(packages).__name__} {packages!r:.60}")
    if not packages:
        raise ValueError("packages must name at least one standard-library package")
    for p in packages:
        check_type("packages[i]", p, str)


def language_reference() -> str:
    """The language reference prose shipped in ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def lm_batch(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows for next-byte prediction.

    Returns ``x, y: [batch, seq_len]`` int64, ``y`` is ``x`` shifted by one byte.
    """
    check_tensor("data", data, dims=1, kind="int")
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    check_type("generator", generator, torch.Generator)
    if data.numel() <= seq_len + 1:
        raise ValueError(f"seq_len must be < {data.numel() - 1} for this split, got {seq_len}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # [batch, seq_len + 1]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


@dataclass
class SnippetDataset:
    """Package classification.

    ``x[split]: [n, snippet_len]`` int64 bytes, ``y[split]: [n]`` labels.
    """

    x: dict[str, Tensor]
    y: dict[str, Tensor]
    classes: tuple[str, ...]
    snippet_len: int
    provenance: str = PROVENANCE


def load_package_snippets(
    packages: tuple[str, ...] = CLASSIFIER_PACKAGES, snippet_len: int = 128
) -> SnippetDataset:
    """Which standard-library package does this snippet of source code come from?

    Each file of each package is cut into consecutive, non-overlapping ``snippet_len``-byte
    snippets; the first 80% of a file's snippets train, the next 10% validate, the last 10% test.
    The label is the package's index in ``packages``.
    """
    _check_packages(packages)
    check_positive_int("snippet_len", snippet_len)
    xs: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    ys: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for label, package in enumerate(packages):
        for path in package_files(package):
            raw = read_bytes(path)
            n = len(raw) // snippet_len
            if n == 0:
                continue
            data = torch.frombuffer(bytearray(raw[: n * snippet_len]), dtype=torch.uint8)
            snippets = data.view(n, snippet_len).long()
            for split, (a, b) in split_bounds(n).items():
                xs[split].append(snippets[a:b])
                ys[split].append(torch.full((b - a,), label, dtype=torch.long))
    empty = [s for s, v in xs.items() if not v or sum(t.shape[0] for t in v) == 0]
    if empty:
        raise ValueError(f"snippet_len={snippet_len} leaves the {'/'.join(empty)} split(s) of "
                         f"{packages} empty; use a shorter snippet_len or more packages")
    return SnippetDataset(
        x={s: torch.cat(v) for s, v in xs.items()},
        y={s: torch.cat(v) for s, v in ys.items()},
        classes=tuple(packages),
        snippet_len=snippet_len,
    )


CHAR_CLASSES = (
    "letter", "digit", "space", "newline", "quote", "bracket", "operator", "punctuation", "other",
)


def char_classes(tokens: Tensor) -> Tensor:
    """Class index into ``CHAR_CLASSES`` of each byte in ``tokens`` (any shape, same shape out)."""
    check_tensor("tokens", tokens, kind="int")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > 255):
        raise ValueError(f"tokens must be bytes in [0, 255], got values in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    table = torch.full((256,), CHAR_CLASSES.index("other"), dtype=torch.long)
    groups = {
        "letter": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_",
        "digit": "0123456789",
        "space": " \t",
        "newline": "\n",
        "quote": "'\"",
        "bracket": "()[]{}",
        "operator": "+-*/%=<>!&|^~@",
        "punctuation": ".,:;#\\`?$",
    }
    for name, chars in groups.items():
        table[torch.tensor(list(chars.encode()))] = CHAR_CLASSES.index(name)
    return table.to(tokens.device)[tokens.long()]
