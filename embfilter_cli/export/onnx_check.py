"""Checks of a written ONNX export: onnx.checker, then onnxruntime against the float64 filter.

The reference is `x · Pᵀ` (minus the mean m for a centred filter) computed in float64 from the (digest-verified) safetensors filter, on
seeded inputs: random vectors for a standalone graph, inputs built from the host's signature (token
ids inside the vocabulary, masks of ones) for an appended one. The error measure is
`report.max_relative_error`; the bounds depend on the dtype the graph returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli.errors import ExportError
from embfilter_cli.export.onnx_graph import (
    NORM_EPS,
    STANDALONE_INPUT,
    STANDALONE_OUTPUT,
    dtype_name,
    first_line,
    np_dtype,
    onnx_module,
)
from embfilter_cli.export.onnx_host import AppendInfo, load_host
from embfilter_cli.export.report import CheckReport, max_relative_error
from embfilter_cli.library_logs import ort_severity

if TYPE_CHECKING:
    import onnx

    from embfilter_cli.filters.artifact import FilterArtifact


# Tolerances of the parity check (max per-vector relative error), by the dtype the graph returns.
# float32: the 1e-5. Half precision: output rounding alone is up to 2^-11 (fp16) or 2^-8 (bf16)
# per element; a standalone --fp16 graph also rounds P, so allow about 4 units.
REL_BOUNDS = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
CHECK_SEED = 0
CHECK_BATCH = 4  # rows of the generated check inputs (one of them all zeros)
CHECK_SEQ = 5


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        from embfilter_cli.errors import MissingDependencyError

        raise MissingDependencyError(
            "checking an ONNX export needs onnxruntime: pip install onnxruntime (or pass --no-check)"
        ) from exc
    onnxruntime.set_default_logger_severity(ort_severity())  # the process-wide logger as well
    return onnxruntime


def _session(path: str | os.PathLike[str]) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = ort_severity()  # ORT's lines would otherwise go to stderr unasked
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: {first_line(exc)}") from exc


def run_checker(path: Path, full: bool) -> None:
    """onnx.checker on a written graph (`full` adds shape inference); a rejection is an ExportError."""
    onnx = onnx_module()
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {first_line(exc)}; nothing was written") from exc


def check_or_blame_host(path: Path, host_path: Path) -> None:
    """onnx.checker on the result; if the host fails the same check, that is the host's problem."""
    onnx = onnx_module()
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(str(host_path))
        except onnx.checker.ValidationError:
            return  # the host itself does not pass the checker; onnxruntime below is the real test
        raise ExportError(f"onnx.checker rejected the filtered graph: {first_line(exc)}; nothing was written") from exc


def check_standalone(
    path: str | os.PathLike[str],
    artifact: FilterArtifact,
    *,
    normalize: bool,
    fp16: bool = False,
    per_token: bool = False,
    seed: int = CHECK_SEED,
) -> CheckReport:
    """Run the written graph in onnxruntime on seeded inputs and compare with float64 x·Pᵀ."""
    rng = np.random.default_rng(seed)
    shape = (CHECK_BATCH, CHECK_SEQ, artifact.hidden_size) if per_token else (CHECK_BATCH, artifact.hidden_size)
    x = rng.standard_normal(shape).astype(np.float16 if fp16 else np.float32)
    x[0] = 0  # the zero-vector guard of --normalize must give zeros, not NaN
    session = _session(path)
    (got,) = session.run([STANDALONE_OUTPUT], {STANDALONE_INPUT: x})
    ref = _reference(x, artifact, normalize)
    err = max_relative_error(got, ref)
    bound = REL_BOUNDS["float16" if fp16 else "float32"]
    if not err <= bound:
        raise ExportError(
            f"the exported graph differs from the filter: max relative error {err:.3g} > {bound:g} on "
            f"{x.shape[:-1]} random inputs; nothing was written (report this as a bug)"
        )
    return CheckReport(
        max_rel_error=err, bound=bound, vectors=int(np.prod(shape[:-1])), detail={"input_shape": list(shape)}
    )


def _reference(x: np.ndarray, artifact: FilterArtifact, normalize: bool) -> np.ndarray:
    ref = x.astype(np.float64) @ artifact.projection.astype(np.float64).T
    if artifact.mean is not None:
        ref = ref - artifact.mean.astype(np.float64)
    if normalize:
        ref = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), NORM_EPS)
    return ref


def _gather_vocab(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of an embedding table fed by `input_name` (Gather on an initializer), if one is found.

    Follows a few shape/type-only ops (Cast, Reshape, …) between the input and the Gather.
    """
    graph = model.graph
    init_dims = {t.name: list(t.dims) for t in graph.initializer}
    passthrough = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
    frontier, seen, sizes = {input_name}, set(), []
    for _ in range(6):
        nxt: set[str] = set()
        for node in graph.node:
            for pos, name in enumerate(node.input):
                if name not in frontier:
                    continue
                if node.op_type == "Gather" and pos == 1 and node.input[0] in init_dims:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = init_dims[node.input[0]]
                    if dims:
                        sizes.append(int(dims[axis]))
                elif node.op_type in passthrough and pos == 0:
                    nxt.update(o for o in node.output if o not in seen)
        seen |= frontier
        frontier = nxt
        if not frontier:
            break
    return min(sizes) if sizes else None


def host_inputs(model: onnx.ModelProto, seed: int = CHECK_SEED) -> dict[str, np.ndarray]:
    """Inputs matching the host's signature: ids within the vocabulary, masks of ones, random floats."""
    onnx = onnx_module()
    tp = onnx.TensorProto
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    by_axis = {0: 2, 1: CHECK_SEQ}  # dynamic batch → 2, dynamic sequence → 5, anything else → 3
    named: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue  # IR < 4: initializers are listed as inputs too
        tt = vi.type.tensor_type
        shape = []
        for axis, dim in enumerate(tt.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            else:
                key = dim.dim_param or f"#{axis}"
                named.setdefault(key, by_axis.get(axis, 3))
                shape.append(named[key])
        elem = tt.elem_type
        lname = vi.name.lower()
        if elem == tp.BOOL:
            feeds[vi.name] = np.ones(shape, dtype=bool)
        elif elem in (tp.INT64, tp.INT32, tp.INT16, tp.INT8, tp.UINT8, tp.UINT16, tp.UINT32, tp.UINT64):
            dtype = np_dtype(elem)
            if "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
            elif "token_type" in lname or "segment" in lname:
                arr = np.zeros(shape, dtype=dtype)
            elif "position" in lname and shape:
                arr = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
            else:
                vocab = _gather_vocab(model, vi.name) or 8  # no table found: small ids every vocabulary has
                arr = rng.integers(0, vocab, size=shape).astype(dtype)
            feeds[vi.name] = arr
        elif elem in (tp.FLOAT, tp.DOUBLE, tp.FLOAT16):
            feeds[vi.name] = rng.standard_normal(shape).astype(np_dtype(elem))
        else:
            raise ExportError(
                f"the parity check cannot make inputs of type {dtype_name(elem)} (input {vi.name!r}); pass --no-check"
            )
    return feeds


def check_appended(
    host_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    artifact: FilterArtifact,
    info: AppendInfo,
    *,
    normalize: bool,
    seed: int = CHECK_SEED,
) -> CheckReport:
    """Run host and result on the same generated inputs; result must equal host-output · Pᵀ.

    The sessions run one after the other, so an LLM-sized host is in memory only once at a time.
    """
    onnx = onnx_module()
    if info.elem_type == onnx.TensorProto.BFLOAT16:
        raise ExportError(
            f"output {info.host_output!r} is bfloat16, which onnxruntime's Python API cannot return, so the parity "
            "check cannot run; pass --no-check (the filter casts to float32, multiplies, and casts back)"
        )
    host = load_host(host_path)
    feeds = host_inputs(host, seed)
    session = _session(host_path)
    try:
        (host_out,) = session.run([info.host_output], feeds)
    except Exception as exc:
        raise ExportError(
            f"the parity check could not run the host on generated inputs ({first_line(exc)}); pass --no-check to skip it"
        ) from exc
    del session
    session = _session(out_path)
    try:
        filtered, unfiltered = session.run([info.filtered_name, info.unfiltered_name], feeds)
    except Exception as exc:
        raise ExportError(f"the filtered graph failed in onnxruntime: {first_line(exc)}; nothing was written") from exc
    del session
    if host_out.shape[-1] != artifact.hidden_size:
        raise ExportError(
            f"output {info.host_output!r} has dimension {host_out.shape[-1]} at run time but the filter expects "
            f"{artifact.hidden_size}; use a filter fitted on this graph's model"
        )
    ref = _reference(host_out, artifact, normalize)
    err = max_relative_error(filtered, ref)
    bound = REL_BOUNDS.get(dtype_name(info.elem_type), 1e-5)
    same = max_relative_error(unfiltered, host_out.astype(np.float64))
    if not same <= bound:
        raise ExportError(
            f"output {info.unfiltered_name!r} differs from the host's {info.host_output!r} (relative error {same:.3g}); "
            "nothing was written (report this as a bug)"
        )
    if not err <= bound:
        raise ExportError(
            f"the filtered output differs from host-output·Pᵀ: max relative error {err:.3g} > {bound:g}; nothing was written"
        )
    return CheckReport(
        max_rel_error=err,
        bound=bound,
        vectors=int(np.prod(host_out.shape[:-1])),
        detail={
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "host_output_shape": list(host_out.shape),
            "unfiltered_max_rel_error": same,
        },
    )
