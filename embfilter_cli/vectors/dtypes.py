"""The dtypes stored vectors come in, and the conversions between them.

float16/float32/float64 are numpy's own; bfloat16 (safetensors only) is held as uint16 bit patterns,
because numpy has no bfloat16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def storage_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype that stores values of dtype `name` (bfloat16 as uint16 bit patterns)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    # a NaN whose payload sits in the low bits would round to Inf: keep it a (quiet) NaN
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def float_dtype_name(dtype: np.dtype[Any]) -> str | None:
    """Our name for a numpy float dtype of 2, 4 or 8 bytes (any byte order), None for anything else."""
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dtype.itemsize]
    return None


def as_float(batch: np.ndarray, dtype: str) -> np.ndarray:
    """Native-endian floats from stored values (bfloat16 bits become float32)."""
    if dtype == "bfloat16":
        return bfloat16_to_float32(batch)
    if not batch.dtype.isnative:
        return batch.astype(batch.dtype.newbyteorder("="))
    return batch
