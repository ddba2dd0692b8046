"""What an export reports: the file written, its shapes and dtype, and the numerical check it passed.

Shared by every exporter (ONNX and the formats in `formats.py`), together with the one error
measure they all use: the largest per-vector relative error ‖y − r‖₂ / ‖r‖₂ (absolute where r = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli.errors import ExportError


@dataclass
class CheckReport:
    """The outcome of a numerical check: what was compared and the worst error seen."""

    max_rel_error: float
    bound: float
    vectors: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What an export wrote, for the CLI summary."""

    path: Path
    kind: str
    input_dim: int
    output_dim: int
    dtype: str
    normalize: bool
    opset: int | None = None
    check: CheckReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The export as a JSON-ready dict (what `--json` prints)."""
        doc: dict[str, Any] = {
            "path": str(self.path),
            "kind": self.kind,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "dtype": self.dtype,
            "normalize": self.normalize,
            "opset": self.opset,
            "checked": self.check is not None,
            "max_rel_error": self.check.max_rel_error if self.check else None,
            "bound": self.check.bound if self.check else None,
        }
        if self.check and self.check.detail:
            doc["check"] = self.check.detail
        doc.update(self.extra)
        return doc


def max_relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest per-vector ‖got − ref‖₂ / ‖ref‖₂ over the last axis (absolute where ref is zero).

    Non-finite values in `got` give inf, so they always fail a bound.
    """
    if got.shape != ref.shape:
        raise ExportError(f"the graph returned shape {tuple(got.shape)} where {tuple(ref.shape)} was expected")
    k = ref.shape[-1] if ref.ndim else 1
    g = np.asarray(got, dtype=np.float64).reshape(-1, k)
    r = np.asarray(ref, dtype=np.float64).reshape(-1, k)
    if not g.size:
        return 0.0
    if not np.isfinite(g).all():
        return float("inf")
    num = np.linalg.norm(g - r, axis=1)
    den = np.linalg.norm(r, axis=1)
    rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), num)
    return float(rel.max())
