"""The checks behind `embfilter verify`: is a filter intact, and was it fitted on that model?

Each check returns a `Check` record (name, verdict, a human detail, the raw numbers and the
one-line error to raise when it fails); nothing here prints or exits.

Not handled: resolving the filter or model from user input (see `commands/verify.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.model.location import ModelLocation

# Stored float32 rows of a float64-orthonormal basis deviate by ~1e-7 (measured: 6e-8 at d=16,
# 1e-8 at d=2048); 1e-5 is 100× that, and still far below anything that would move a cosine.
ORTHONORMAL_TOL = 1e-5


@dataclass
class Check:
    """One verified property: its name, whether it holds, a human detail and the raw numbers."""

    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # the one-line error message when not ok


def integrity_checks(artifact: FilterArtifact) -> list[Check]:
    """Digest, orthonormality and complement checks of a loaded artifact (see `verify`'s help)."""
    import numpy as np

    from embfilter_cli.filters.artifact import array_sha256

    p = artifact.projection
    k, d = p.shape
    where = str(artifact.path)
    checks = [
        Check(
            "format",
            True,
            f"{artifact.metadata['format']} v{artifact.metadata['format_version']}, "
            f"projection {k}×{d} float32 ({artifact.metadata.get('projection_kind')})",
            {"format_version": artifact.metadata["format_version"], "shape": [k, d]},
        )
    ]

    stored, actual = artifact.metadata["projection_sha256"], array_sha256(p)
    checks.append(
        Check(
            "digest",
            stored == actual,
            f"projection sha256 {actual[:16]}… "
            + ("matches the stored digest" if stored == actual else f"≠ stored {stored[:16]}…"),
            {"stored": stored, "actual": actual},
            f"{where}: the projection does not match its stored SHA-256 (stored {stored}, actual {actual}); "
            "the file was modified or damaged, refit it",
        )
    )

    p64 = p.astype(np.float64)
    removed = artifact.removed_directions.astype(np.float64)
    r = removed.shape[0]
    if artifact.reduced:
        gram_err = float(np.abs(p64 @ p64.T - np.eye(k)).max()) if k else 0.0
        name, what = "orthonormal", f"max |P Pᵀ − I| = {gram_err:.1e}"
        bad_what = "the rows of the projection are not orthonormal"
        kept_dims = k
    else:
        # A projector I − V_e V_eᵀ is symmetric and idempotent; its trace is the kept dimension.
        gram_err = max(float(np.abs(p64 - p64.T).max()), float(np.abs(p64 @ p64 - p64).max())) if k else 0.0
        name, what = "projector", f"max(|P − Pᵀ|, |P² − P|) = {gram_err:.1e}"
        bad_what = "the projector is not symmetric and idempotent"
        kept_dims = round(float(np.trace(p64)))
    ok = gram_err <= ORTHONORMAL_TOL  # NaN compares False: a non-finite projection fails here
    checks.append(
        Check(
            name,
            ok,
            f"{what} (tolerance {ORTHONORMAL_TOL:.0e})",
            {"max_error": gram_err, "tolerance": ORTHONORMAL_TOL},
            f"{where}: {bad_what} ({what} > {ORTHONORMAL_TOL:.0e}); the file was damaged or edited, refit it",
        )
    )

    cross = float(np.abs(p64 @ removed.T).max()) if r and k else 0.0
    adds_up = kept_dims + r == d
    ok = cross <= ORTHONORMAL_TOL and adds_up
    what = f"max |P Rᵀ| = {cross:.1e}; {kept_dims} kept + {r} removed {'=' if adds_up else '≠'} {d}"
    checks.append(
        Check(
            "complement",
            ok,
            what,
            {"max_cross": cross, "kept": kept_dims, "removed": r, "hidden_size": d},
            f"{where}: the kept and removed directions do not split the hidden space ({what}); refit it",
        )
    )
    if artifact.centered:
        checks.append(mean_check(artifact))
    return checks


def mean_check(artifact: FilterArtifact) -> Check:
    """A centred filter's mean matches its stored SHA-256 (the loader already checked shape, finiteness, record)."""
    from embfilter_cli.filters.artifact import array_sha256

    centering = artifact.centering
    assert artifact.mean is not None and centering is not None, "mean_check is for centred filters"
    stored, actual = artifact.metadata["mean_sha256"], array_sha256(artifact.mean)
    ok = stored == actual
    return Check(
        "mean",
        ok,
        f"{centering.describe()}; sha256 {actual[:16]}… "
        + ("matches the stored digest" if ok else f"≠ stored {stored[:16]}…"),
        {"stored": stored, "actual": actual, "centering": centering.as_dict()},
        f"{artifact.path}: the mean does not match its stored SHA-256 (stored {stored}, actual {actual}); "
        "the file was modified or damaged, recentre it with `embfilter center`",
    )


def unembedding_check(
    artifact: FilterArtifact, location: ModelLocation, model: str, tensor_name: str | None
) -> tuple[Check, dict[str, Any]]:
    """Recompute the W_U SHA-256 of the model at `location` and compare it with the one stored at fit time.

    Args:
        location: the resolved model (`locate.resolve_model`).
        model: the spec the user gave, quoted in the report and in the fix.
        tensor_name: an explicit W_U tensor; default: the one stored in the filter.
    """
    from embfilter_cli.model.head import read_head

    stored_tensor = artifact.metadata.get("tensor_name") or None
    # Without --tensor: the stored tensor, else (this model has none of that name) the one `fit` would use.
    unemb = read_head(location, tensor_name=tensor_name, filter_tensor=stored_tensor)
    stored = artifact.unembedding_sha256
    ok = unemb.sha256 == stored
    model_info = {
        "spec": model,
        "source": location.source,
        "revision": location.revision,
        "tensor_name": unemb.tensor_name,
        "unembedding_sha256": unemb.sha256,
        "match": ok,
    }
    detail = f"W_U sha256 {unemb.sha256[:16]}… of {location.source} ({unemb.tensor_name}) " + (
        "matches the filter" if ok else f"≠ stored {stored[:16]}…"
    )
    error = (
        f"{artifact.path} was not fitted on {location.source}: the filter stores W_U sha256 {stored} "
        f"({artifact.model_source}, {stored_tensor}) but {unemb.tensor_name} there has sha256 {unemb.sha256}; "
        f"use a filter fitted on this model or refit with `embfilter fit --model {model}`"
    )
    return Check("unembedding", ok, detail, {"stored": stored, "actual": unemb.sha256}, error), model_info
