"""Golden text that holds on any machine: exact words, floats to a stated tolerance.

BLAS and torch pick kernels by CPU and thread count, so a float computed here and on another
x86-64 machine may differ in its last bits (a backward error of 7.27e-16 there is 7.90e-16 here;
a projection's bytes differ in the 8th digit). A golden therefore pins everything else exactly —
names, shapes, dtypes, metadata keys, messages, integers — and compares each float with

    |actual − golden| ≤ max(FLOAT_ABS, FLOAT_REL · max(|actual|, |golden|), one unit of the
                           last digit either side printed)

`FLOAT_ABS` = 1e-6 covers the quantities that are rounding noise by nature (backward errors near
1e-16, orthonormality residuals near 1e-8); `FLOAT_REL` = 1e-3 is three orders above what a
different summation order moves a float32 result of these tiny, well-conditioned models (~1e-6).
`round_floats` writes at most `SIGNIFICANT` digits into a golden, so no golden holds a 16-digit float.
"""

from __future__ import annotations

import re

import numpy as np

FLOAT_ABS = 1e-6
FLOAT_REL = 1e-3
SIGNIFICANT = 6

# A float literal (a decimal point or an exponent) that is not part of a word, hash or version.
FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?(?![\w.])")


def round_floats(text: str) -> str:
    """Every float literal with more than `SIGNIFICANT` significant digits, rounded to that many."""

    def shorten(match: re.Match[str]) -> str:
        token = match.group()
        digits = re.sub(r"[eE].*$", "", token).lstrip("+-").replace(".", "").lstrip("0")
        if len(digits) <= SIGNIFICANT:
            return token
        return f"{float(token):.{SIGNIFICANT}g}"

    return FLOAT.sub(shorten, text)


def _last_digit_unit(token: str) -> float:
    """The value of one unit in the last printed digit: '0.4575' → 1e-4, '7.27e-16' → 1e-18."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def float_close(actual: str, golden: str) -> bool:
    """Whether two printed floats agree within the module's tolerance."""
    a, g = float(actual), float(golden)
    if not (np.isfinite(a) and np.isfinite(g)):
        return actual == golden
    allowed = max(
        FLOAT_ABS, FLOAT_REL * max(abs(a), abs(g)), 1.5 * max(_last_digit_unit(actual), _last_digit_unit(golden))
    )
    return abs(a - g) <= allowed


def text_mismatch(actual: str, golden: str) -> str | None:
    """None when `actual` matches `golden` (words exactly, floats within tolerance), else the first difference."""
    a_words, g_words = FLOAT.split(actual), FLOAT.split(golden)
    a_floats, g_floats = FLOAT.findall(actual), FLOAT.findall(golden)
    if a_words != g_words or len(a_floats) != len(g_floats):
        a_lines, g_lines = FLOAT.sub("<f>", actual).splitlines(), FLOAT.sub("<f>", golden).splitlines()
        for i, (x, y) in enumerate(zip(a_lines, g_lines)):
            if x != y:
                return f"line {i + 1} differs (floats shown as <f>):\n  actual: {x}\n  golden: {y}"
        return f"line counts differ: actual {len(a_lines)}, golden {len(g_lines)}"
    for x, y in zip(a_floats, g_floats):
        if not float_close(x, y):
            return f"float {x} differs from the golden's {y} beyond the tolerance"
    return None


def describe_array(array: np.ndarray) -> str:
    """dtype, shape and, for floats, L1/L2/max|·| to `SIGNIFICANT` digits; integer and bool arrays: exact sum."""
    head = f"{array.dtype}{list(array.shape)}"
    if array.size == 0:
        return head
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        return (
            f"{head} L1={np.abs(values).sum():.{SIGNIFICANT}g} L2={np.sqrt((values**2).sum()):.{SIGNIFICANT}g} "
            f"max={np.abs(values).max():.{SIGNIFICANT}g}"
        )
    return f"{head} sum={int(array.astype(np.int64).sum())}"
