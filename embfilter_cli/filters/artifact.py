"""The filter artifact: a versioned safetensors file, its writer and its validating loader.

Layout (format version 1):
    tensors   projection          float32 (k, d) reduced map P with orthonormal rows, or
                                  (d, d) projector I - V_e V_eᵀ when metadata `projection_kind`
                                  is "projector"
              singular_values     float64 (n,) every singular value the solver computed, descending
              kept_indices        int64 (k,) indices of the kept directions (empty when the kept
                                  basis is not a set of singular directions, e.g. randomized solver)
              removed_directions  float32 (r, d) the removed right singular vectors, top then bottom
    metadata  str -> str, see `REQUIRED_METADATA`; JSON-encoded values where a field is structured.

The loader checks the format tag and version, the shapes against each other and the stored
SHA-256 of the projection bytes, and says what is wrong with anything that is not an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli.errors import ArtifactError
from embfilter_cli.files import atomic_path

FORMAT_TAG = "embfilter.filter"
FORMAT_VERSION = "1"
DEFAULT_ARTIFACT_DIR = Path("artifacts")

REQUIRED_METADATA = (
    "format",
    "format_version",
    "model_source",
    "model_revision",
    "tensor_name",
    "unembedding_sha256",
    "vocab_size",
    "hidden_size",
    "band",
    "projection_kind",
    "projection_sha256",
    "solver",
    "solver_params",
    "certificate",
    "tool_version",
    "created_utc",
)
TENSOR_NAMES = ("projection", "singular_values", "kept_indices", "removed_directions")


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's exact bytes in C order (dtype and shape are checked separately)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass
class FilterArtifact:
    """A fitted filter: the projection plus everything needed to trust and explain it."""

    projection: np.ndarray
    singular_values: np.ndarray
    kept_indices: np.ndarray
    removed_directions: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.projection.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def reduced(self) -> bool:
        return self.metadata.get("projection_kind", "reduced") == "reduced"

    @property
    def band(self) -> dict[str, Any]:
        return json.loads(self.metadata["band"])

    @property
    def model_source(self) -> str:
        return self.metadata.get("model_source", "")

    @property
    def unembedding_sha256(self) -> str:
        return self.metadata.get("unembedding_sha256", "")

    def json_field(self, key: str) -> Any:
        return json.loads(self.metadata[key])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Project `vectors` (..., d) to (..., k) in float32 (float64 input stays float64)."""
        if vectors.shape[-1] != self.hidden_size:
            raise ArtifactError(
                f"vectors have dimension {vectors.shape[-1]} but the filter expects {self.hidden_size} "
                f"(fitted on {self.model_source or 'another model'}); use a filter fitted on the model that made them"
            )
        proj = self.projection.astype(np.float64) if vectors.dtype == np.float64 else self.projection
        return vectors @ proj.T

    def summary(self) -> dict[str, Any]:
        """The facts a person wants about a filter, JSON-ready."""
        return {
            "path": str(self.path) if self.path else None,
            "format_version": self.metadata.get("format_version"),
            "model_source": self.model_source,
            "model_revision": self.metadata.get("model_revision"),
            "tensor_name": self.metadata.get("tensor_name"),
            "unembedding_sha256": self.unembedding_sha256,
            "vocab_size": int(self.metadata.get("vocab_size", 0)),
            "hidden_size": self.hidden_size,
            "output_dim": self.output_dim,
            "projection_kind": self.metadata.get("projection_kind"),
            "band": self.band,
            "solver": self.metadata.get("solver"),
            "certificate": self.json_field("certificate"),
            "created_utc": self.metadata.get("created_utc"),
            "tool_version": self.metadata.get("tool_version"),
        }


def save_artifact(artifact: FilterArtifact, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write `artifact` atomically; refuses to overwrite unless `force`."""
    from safetensors.numpy import save_file

    tensors = {
        "projection": np.ascontiguousarray(artifact.projection, dtype=np.float32),
        "singular_values": np.ascontiguousarray(artifact.singular_values, dtype=np.float64),
        "kept_indices": np.ascontiguousarray(artifact.kept_indices, dtype=np.int64),
        "removed_directions": np.ascontiguousarray(artifact.removed_directions, dtype=np.float32).reshape(
            -1, artifact.projection.shape[1]
        ),
    }
    metadata = dict(artifact.metadata)
    metadata["format"] = FORMAT_TAG
    metadata["format_version"] = FORMAT_VERSION
    metadata["projection_sha256"] = array_sha256(tensors["projection"])
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"artifact metadata is missing {missing}")  # a bug in the caller, not user input
    non_str = [k for k, v in metadata.items() if not isinstance(v, str)]
    if non_str:
        raise ValueError(f"safetensors metadata must be str -> str; not str: {non_str}")
    with atomic_path(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    artifact.metadata = metadata
    artifact.path = Path(path)
    return Path(path)


def load_artifact(path: str | os.PathLike[str], verify_digest: bool = True) -> FilterArtifact:
    """Load and validate an artifact; every defect is an ArtifactError naming the fix."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"filter file {p} does not exist; run `embfilter fit` to create one")
    if p.is_dir():
        raise ArtifactError(f"{p} is a directory, not a filter file; give the .safetensors file from `embfilter fit`")
    try:
        with safe_open(str(p), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            keys = set(handle.keys())
            if metadata.get("format") != FORMAT_TAG:
                raise ArtifactError(
                    f"{p} is a safetensors file but not an embfilter filter (no format={FORMAT_TAG!r} in its "
                    "metadata); pass a file written by `embfilter fit`"
                )
            missing_t = [t for t in TENSOR_NAMES if t not in keys]
            if missing_t:
                raise ArtifactError(f"{p} lacks tensor(s) {missing_t}; it is damaged or not from embfilter, refit it")
            tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise ArtifactError(
            f"{p} is not a readable safetensors file ({type(exc).__name__}: {exc}); pass the .safetensors filter "
            "written by `embfilter fit` (if it is one, it is truncated or damaged: refit it)"
        ) from exc
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{p} has filter format version {version!r}, this embfilter reads version {FORMAT_VERSION}; "
            "refit it or upgrade embfilter"
        )
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ArtifactError(f"{p} lacks metadata {missing}; it is damaged, refit it")
    proj = tensors["projection"]
    if proj.ndim != 2 or proj.dtype != np.float32:
        raise ArtifactError(f"{p}: projection must be a float32 matrix, found {proj.dtype} {proj.shape}; refit it")
    d = proj.shape[1]
    if int(metadata["hidden_size"]) != d:
        raise ArtifactError(f"{p}: projection has {d} columns but metadata says hidden_size={metadata['hidden_size']}")
    if verify_digest and array_sha256(proj) != metadata["projection_sha256"]:
        raise ArtifactError(
            f"{p}: the projection does not match its stored SHA-256 (stored {metadata['projection_sha256'][:16]}…, "
            f"actual {array_sha256(proj)[:16]}…); the file was modified or damaged, refit it"
        )
    removed = tensors["removed_directions"]
    if removed.ndim != 2 or (removed.size and removed.shape[1] != d):
        raise ArtifactError(f"{p}: removed_directions has shape {removed.shape}, expected (r, {d}); refit it")
    return FilterArtifact(
        projection=proj,
        singular_values=tensors["singular_values"],
        kept_indices=tensors["kept_indices"],
        removed_directions=removed,
        metadata=metadata,
        path=p,
    )


def newest_artifact(directory: str | os.PathLike[str] = DEFAULT_ARTIFACT_DIR) -> Path:
    """The most recently modified `*.safetensors` under `directory` (for commands whose FILTER is optional)."""
    folder = Path(directory)
    candidates = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime) if folder.is_dir() else []
    if not candidates:
        raise ArtifactError(
            f"no filter given and none found in {folder}/; run `embfilter fit` first or pass a FILTER path"
        )
    return candidates[-1]
