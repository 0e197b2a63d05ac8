"""Small input checkers shared by every ``matting_core`` module.

Each checker raises ``ValueError`` whose message names the offending argument and
says what was expected, e.g. ``alpha must be finite and in [0, 1]; found min=-0.2``.
They accept numpy arrays and torch tensors. torch is never imported here: a tensor
can only exist if the caller has already imported torch, so ``sys.modules`` tells.

The range check costs one reduction for min and one for max (numpy) or a single
``torch.aminmax`` (torch); NaN propagates through both, so finiteness needs no
extra pass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayOrTensor = Union[np.ndarray, "torch.Tensor"]

__all__ = [
    "ArrayOrTensor",
    "as_float_array",
    "check_choice",
    "check_float_dtype",
    "check_ndim",
    "check_same_kind",
    "check_same_shape",
    "check_unit_range",
    "is_tensor",
]


def is_tensor(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def check_float_dtype(name: str, x: ArrayOrTensor) -> ArrayOrTensor:
    """Require a real floating dtype (numpy float16/32/64, torch float types).

    Returns ``x`` unchanged so calls can be chained.
    """
    if is_tensor(x):
        ok = x.dtype.is_floating_point
    elif isinstance(x, np.ndarray):
        ok = x.dtype.kind == "f"
    else:
        raise ValueError(
            f"{name} must be a numpy array or torch tensor, got {type(x).__name__}"
        )
    if not ok:
        raise ValueError(f"{name} must have a floating dtype, got {_dtype_name(x)}")
    return x


def check_unit_range(name: str, x: ArrayOrTensor) -> ArrayOrTensor:
    """Require a float array/tensor whose values are finite and in [0, 1].

    Args:
        name: argument name used in the error message.
        x: numpy array or torch tensor of any shape, floating dtype.

    Returns:
        ``x`` unchanged.

    Raises:
        ValueError: non-float dtype, NaN, +-inf, or a value outside [0, 1].
    """
    check_float_dtype(name, x)
    if is_tensor(x):
        if x.numel() == 0:
            return x
        import torch  # already imported by the caller, so this is a dict lookup

        lo_t, hi_t = torch.aminmax(x.detach())
        lo, hi = float(lo_t), float(hi_t)
    else:
        if x.size == 0:
            return x
        lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # False for NaN as well
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(f"{name} must be finite and in [0, 1]; it contains NaN")
        raise ValueError(
            f"{name} must be finite and in [0, 1]; found min={lo:.6g}, max={hi:.6g}"
        )
    return x


def check_ndim(name: str, x: ArrayOrTensor, allowed: int | Iterable[int]) -> ArrayOrTensor:
    """Require ``x.ndim`` to be one of ``allowed`` (an int or several ints)."""
    allowed_set = (allowed,) if isinstance(allowed, int) else tuple(allowed)
    if not hasattr(x, "ndim"):
        raise ValueError(
            f"{name} must be a numpy array or torch tensor, got {type(x).__name__}"
        )
    if x.ndim not in allowed_set:
        want = " or ".join(str(a) for a in allowed_set)
        raise ValueError(
            f"{name} must have {want} dimensions, got {x.ndim} (shape {_shape(x)})"
        )
    return x


def check_same_shape(**named: ArrayOrTensor) -> tuple[int, ...]:
    """Require every keyword argument to have the same shape; return that shape.

    Example: ``check_same_shape(pred=pred, gt=gt)``.
    """
    items = list(named.items())
    if not items:
        return ()
    first_shape = _shape(items[0][1])
    if any(_shape(v) != first_shape for _, v in items[1:]):
        listing = ", ".join(f"{k} {_shape(v)}" for k, v in items)
        raise ValueError(f"{' and '.join(named)} must have the same shape; got {listing}")
    return first_shape


def check_same_kind(**named: Any) -> bool:
    """Require all arguments to be numpy arrays, or all torch tensors.

    Returns True for torch, False for numpy.
    """
    kinds = {k: is_tensor(v) for k, v in named.items()}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(
            f"{k} is {'torch.Tensor' if t else type(named[k]).__name__}" for k, t in kinds.items()
        )
        raise ValueError(
            f"{', '.join(named)} must all be numpy arrays or all torch tensors; {listing}"
        )
    return next(iter(kinds.values()), False)


def check_choice(name: str, value: Any, valid: Iterable[Any]) -> Any:
    """Require ``value`` to be one of ``valid``; the error lists the valid values."""
    valid_t = tuple(valid)
    if value not in valid_t:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(v) for v in valid_t)}; got {value!r}"
        )
    return value


def as_float_array(name: str, x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Return ``x`` as a numpy array of ``dtype``; ``x`` must already be floating.

    Accepts numpy arrays, torch tensors (detached and moved to CPU) and nested
    sequences of floats. Integer, bool, complex and object inputs raise ValueError:
    an 8-bit alpha (0..255) silently treated as [0, 1] is a classic metric bug.
    """
    if is_tensor(x):
        check_float_dtype(name, x)
        arr = x.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:  # ragged sequences and the like
            raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from exc
        check_float_dtype(name, arr)
    return arr.astype(dtype, copy=False)
