"""Argument checks shared by every public function: each names the argument and what is allowed.

They raise before any work is done: ``TypeError`` for a value of the wrong kind (a bool, a
string or None where a number belongs, a list where a tensor belongs), ``ValueError`` for a value
of the right kind outside the allowed range (non-finite floats included). Imports nothing from
moe_lib.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    """Raise unless ``value`` is an int in ``[low, high]`` (either bound may be None; bools are
    refused: ``True`` is not a count)."""
    allowed = _range_text(low, high)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {allowed}, got {_type_name(value)} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {allowed}, got {value}")


def _range_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    """"in [0, 1)", ">= 1", "<= 5" or "" for the bounds of an allowed range."""

    def show(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if low is not None and high is not None:
        return (f"in {'(' if low_open else '['}{show(low)}, {show(high)}"
                f"{')' if high_open else ']'}")
    if low is not None:
        return f"{'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {show(high)}"
    return ""


def check_positive_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an int >= 1 (bools are refused)."""
    check_int(name, value, low=1)


def check_int_range(name: str, value: object, low: int, high: int) -> None:
    """Raise unless ``value`` is an int with ``low <= value <= high``."""
    check_int(name, value, low=low, high=high)


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    # the exact type must match too: True is not 1, and 1.0 is not 1
    ok = any(value is a or (type(value) is type(a) and value == a) for a in allowed)
    if not ok:
        options = " | ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless ``value`` is a finite real number (not a bool) within the given bounds.

    ``low_open`` / ``high_open`` exclude the bound itself: ``check_real("p", p, 0, 1,
    low_open=True)`` allows (0, 1].
    """
    allowed = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number {allowed}, got {_type_name(value)} "
                        f"{value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be a finite number {allowed}, got {value}")


def check_nonnegative(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite real number >= 0."""
    check_real(name, value, low=0.0)


def check_positive(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite real number > 0."""
    check_real(name, value, low=0.0, low_open=True)


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_type_name(value)} {value!r}")


_DTYPE_KINDS = {
    "float": lambda t: t.is_floating_point(),
    "int": lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
    "bool": lambda t: t.dtype == torch.bool,
}


def check_tensor(
    name: str,
    value: object,
    dims: int | Sequence[int] | None = None,
    kind: str | Sequence[str] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise unless ``value`` is a tensor with the given rank, dtype kind, shape and device.

    ``dims``: allowed numbers of dimensions. ``kind``: "float" | "int" | "bool" (or several).
    ``shape``: the exact shape, None for a free dimension. ``device``: the device it must be on.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if not any(_DTYPE_KINDS[k](value) for k in kinds):
            raise TypeError(f"{name} must have a {' or '.join(kinds)} dtype, got {value.dtype}")
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            s is None or s == v for s, v in zip(shape, value.shape)
        )
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on device {device}, got {value.device}")


def check_type(name: str, value: object, cls: type | tuple[type, ...]) -> None:
    """Raise a TypeError unless ``isinstance(value, cls)``."""
    if not isinstance(value, cls):
        want = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"{name} must be a {want}, got {_type_name(value)}")
