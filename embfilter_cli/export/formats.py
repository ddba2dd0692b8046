"""The filter in other people's formats: a sentence-transformers Dense folder, a .npy matrix, safetensors.

Pure core (no click, no printing). Each writer is atomic (nothing half-written on failure), refuses
to overwrite without `force`, and checks what it wrote before it reports success:

- sentence-transformers: a `Dense` module folder (`config.json` + `model.safetensors` holding
  `linear.weight`, the (k, d) matrix P, and for a centred filter `linear.bias` = −m), with the bias
  off for an uncentred filter and the identity activation written out,
  because the library's default activation is Tanh. Only the four config keys that older releases
  also accept are written (6.x's own save adds module_input_name/module_output_name, which releases
  without those parameters reject as unknown); tested with sentence-transformers 6.2.0. When sentence-transformers is
  installed the check loads the folder with its own `Dense.load` and compares its vectors with
  `FilterArtifact.apply`; otherwise it re-reads the files.
- npy: P as a plain array (float32, or float16 with `fp16`), y = x @ P.T. A centred filter also
  writes its mean m (float32, (k,)) to a second file beside it, `<name>.mean.npy`, and
  y = x @ P.T - m: a consumer must subtract it (both files appear together, or neither).
- safetensors: float32 re-exports the artifact itself (all tensors and metadata, the mean included;
  it stays a valid embfilter filter). float16 writes a *deployment file*, not an artifact: only
  `projection` (k, d) float16 (and, for a centred filter, `mean` (k,) float32: y = x @ projection.T
  - mean), with the artifact's metadata except `format = embfilter.projection` and
  `projection_dtype = float16`; `projection_sha256` still names the float32 filter it came from and
  `projection_fp16_sha256` fingerprints the stored bytes. `load_artifact` refuses it by design: the
  artifact format promises the exact float32 projection.

Not handled: other activations, or writing the parent sentence-transformers model's
`modules.json` (the caller prints the entry to add).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli import __version__
from embfilter_cli.errors import ExportError
from embfilter_cli.export.report import CheckReport, ExportResult, max_relative_error
from embfilter_cli.files import atomic_path, check_folder_output, check_writable, temp_dir_beside
from embfilter_cli.filters.artifact import FilterArtifact, array_sha256, load_artifact, save_artifact

ST_IDENTITY = "torch.nn.modules.linear.Identity"
ST_WEIGHT_KEY = "linear.weight"
ST_BIAS_KEY = "linear.bias"
DEPLOY_FORMAT_TAG = "embfilter.projection"
REL_BOUND_FP32 = 1e-5
REL_BOUND_FP16 = 2e-3  # rounding P to float16 (2^-11 relative per entry) plus summation, with margin
CHECK_SEED = 0
CHECK_ROWS = 8


def _normal_mode(path: Path) -> None:
    """Give a written file or folder the umask's permissions.

    safetensors' writer and mkdtemp create 0600 files / 0700 folders, which would hide an exported
    model from the service account that serves it.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _check_inputs(d: int, seed: int = CHECK_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((CHECK_ROWS, d)).astype(np.float32)


def _reference(artifact: FilterArtifact, x: np.ndarray) -> np.ndarray:
    ref = x.astype(np.float64) @ artifact.projection.astype(np.float64).T
    return ref if artifact.mean is None else ref - artifact.mean.astype(np.float64)


def _matrix_check(
    artifact: FilterArtifact, written: np.ndarray, bound: float, mean: np.ndarray | None = None
) -> CheckReport:
    """Apply the matrix (and mean) as stored, in float64, to seeded inputs and compare with the filter."""
    x = _check_inputs(artifact.hidden_size)
    got = x.astype(np.float64) @ written.astype(np.float64).T
    if mean is not None:
        got -= mean.astype(np.float64)
    err = max_relative_error(got, _reference(artifact, x))
    if not err <= bound:
        raise ExportError(
            f"the written matrix differs from the filter (max relative error {err:.3g} > {bound:g}); nothing was written"
        )
    return CheckReport(
        max_rel_error=err, bound=bound, vectors=CHECK_ROWS, detail={"compared": "stored matrix vs filter"}
    )


def _provenance(artifact: FilterArtifact) -> dict[str, str]:
    keys = (
        "model_source",
        "model_revision",
        "unembedding_sha256",
        "band",
        "projection_kind",
        "projection_sha256",
        "mean_sha256",
        "centering",
    )
    meta = {f"embfilter.{k}": artifact.metadata[k] for k in keys if k in artifact.metadata}
    meta["embfilter.exported_by"] = f"embfilter {__version__}"
    return meta


# ---------------------------------------------------------------------------------------------
# .npy


def export_npy(
    artifact: FilterArtifact,
    out: str | os.PathLike[str],
    *,
    fp16: bool = False,
    check: bool = True,
    force: bool = False,
) -> ExportResult:
    """Write P (k, d) as a .npy file; apply it as `x @ P.T` (minus the `<name>.mean.npy` of a centred filter)."""
    out = check_writable(out, force)
    matrix = np.ascontiguousarray(artifact.projection, dtype=np.float16 if fp16 else np.float32)
    mean_out = mean_path(out) if artifact.centered else None
    if mean_out is not None:
        check_writable(mean_out, force)  # both files or neither: refuse before writing either
    report = None
    with contextlib.ExitStack() as stack:
        # Renames happen in reverse order (mean, then P) only after both files were written and checked.
        tmp = stack.enter_context(atomic_path(out, force=force))
        tmp_mean = stack.enter_context(atomic_path(mean_out, force=force)) if mean_out is not None else None
        with open(tmp, "wb") as handle:  # a handle, because np.save appends ".npy" to bare names
            np.save(handle, matrix, allow_pickle=False)
        if tmp_mean is not None:
            with open(tmp_mean, "wb") as handle:
                np.save(handle, np.ascontiguousarray(artifact.mean, dtype=np.float32), allow_pickle=False)
        if check:
            back = np.load(tmp, allow_pickle=False)
            if back.dtype != matrix.dtype or not np.array_equal(back, matrix):
                raise ExportError(
                    f"re-reading {out} gave a different matrix ({back.dtype} {back.shape}); nothing was written"
                )
            back_mean = np.load(tmp_mean, allow_pickle=False) if tmp_mean is not None else None
            if back_mean is not None and (artifact.mean is None or not np.array_equal(back_mean, artifact.mean)):
                raise ExportError(f"re-reading {mean_out} gave a different mean; nothing was written")
            report = _matrix_check(artifact, back, REL_BOUND_FP16 if fp16 else REL_BOUND_FP32, back_mean)
    extra: dict[str, Any] = {"apply": "x @ P.T"}
    if mean_out is not None:
        extra = {
            "apply": f"x @ P.T - m, with P = np.load({str(out)!r}), m = np.load({str(mean_out)!r})",
            "mean": str(mean_out),
        }
    return ExportResult(
        path=out,
        kind="npy",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype=str(matrix.dtype),
        normalize=False,
        check=report,
        extra=extra,
    )


def mean_path(out: str | os.PathLike[str]) -> Path:
    """Where `export_npy` writes a centred filter's mean: `P.npy` -> `P.mean.npy`."""
    out = Path(out)
    stem = out.name[: -len(".npy")] if out.name.lower().endswith(".npy") else out.name
    return out.with_name(f"{stem}.mean.npy")


# ---------------------------------------------------------------------------------------------
# safetensors


def export_safetensors(
    artifact: FilterArtifact,
    out: str | os.PathLike[str],
    *,
    fp16: bool = False,
    check: bool = True,
    force: bool = False,
) -> ExportResult:
    """float32: a copy of the artifact (still an artifact). float16: a deployment file (see module docstring)."""
    out = check_writable(out, force)
    if not fp16:
        copy = FilterArtifact(
            projection=artifact.projection,
            singular_values=artifact.singular_values,
            kept_indices=artifact.kept_indices,
            removed_directions=artifact.removed_directions,
            metadata=dict(artifact.metadata),
            mean=artifact.mean,
        )
        save_artifact(copy, out, force=force)
        _normal_mode(out)
        report = None
        if check:
            try:
                back = load_artifact(out)  # verifies the stored digests of the projection and the mean
                if back.metadata["projection_sha256"] != artifact.metadata["projection_sha256"] or (
                    back.metadata.get("mean_sha256") != artifact.metadata.get("mean_sha256")
                ):
                    raise ExportError(f"{out} re-exports a different filter; nothing was kept")
                report = _matrix_check(artifact, back.projection, REL_BOUND_FP32, back.mean)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    out.unlink()
                raise
        return ExportResult(
            path=out,
            kind="safetensors",
            input_dim=artifact.hidden_size,
            output_dim=artifact.output_dim,
            dtype="float32",
            normalize=False,
            check=report,
            extra={"artifact": True},
        )

    from safetensors.numpy import load_file, save_file

    matrix = np.ascontiguousarray(artifact.projection, dtype=np.float16)
    meta = dict(artifact.metadata)
    meta["source_format"] = meta.get("format", "")
    meta["format"] = DEPLOY_FORMAT_TAG
    meta["projection_dtype"] = "float16"
    meta["projection_fp16_sha256"] = array_sha256(matrix)
    meta["exported_by"] = f"embfilter {__version__}"
    tensors = {"projection": matrix}
    if artifact.mean is not None:  # kept in float32: k values, and the bias needs no rounding
        tensors["mean"] = np.ascontiguousarray(artifact.mean, dtype=np.float32)
    report = None
    with atomic_path(out, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _normal_mode(tmp)
        if check:
            stored = load_file(str(tmp))
            half = stored["projection"]
            if half.dtype != np.float16 or not np.array_equal(half, matrix):
                raise ExportError(f"re-reading {out} gave a different matrix; nothing was written")
            stored_mean = stored.get("mean")
            if (stored_mean is None) != ("mean" not in tensors) or (
                stored_mean is not None and not np.array_equal(stored_mean, tensors["mean"])
            ):
                raise ExportError(f"re-reading {out} gave a different mean; nothing was written")
            report = _matrix_check(artifact, half, REL_BOUND_FP16, stored_mean)
    return ExportResult(
        path=out,
        kind="safetensors",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype="float16",
        normalize=False,
        check=report,
        extra={
            "artifact": False,
            "tensor": "projection",
            "apply": "x @ projection.T - mean" if artifact.centered else "x @ projection.T",
        },
    )


# ---------------------------------------------------------------------------------------------
# sentence-transformers Dense folder


def st_config(artifact: FilterArtifact) -> dict[str, Any]:
    """The Dense module's config.json: P as a linear layer (bias −m when centred) with the identity activation."""
    return {
        "in_features": artifact.hidden_size,
        "out_features": artifact.output_dim,
        "bias": artifact.centered,
        "activation_function": ST_IDENTITY,
    }


def _check_st_dir(out: Path, force: bool, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    check_folder_output(
        out,
        force,
        what="a sentence-transformers Dense module",
        marker="model.safetensors written by embfilter",
        ours=_dense_export,
        inputs=inputs,
    )


def _dense_export(folder: Path) -> bool:
    """Whether `folder` holds a Dense module an earlier `export --dense-only` wrote (its weights record us)."""
    from embfilter_cli.safetensors_header import SafetensorsHeaderError, read_header

    try:
        with open(folder / "model.safetensors", "rb") as fp:
            meta = read_header(fp, itemsizes=None).metadata
    except (OSError, SafetensorsHeaderError):
        return False
    return "embfilter.exported_by" in meta


def _load_dense(folder: Path) -> Any | None:
    """sentence-transformers' own Dense loader, or None when the library is not installed."""
    try:
        try:  # 5.x+ location; 2.x-4.x only have sentence_transformers.models
            from sentence_transformers.sentence_transformer.modules import Dense
        except ImportError:
            from sentence_transformers.models import Dense  # type: ignore[no-redef]
    except ImportError:
        return None
    return Dense.load(str(folder))


def export_sentence_transformers(
    artifact: FilterArtifact,
    out: str | os.PathLike[str],
    *,
    check: bool = True,
    force: bool = False,
) -> ExportResult:
    """Write a sentence-transformers `Dense` module folder equivalent to `artifact.apply`."""
    from safetensors.numpy import save_file

    out = Path(out)
    _check_st_dir(out, force, [artifact.path] if artifact.path else [])
    weight = np.ascontiguousarray(artifact.projection, dtype=np.float32)
    tensors = {ST_WEIGHT_KEY: weight}
    if artifact.mean is not None:  # Dense computes W·x + b: b = −m makes it P·x − m
        tensors[ST_BIAS_KEY] = np.ascontiguousarray(-artifact.mean, dtype=np.float32)
    config = st_config(artifact)
    report: CheckReport | None = None
    loader = None
    with temp_dir_beside(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", **_provenance(artifact)})
        for made in (tmp, tmp / "model.safetensors"):
            _normal_mode(made)
        if check:
            report, loader = _check_st(tmp, artifact, tensors, config)
        if out.is_dir():  # --force into an existing folder: replace our two files, leave the rest alone
            for name in ("config.json", "model.safetensors"):
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)  # the whole folder appears at once
    return ExportResult(
        path=out,
        kind="sentence-transformers",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype="float32",
        normalize=False,
        check=report,
        extra={"module": "sentence_transformers.models.Dense", "loader": loader},
    )


def _check_st(
    folder: Path, artifact: FilterArtifact, tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[CheckReport, str]:
    from safetensors.numpy import load_file

    try:
        dense = _load_dense(folder)
    except Exception as exc:  # the library's loader rejected the folder
        raise ExportError(
            f"sentence-transformers could not load the Dense folder ({type(exc).__name__}: {exc}); nothing was written"
        ) from exc
    x = _check_inputs(artifact.hidden_size)
    ref = _reference(artifact, x)
    if dense is None:
        back = load_file(str(folder / "model.safetensors"))
        stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if (
            stored != config
            or set(back) != set(tensors)
            or any(not np.array_equal(back[k], v) for k, v in tensors.items())
        ):
            raise ExportError("re-reading the Dense folder gave different contents; nothing was written")
        bias = back.get(ST_BIAS_KEY)
        report = _matrix_check(artifact, back[ST_WEIGHT_KEY], REL_BOUND_FP32, None if bias is None else -bias)
        report.detail = {"compared": "files re-read (sentence-transformers not installed)"}
        return report, "not installed"
    import torch

    with torch.no_grad():
        got = dense({"sentence_embedding": torch.from_numpy(x)})["sentence_embedding"].double().numpy()
    expected_apply = artifact.apply(x)  # what `embfilter apply` produces for the same float32 vectors
    err = max_relative_error(got, ref)
    vs_apply = max_relative_error(got, expected_apply.astype(np.float64))
    if not (err <= REL_BOUND_FP32 and vs_apply <= REL_BOUND_FP32):
        raise ExportError(
            f"the Dense module loaded by sentence-transformers gives different vectors (max relative error {err:.3g}); "
            "nothing was written"
        )
    import sentence_transformers

    return (
        CheckReport(
            max_rel_error=err,
            bound=REL_BOUND_FP32,
            vectors=CHECK_ROWS,
            detail={
                "compared": "sentence-transformers Dense.load output vs filter",
                "vs_apply_max_rel_error": vs_apply,
            },
        ),
        f"sentence-transformers {sentence_transformers.__version__}",
    )
