"""The filter artifact: a versioned safetensors file, its writer and its validating loader.

Layout (format version 2 = version 1 plus an optional mean; version-1 files load unchanged):
    tensors   projection          float32 (k, d) reduced map P with orthonormal rows, or
                                  (d, d) projector I - V_e V_eᵀ when metadata `projection_kind`
                                  is "projector"
              singular_values     float64 (n,) every singular value the solver computed, descending
              kept_indices        int64 (k,) indices of the kept directions (empty when the kept
                                  basis is not a set of singular directions, e.g. randomized solver)
              removed_directions  float32 (r, d) the removed right singular vectors, top then bottom
              mean                float32 (k,) OPTIONAL (version 2): the mean m of the filtered
                                  background vectors; the filter is then y = P·x − m
    metadata  str -> str, see `REQUIRED_METADATA`; JSON-encoded values where a field is structured.
              With a mean (and only then): `centering` (JSON, see `filters.centering.Centering`:
              count, source, SHA-256 of the texts, pooling, recipe, template, max_length, model)
              and `mean_sha256` (SHA-256 of the mean's float32 bytes).

The loader checks the format tag and version, the shapes against each other and the stored
SHA-256s of the projection and the mean, and says what is wrong with anything that is not an
artifact. The writer always writes version 2 (an uncentred filter is a version-2 file without
`mean`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import ArtifactError
from embfilter_cli.files import atomic_path
from embfilter_cli.filters.centering import Centering, apply_affine
from embfilter_cli.jsonable import loads as json_loads

if TYPE_CHECKING:
    from embfilter_cli.filters.band import Band
    from embfilter_cli.model.location import ModelLocation

FORMAT_TAG = "embfilter.filter"
FORMAT_VERSION = "2"  # what save_artifact writes
READABLE_VERSIONS = ("1", "2")
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
MEAN_TENSOR = "mean"
CENTERING_METADATA = ("centering", "mean_sha256")  # present exactly when the `mean` tensor is


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
    mean: np.ndarray | None = None  # (k,) float32: the filter is y = P·x − mean (None: y = P·x)

    @property
    def hidden_size(self) -> int:
        """d, the input dimension (the model's hidden size)."""
        return int(self.projection.shape[1])

    @property
    def output_dim(self) -> int:
        """The output dimension: k for a reduced map, d for a projector."""
        return int(self.projection.shape[0])

    @property
    def reduced(self) -> bool:
        """True for the k×d reduced map P, False for the d×d projector."""
        return self.metadata.get("projection_kind", "reduced") == "reduced"

    @property
    def band(self) -> dict[str, Any]:
        """The band as stored: hidden_size, start, keep, top, bottom."""
        return json_loads(self.metadata["band"])

    @property
    def model_source(self) -> str:
        """The model the filter was fitted on, as recorded at fit time."""
        return self.metadata.get("model_source", "")

    @property
    def unembedding_sha256(self) -> str:
        """SHA-256 of the W_U bytes the filter was fitted on."""
        return self.metadata.get("unembedding_sha256", "")

    @property
    def centered(self) -> bool:
        """Whether the filter subtracts a stored mean before projecting."""
        return self.mean is not None

    @property
    def centering(self) -> Centering | None:
        """How the mean was made (None for an uncentred filter)."""
        if self.mean is None:
            return None
        return Centering.from_json(self.metadata["centering"], str(self.path or "the filter"))

    def json_field(self, key: str) -> Any:
        """A metadata value that is stored as JSON text, decoded."""
        return json_loads(self.metadata[key])

    def with_mean(self, mean: np.ndarray | None, centering: Centering | None) -> FilterArtifact:
        """A copy of this filter (same P, not yet saved) centred on `mean`, or uncentred with None."""
        metadata = {k: v for k, v in self.metadata.items() if k not in CENTERING_METADATA}
        if mean is not None:
            if centering is None:
                raise ValueError("a mean needs its Centering record")  # a bug in the caller
            if centering.unembedding_sha256 != self.unembedding_sha256:
                raise ArtifactError(
                    f"the background was embedded with a model whose W_U sha256 is {centering.unembedding_sha256[:16]}… "
                    f"but the filter was fitted on {self.unembedding_sha256[:16]}…; embed it with the filter's model"
                )
            mean = np.asarray(mean, dtype=np.float32).reshape(-1)
            if mean.shape != (self.output_dim,):
                raise ArtifactError(f"the mean has {mean.size} values but the filter outputs {self.output_dim} dims")
            metadata["centering"] = centering.to_json()
        return FilterArtifact(
            projection=self.projection,
            singular_values=self.singular_values,
            kept_indices=self.kept_indices,
            removed_directions=self.removed_directions,
            metadata=metadata,
            path=None,
            mean=mean,
        )

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Filter `vectors` (..., d) to (..., k): P·x, minus the mean when the filter has one.

        float32 out, except float64 input stays float64.
        """
        self.check_input_dim(vectors.shape[-1])
        return apply_affine(vectors, self.projection, self.mean)

    def check_input_dim(self, dim: int) -> None:
        """Raise ArtifactError unless `dim` is the filter's input dimension d."""
        if dim != self.hidden_size:
            raise ArtifactError(
                f"vectors have dimension {dim} but the filter expects {self.hidden_size} "
                f"(fitted on {self.model_source or 'another model'}); use a filter fitted on the model that made them"
            )

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
            "centering": c.as_dict() if (c := self.centering) is not None else None,
            "mean_sha256": self.metadata.get("mean_sha256") if self.centered else None,
            "created_utc": self.metadata.get("created_utc"),
            "tool_version": self.metadata.get("tool_version"),
        }


def save_artifact(artifact: FilterArtifact, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write `artifact` atomically; refuses to overwrite unless `force`."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {
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
    for key in CENTERING_METADATA:
        metadata.pop(key, None)  # an uncentred copy of a centred filter must not keep the old record
    if artifact.mean is not None:
        mean = np.ascontiguousarray(artifact.mean, dtype=np.float32)
        if mean.shape != (tensors["projection"].shape[0],) or not np.isfinite(mean).all():
            raise ValueError(f"mean must be {tensors['projection'].shape[0]} finite floats, got {mean.shape}")
        if "centering" not in artifact.metadata:
            raise ValueError("a mean needs its `centering` metadata")  # a bug in the caller
        tensors[MEAN_TENSOR] = mean
        metadata["centering"] = artifact.metadata["centering"]
        metadata["mean_sha256"] = array_sha256(mean)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"artifact metadata is missing {missing}")  # a bug in the caller, not user input
    non_str = [k for k, v in metadata.items() if not isinstance(v, str)]
    if non_str:
        raise ValueError(f"safetensors metadata must be str -> str; not str: {non_str}")
    with atomic_path(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        from embfilter_cli.safetensors_header import sort_header

        sort_header(tmp)
    artifact.metadata = metadata
    artifact.path = Path(path)
    if artifact.mean is not None:
        artifact.mean = tensors[MEAN_TENSOR]
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
            mean = handle.get_tensor(MEAN_TENSOR) if MEAN_TENSOR in keys else None
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise ArtifactError(
            f"{p} is not a readable safetensors file ({type(exc).__name__}: {exc}); pass the .safetensors filter "
            "written by `embfilter fit` (if it is one, it is truncated or damaged: refit it)"
        ) from exc
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{p} has filter format version {version!r}, this embfilter reads versions "
            f"{' and '.join(READABLE_VERSIONS)}; refit it or upgrade embfilter"
        )
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ArtifactError(f"{p} lacks metadata {missing}; it is damaged, refit it")
    _validate_fields(p, metadata, tensors)
    proj, removed = tensors["projection"], tensors["removed_directions"]
    if verify_digest and array_sha256(proj) != metadata["projection_sha256"]:
        raise ArtifactError(
            f"{p}: the projection does not match its stored SHA-256 (stored {metadata['projection_sha256'][:16]}…, "
            f"actual {array_sha256(proj)[:16]}…); the file was modified or damaged, refit it"
        )
    _check_mean(p, version, mean, metadata, proj.shape[0], verify_digest)
    return FilterArtifact(
        projection=proj,
        singular_values=tensors["singular_values"],
        kept_indices=tensors["kept_indices"],
        removed_directions=removed,
        metadata=metadata,
        path=p,
        mean=mean,
    )


def _shown(value: object, limit: int = 60) -> str:
    """A stored value for an error line: repr'd, on one line, cut to `limit` characters."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validate_fields(p: Path, metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> None:
    """Every metadata field and tensor the commands rely on, checked once and against each other.

    The projection digest covers only the projection's bytes, so the sizes, the band and the other
    tensors are checked here against the projection's shape: a file whose band, hidden size or
    removed directions disagree with its projection is refused, not trusted.
    """

    def bad(what: str, value: object, expected: str) -> ArtifactError:
        return ArtifactError(
            f"{p}: {what} is {_shown(value)}, expected {expected}; the file is damaged or edited, refit it"
        )

    proj = tensors["projection"]
    if proj.ndim != 2 or proj.dtype != np.float32:
        raise bad("tensor `projection`", f"{proj.dtype} {proj.shape}", "a float32 matrix")
    k, d = (int(n) for n in proj.shape)
    if k == 0 or d == 0:
        raise bad("tensor `projection`", f"shape {proj.shape}", "at least one row and one column")
    sizes: dict[str, int] = {}
    for key in ("hidden_size", "vocab_size"):
        raw = metadata[key]
        if not re.fullmatch(r"[0-9]+", raw.strip()) or int(raw) <= 0:
            raise bad(f"metadata `{key}`", raw, "a positive whole number")
        sizes[key] = int(raw)
    if sizes["hidden_size"] != d:
        raise bad("metadata `hidden_size`", metadata["hidden_size"], f"{d} (the projection's column count)")
    kind = metadata["projection_kind"]
    if kind not in ("reduced", "projector"):
        raise bad("metadata `projection_kind`", kind, '"reduced" or "projector"')
    try:
        band = json_loads(metadata["band"])
    except ValueError:
        raise bad(
            "metadata `band`", metadata["band"], 'JSON like {"hidden_size": d, "start": s, "keep": k, ...}'
        ) from None
    band_keys = ("hidden_size", "start", "keep", "top", "bottom")
    if not isinstance(band, dict) or not all(type(band.get(key)) is int and band[key] >= 0 for key in band_keys):
        raise bad("metadata `band`", metadata["band"], f"a JSON object of non-negative integers {list(band_keys)}")
    if band["hidden_size"] != d:
        raise bad("metadata `band` hidden_size", band["hidden_size"], f"{d} (the projection's column count)")
    if band["keep"] < 1 or band["top"] != band["start"] or band["top"] + band["keep"] + band["bottom"] != d:
        raise bad("metadata `band`", metadata["band"], f"top = start, keep ≥ 1 and top + keep + bottom = {d}")
    if kind == "reduced" and k != band["keep"]:
        raise bad("metadata `band` keep", band["keep"], f"{k} (the reduced projection's row count)")
    if kind == "projector" and k != d:
        raise bad("tensor `projection`", f"shape {proj.shape}", f"({d}, {d}) for a projector")
    try:  # decoded by `summary` (verify --json, inspect): check it here, where the file is read
        certificate = json_loads(metadata["certificate"])
    except ValueError:
        certificate = None
    if not isinstance(certificate, dict):
        raise bad("metadata `certificate`", metadata["certificate"], "a JSON object (the solver's accuracy record)")
    sv = tensors["singular_values"]
    if sv.ndim != 1 or sv.dtype.kind != "f" or not 1 <= sv.size <= d:
        raise bad("tensor `singular_values`", f"{sv.dtype} {sv.shape}", f"1 to {d} floats (one per computed direction)")
    if not np.isfinite(sv).all() or (sv < 0).any():
        raise bad("tensor `singular_values`", sv.tolist(), "finite, non-negative values")
    removed = tensors["removed_directions"]
    r = band["top"] + band["bottom"]
    if removed.ndim != 2 or removed.dtype.kind != "f" or (removed.shape[0] != r or (r and removed.shape[1] != d)):
        raise bad(
            "tensor `removed_directions`", f"{removed.dtype} {removed.shape}", f"float ({r}, {d}) (top + bottom rows)"
        )
    kept = tensors["kept_indices"]
    if kept.ndim != 1 or kept.dtype.kind not in "iu" or kept.size not in (0, band["keep"]):
        raise bad("tensor `kept_indices`", f"{kept.dtype} {kept.shape}", f"empty or {band['keep']} integers")
    if kept.size and (kept.min() < 0 or kept.max() >= d):
        raise bad("tensor `kept_indices`", kept.tolist(), f"indices in 0..{d - 1}")


def _check_mean(
    p: Path, version: str, mean: np.ndarray | None, metadata: dict[str, str], k: int, verify_digest: bool
) -> None:
    """The optional mean: only in version 2, with its metadata, k finite float32s, matching its digest."""
    present = [key for key in CENTERING_METADATA if key in metadata]
    if mean is None:
        if present:
            raise ArtifactError(f"{p} has {present} metadata but no `mean` tensor; it is damaged, recentre or refit it")
        return
    if version == "1":
        raise ArtifactError(
            f"{p} is a version-1 filter but holds a `mean` tensor (version 2 only); it is damaged, refit it"
        )
    missing = [key for key in CENTERING_METADATA if key not in metadata]
    if missing:
        raise ArtifactError(f"{p} has a `mean` tensor but lacks metadata {missing}; it is damaged, recentre it")
    if mean.dtype != np.float32 or mean.shape != (k,):
        raise ArtifactError(
            f"{p}: the mean must be {k} float32 values (one per output dimension), found {mean.dtype} {mean.shape}; "
            "recentre it with `embfilter center`"
        )
    if not np.isfinite(mean).all():
        raise ArtifactError(f"{p}: the mean holds NaN or Inf; recentre it with `embfilter center`")
    centering = Centering.from_json(metadata["centering"], str(p))
    if centering.unembedding_sha256 != metadata["unembedding_sha256"]:
        raise ArtifactError(
            f"{p}: the mean was made with a model whose W_U sha256 is {centering.unembedding_sha256[:16]}… but the "
            f"filter was fitted on W_U sha256 {metadata['unembedding_sha256'][:16]}…; recentre it with "
            "`embfilter center` on the filter's own model"
        )
    if verify_digest and array_sha256(mean) != metadata["mean_sha256"]:
        raise ArtifactError(
            f"{p}: the mean does not match its stored SHA-256 (stored {metadata['mean_sha256'][:16]}…, actual "
            f"{array_sha256(mean)[:16]}…); the file was modified or damaged, recentre it with `embfilter center`"
        )


def default_artifact_path(location: ModelLocation, band: Band) -> Path:
    """`artifacts/<model>-<band>.safetensors`: the model named as the user typed it, made file-safe."""
    from embfilter_cli.model.aliases import DEFAULT_MODEL_ALIAS

    if not location.spec:
        slug = DEFAULT_MODEL_ALIAS
    else:
        base = location.spec
        base = Path(base).stem if location.kind != "hf_folder" or Path(base).exists() else base
        base = base.split("/")[-1]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"
    return Path(DEFAULT_ARTIFACT_DIR) / f"{slug}-{band.label()}.safetensors"


def newest_artifact(directory: str | os.PathLike[str] = DEFAULT_ARTIFACT_DIR) -> Path:
    """The most recently modified `*.safetensors` under `directory` (for commands whose FILTER is optional)."""
    folder = Path(directory)
    # Only regular files (links to them included): a dangling link or a folder named *.safetensors
    # is skipped, not stat()-ed into a traceback.
    found = [f for f in folder.glob("*.safetensors") if f.is_file()] if folder.is_dir() else []
    candidates = sorted(found, key=lambda f: f.stat().st_mtime)
    if not candidates:
        raise ArtifactError(
            f"no filter given and none found in {folder}/; run `embfilter fit` first or pass a FILTER path"
        )
    return candidates[-1]
