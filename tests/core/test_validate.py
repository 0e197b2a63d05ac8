"""Tests for matting_core._validate: every checker accepts good input and names the
argument in the ValueError it raises for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matting_core._validate import (
    as_float_array,
    check_choice,
    check_float_dtype,
    check_ndim,
    check_same_kind,
    check_same_shape,
    check_unit_range,
    is_tensor,
)


@pytest.mark.parametrize(
    "x",
    [
        np.array([0.0, 0.5, 1.0]),
        np.array([[0.25]], dtype=np.float32),
        np.zeros((0, 3)),
        torch.tensor([0.0, 1.0]),
        torch.zeros(2, 1, 3, 3, dtype=torch.float64),
    ],
)
def test_check_unit_range_accepts_unit_floats(x):
    assert check_unit_range("alpha", x) is x


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([0.0, np.nan]), "NaN"),
        (np.array([0.0, np.inf]), r"\[0, 1\]"),
        (np.array([-np.inf, 0.5]), r"\[0, 1\]"),
        (np.array([-1e-3, 0.5]), "min=-0.001"),
        (np.array([0.5, 1.0 + 1e-6]), "max=1"),
        (np.array([0, 1], dtype=np.uint8), "floating dtype"),
        (np.array([True, False]), "floating dtype"),
        (torch.tensor([0.5, float("nan")]), "NaN"),
        (torch.tensor([0.5, 2.0]), "max=2"),
        (torch.tensor([0, 1]), "floating dtype"),
        ([0.0, 0.5], "numpy array or torch tensor"),
    ],
)
def test_check_unit_range_rejects_and_names_argument(bad, message):
    with pytest.raises(ValueError, match="my_alpha") as info:
        check_unit_range("my_alpha", bad)
    assert info.match(message)


def test_check_float_dtype():
    check_float_dtype("x", np.zeros(2, np.float16))
    check_float_dtype("x", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must have a floating dtype, got int64"):
        check_float_dtype("x", np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="x must have a floating dtype, got complex128"):
        check_float_dtype("x", np.zeros(2, np.complex128))


def test_check_same_shape():
    a, b = np.zeros((2, 3)), torch.zeros(2, 3)
    assert check_same_shape(pred=a, gt=b) == (2, 3)
    with pytest.raises(ValueError, match=r"pred and gt must have the same shape; got pred \(2, 3\), gt \(3, 2\)"):
        check_same_shape(pred=a, gt=np.zeros((3, 2)))


def test_check_ndim():
    x = np.zeros((2, 3))
    assert check_ndim("alpha", x, 2) is x
    assert check_ndim("alpha", x, (2, 4)) is x
    with pytest.raises(ValueError, match=r"alpha must have 3 or 4 dimensions, got 2 \(shape \(2, 3\)\)"):
        check_ndim("alpha", x, (3, 4))
    with pytest.raises(ValueError, match="alpha must be a numpy array or torch tensor"):
        check_ndim("alpha", 3.0, 2)


def test_check_same_kind():
    assert check_same_kind(a=np.zeros(1), b=np.zeros(1)) is False
    assert check_same_kind(a=torch.zeros(1), b=torch.zeros(1)) is True
    with pytest.raises(ValueError, match="a, b must all be numpy arrays or all torch tensors"):
        check_same_kind(a=np.zeros(1), b=torch.zeros(1))


def test_check_choice_lists_valid_values():
    assert check_choice("mode", "soft", ("soft", "hard")) == "soft"
    with pytest.raises(ValueError, match="mode must be one of 'soft', 'hard'; got 'sharp'"):
        check_choice("mode", "sharp", ("soft", "hard"))


def test_as_float_array():
    out = as_float_array("pred", np.array([0.5], np.float32))
    assert out.dtype == np.float64 and out.tolist() == [0.5]
    assert as_float_array("pred", [[0.25, 1.0]]).shape == (1, 2)
    assert as_float_array("pred", torch.tensor([0.5])).tolist() == [0.5]
    with pytest.raises(ValueError, match="pred must have a floating dtype, got uint8"):
        as_float_array("pred", np.array([255], np.uint8))
    with pytest.raises(ValueError, match="pred must have a floating dtype"):
        as_float_array("pred", [1, 0])


def test_is_tensor():
    assert is_tensor(torch.zeros(1))
    assert not is_tensor(np.zeros(1))
