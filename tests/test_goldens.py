"""The golden comparator: words and integers exactly, floats within the stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from tests.goldens import describe_array, float_close, round_floats, text_mismatch


@pytest.mark.parametrize(
    ("actual", "golden"),
    [
        ("max_backward_error=7.90e-16", "max_backward_error=7.27e-16"),  # noise by nature: 1e-6 absolute
        ("σ_max 0.4576", "σ_max 0.4575"),  # one unit in the last printed digit
        ('"sigma": 0.450279', '"sigma": 0.450278'),
        ("L1=126.592", "L1=126.63"),  # 3e-4 relative
        ("energy removed 16.85%", "energy removed 16.86%"),
    ],
)
def test_last_bit_differences_match(actual, golden):
    assert text_mismatch(actual, golden) is None


@pytest.mark.parametrize(
    ("actual", "golden", "why"),
    [
        ("σ_max 0.4580", "σ_max 0.4575", "float 0.4580"),  # 1e-3 relative and 5 units of the last digit
        ("L1=126.8", "L1=126.592", "float 126.8"),
        ("remove top 3", "remove top 4", "line 1 differs"),  # integers are exact
        ("sha256(W_U) abbf458e", "sha256(W_U) abbf458f", "line 1 differs"),  # hashes are words
        ("passed=True", "passed=False", "line 1 differs"),
        ("a 1.5\nb", "a 1.5", "line counts differ"),
        ("version 2.13.0", "version 2.13.1", "line 1 differs"),  # a version is not a float
    ],
)
def test_real_differences_are_reported(actual, golden, why):
    mismatch = text_mismatch(actual, golden)
    assert mismatch is not None and why in mismatch


def test_no_long_floats_reach_a_golden():
    assert round_floats('"slope": -0.01609325551518544, 7.270373301407426e-16, 0.5, 12') == (
        '"slope": -0.0160933, 7.27037e-16, 0.5, 12'
    )
    assert round_floats("hash 2fb2da6b1bea39acc15cd0796deab29491004c4b77823da60c0784ada601868b") == (
        "hash 2fb2da6b1bea39acc15cd0796deab29491004c4b77823da60c0784ada601868b"
    )


def test_nonfinite_floats_must_match_exactly():
    assert not float_close("nan", "0.5") and float_close("inf", "inf")


def test_describe_array_is_exact_for_integers_and_rounded_for_floats():
    assert describe_array(np.arange(4, dtype=np.int64)) == "int64[4] sum=6"
    values = np.array([[3.0, -4.0]], dtype=np.float32)
    assert describe_array(values) == "float32[1, 2] L1=7 L2=5 max=4"
