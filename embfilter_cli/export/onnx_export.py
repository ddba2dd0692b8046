"""The filter as ONNX: a standalone filter graph, or the filter appended to a host embedding graph.

Pure core (no click, no printing): graphs are built directly with `onnx.helper` — torch 2.13's
default exporter needs onnxscript, and a MatMul needs no exporter. The filter is always
`y = x · Pᵀ` with Pᵀ stored as a (d, k) initializer; MatMul broadcasts over leading axes, so the same
nodes filter pooled `[batch, d]` and token-level `[batch, seq, d]` tensors. Optional L2
normalisation is `y / max(‖y‖₂, 1e-12)` (a zero vector stays zero instead of becoming NaN) and is
always computed in at least float32, because squaring half-precision values overflows past 256.

Every export is checked before it is renamed into place: `onnx.checker`, then onnxruntime on
generated inputs against the float64 reference `x · Pᵀ` computed from the (digest-verified)
safetensors filter. The error measure is the largest per-vector relative error
‖y − r‖₂ / ‖r‖₂ (absolute where r = 0).

Hosts are edited, not merged: the chosen output's tensor is renamed `<name>_unfiltered`, the filter
nodes write a new tensor under the host's name, and that becomes output 0. The host keeps its IR
version and opset imports; the filter's ops (MatMul, Cast, ReduceL2, Max, Div) exist from opset 8
and ReduceL2 takes its axes as an attribute before opset 18 and as an input from 18.

Hosts with external data are loaded without their weights. onnx and onnxruntime only read external
data inside the model's own folder (no `..`, no absolute paths, no symlinks), so for an output in
another folder the host's data files are hard-linked there (no copy, host files untouched); where a
hard link is impossible (another filesystem) the export stops and says to write next to the host.

Not handled: sparse initializers as the chosen output, outputs produced inside functions' private
scopes, quantized (integer) outputs, and hosts that use no `ai.onnx` opset.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli import __version__
from embfilter_cli.errors import ExportError
from embfilter_cli.files import atomic_path, check_writable

if TYPE_CHECKING:  # onnx is imported inside functions so that importing this module stays cheap
    import onnx

    from embfilter_cli.filters.artifact import FilterArtifact

DEFAULT_OPSET = 17
MIN_OPSET = 8  # Max with broadcasting (the zero-norm guard) arrives in opset 8
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
UNFILTERED_SUFFIX = "_unfiltered"
STANDALONE_INPUT = "embeddings"
STANDALONE_OUTPUT = "filtered_embeddings"
METADATA_PREFIX = "embfilter."
PREFERRED_OUTPUT = "sentence_embedding"
# Protobuf refuses messages of 2 GiB; keep a margin for the graph's own bytes.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
# Tolerances of the parity check (max per-vector relative error), by the dtype the graph returns.
# float32: the 1e-5. Half precision: output rounding alone is up to 2^-11 (fp16) or 2^-8 (bf16)
# per element; a standalone --fp16 graph also rounds P, so allow about 4 units.
REL_BOUNDS = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
CHECK_SEED = 0
CHECK_BATCH = 4  # rows of the generated check inputs (one of them all zeros)
CHECK_SEQ = 5

METADATA_KEYS = (
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
    "tool_version",
)


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


@dataclass
class OutputChoice:
    """The host output the filter goes after, and why it was chosen."""

    name: str
    reason: str


@dataclass
class AppendInfo:
    """Names and types of an appended filter (returned by `append_filter`)."""

    host_output: str
    filtered_name: str
    unfiltered_name: str
    reason: str
    elem_type: int
    rank: int | None
    opset: int
    projection_initializer: str


# ---------------------------------------------------------------------------------------------
# Small helpers


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        from embfilter_cli.errors import MissingDependencyError

        raise MissingDependencyError("ONNX export needs the onnx package: pip install onnx onnxruntime") from exc
    return onnx


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        from embfilter_cli.errors import MissingDependencyError

        raise MissingDependencyError(
            "checking an ONNX export needs onnxruntime: pip install onnxruntime (or pass --no-check)"
        ) from exc
    return onnxruntime


def _dtype_name(elem_type: int) -> str:
    """numpy-style name of an ONNX element type (float32, float16, int64, …)."""
    onnx = _onnx()
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _np_dtype(elem_type: int) -> np.dtype:
    onnx = _onnx()
    if elem_type == onnx.TensorProto.BFLOAT16:
        # numpy has no bfloat16; onnxruntime hands such tensors out as ml_dtypes-backed arrays or not at all
        raise ExportError("bfloat16 tensors cannot be fed from numpy; run with --no-check or export a float32 host")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def default_opset_version(model: onnx.ModelProto) -> int | None:
    """The version of the default (`ai.onnx`) domain a model imports, or None."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def filter_metadata(artifact: FilterArtifact, **extra: Any) -> dict[str, str]:
    """The filter's provenance as `embfilter.*` string pairs for ONNX `metadata_props`."""
    meta = {f"{METADATA_PREFIX}{key}": artifact.metadata[key] for key in METADATA_KEYS if key in artifact.metadata}
    meta[f"{METADATA_PREFIX}output_dim"] = str(artifact.output_dim)
    meta[f"{METADATA_PREFIX}exported_by"] = f"embfilter {__version__}"
    for key, value in extra.items():
        meta[f"{METADATA_PREFIX}{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return meta


def _set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    onnx = _onnx()
    # set_model_props replaces the whole list: merge so that the host's own entries survive.
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})


def _all_names(graph: onnx.GraphProto, names: set[str] | None = None) -> set[str]:
    """Every tensor and node name used in `graph` and its subgraphs (to pick names that don't clash)."""
    names = set() if names is None else names
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for sub in _subgraphs(node):
            _all_names(sub, names)
    return names


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


class _Names:
    """Fresh tensor/node names that never collide with the graph's own."""

    def __init__(self, used: set[str], prefix: str = "embfilter/") -> None:
        self.used = used
        self.prefix = prefix

    def __call__(self, stem: str) -> str:
        name = f"{self.prefix}{stem}"
        i = 1
        while name in self.used:
            i += 1
            name = f"{self.prefix}{stem}_{i}"
        self.used.add(name)
        return name


def _filter_nodes(
    x: str,
    y: str,
    pt_name: str,
    *,
    io_type: int,
    mat_type: int,
    normalize: bool,
    opset: int,
    names: _Names,
) -> list[onnx.NodeProto]:
    """Nodes computing y = x·Pᵀ (optionally L2-normalised) with the right casts.

    io_type is the element type of x and y; mat_type that of Pᵀ and the MatMul; normalisation runs in
    float32 when mat_type is a half type (a sum of squares overflows fp16), else in mat_type.
    """
    onnx = _onnx()
    h = onnx.helper
    tp = onnx.TensorProto
    half = (tp.FLOAT16, tp.BFLOAT16)
    norm_type = tp.FLOAT if mat_type in half else mat_type
    nodes: list[onnx.NodeProto] = []
    # The op sequence first, then the wiring, so that the last node writes `y` whichever ops occur.
    ops: list[tuple[str, dict[str, Any]]] = []
    if io_type != mat_type:
        ops.append(("Cast", {"to": mat_type}))
    ops.append(("MatMul", {}))
    out_type = mat_type
    if normalize:
        if mat_type != norm_type:
            ops.append(("Cast", {"to": norm_type}))
        ops.append(("Normalize", {}))
        out_type = norm_type
    if out_type != io_type:
        ops.append(("Cast", {"to": io_type}))

    cur = x
    for i, (op, attrs) in enumerate(ops):
        last = i == len(ops) - 1
        if op == "Cast":
            out = y if last else names(f"cast_{_dtype_name(attrs['to'])}")
            nodes.append(h.make_node("Cast", [cur], [out], name=names("Cast"), to=attrs["to"]))
        elif op == "MatMul":
            out = y if last else names("projected")
            nodes.append(h.make_node("MatMul", [cur, pt_name], [out], name=names("MatMul")))
        else:  # Normalize: y / max(ReduceL2(y, -1), eps)
            norm = names("l2norm")
            if opset >= 18:
                axes = names("axes")
                nodes.append(
                    h.make_node(
                        "Constant", [], [axes], name=names("Constant"), value=h.make_tensor(axes, tp.INT64, [1], [-1])
                    )
                )
                nodes.append(h.make_node("ReduceL2", [cur, axes], [norm], name=names("ReduceL2"), keepdims=1))
            else:
                nodes.append(h.make_node("ReduceL2", [cur], [norm], name=names("ReduceL2"), axes=[-1], keepdims=1))
            eps = names("eps")
            eps_np = np.array([NORM_EPS], dtype=_np_dtype(norm_type))
            nodes.append(
                h.make_node(
                    "Constant", [], [eps], name=names("Constant"), value=onnx.numpy_helper.from_array(eps_np, eps)
                )
            )
            safe = names("l2norm_safe")
            nodes.append(h.make_node("Max", [norm, eps], [safe], name=names("Max")))
            out = y if last else names("normalized")
            nodes.append(h.make_node("Div", [cur, safe], [out], name=names("Div")))
        cur = out
    return nodes


def _projection_tensor(artifact: FilterArtifact, name: str, elem_type: int) -> onnx.TensorProto:
    """Pᵀ as a (d, k) initializer in `elem_type`."""
    onnx = _onnx()
    pt = np.ascontiguousarray(artifact.projection.T.astype(_np_dtype(elem_type)))
    return onnx.numpy_helper.from_array(pt, name)


# ---------------------------------------------------------------------------------------------
# Standalone graph


def build_standalone(
    artifact: FilterArtifact,
    *,
    normalize: bool = False,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    per_token: bool = False,
) -> onnx.ModelProto:
    """A model `embeddings [batch, d] -> filtered_embeddings [batch, k]` (or `[batch, seq, ·]`).

    The input's rank is part of an ONNX signature (onnx.checker requires a shape), so token-level
    use is a separate graph (`per_token=True`) rather than a rank-free input.
    """
    onnx = _onnx()
    h = onnx.helper
    tp = onnx.TensorProto
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise ExportError(
            f"--opset {opset} is outside what this exporter supports ({MIN_OPSET}..{latest}); use e.g. {DEFAULT_OPSET}"
        )
    io_type = tp.FLOAT16 if fp16 else tp.FLOAT
    d, k = artifact.hidden_size, artifact.output_dim
    lead = ["batch", "seq"] if per_token else ["batch"]
    names = _Names({STANDALONE_INPUT, STANDALONE_OUTPUT}, prefix="")
    pt_name = names("projection_t")
    nodes = _filter_nodes(
        STANDALONE_INPUT,
        STANDALONE_OUTPUT,
        pt_name,
        io_type=io_type,
        mat_type=io_type,
        normalize=normalize,
        opset=opset,
        names=names,
    )
    opset_ids = [h.make_opsetid("", opset)]
    # The oldest IR version that carries this opset, so that older runtimes can load the file.
    ir_version = h.find_min_ir_version_for(opset_ids)
    inputs = [h.make_tensor_value_info(STANDALONE_INPUT, io_type, [*lead, d])]
    if ir_version < 4:  # before IR 4 every initializer must also be a graph input
        inputs.append(h.make_tensor_value_info(pt_name, io_type, [d, k]))
    graph = h.make_graph(
        nodes,
        "embfilter",
        inputs,
        [h.make_tensor_value_info(STANDALONE_OUTPUT, io_type, [*lead, k])],
        [_projection_tensor(artifact, pt_name, io_type)],
        doc_string=f"EmbedFilter: {STANDALONE_OUTPUT} = {'normalize(' if normalize else ''}{STANDALONE_INPUT} · Pᵀ"
        f"{')' if normalize else ''}, P {k}×{d} from {artifact.model_source or 'a fitted filter'}",
    )
    model = h.make_model(
        graph, opset_imports=opset_ids, producer_name="embfilter", producer_version=__version__, ir_version=ir_version
    )
    _set_metadata(
        model,
        filter_metadata(
            artifact,
            normalize=normalize,
            dtype="float16" if fp16 else "float32",
            input=STANDALONE_INPUT,
            output=STANDALONE_OUTPUT,
        ),
    )
    return model


def export_standalone(
    artifact: FilterArtifact,
    out: str | os.PathLike[str],
    *,
    normalize: bool = False,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    per_token: bool = False,
    check: bool = True,
    force: bool = False,
    external_data: bool | None = None,
) -> ExportResult:
    """Build, write (atomically) and check a standalone filter graph."""
    out = check_writable(out, force)
    model = build_standalone(artifact, normalize=normalize, opset=opset, fp16=fp16, per_token=per_token)
    externalize = _needs_external(model, 0) if external_data is None else external_data
    data_path = _filter_data_path(out, reserved=set()) if externalize else None
    if data_path is not None:
        check_writable(data_path, force)
    report: CheckReport | None = None
    with _side_files() as side, atomic_path(out, force=force) as tmp:
        if data_path is not None:
            _externalize_initializer(model, model.graph.initializer[0].name, data_path, side)
        _save(model, tmp)
        if check:
            _run_checker(tmp, full=True)
            report = check_standalone(tmp, artifact, normalize=normalize, fp16=fp16, per_token=per_token)
    return ExportResult(
        path=out,
        kind="onnx",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype="float16" if fp16 else "float32",
        normalize=normalize,
        opset=opset,
        check=report,
        extra={
            "input": STANDALONE_INPUT,
            "output": STANDALONE_OUTPUT,
            "per_token": per_token,
            "external_data": data_path.name if data_path else None,
        },
    )


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
    if normalize:
        ref = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), NORM_EPS)
    return ref


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


# ---------------------------------------------------------------------------------------------
# Host graphs


def load_host(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model's graph without its external weights; anything else is an ExportError."""
    onnx = _onnx()
    p = Path(path)
    if not p.exists():
        raise ExportError(f"--append-to {p}: no such file; give the path of an ONNX model (.onnx)")
    if p.is_dir():
        raise ExportError(f"--append-to {p} is a directory; give the .onnx file inside it")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(
            f"{p} is not an ONNX model ({type(exc).__name__}: {_first_line(exc)}); give a .onnx file"
        ) from exc
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields: insist on a real graph.
    if model.ir_version <= 0 or not model.graph.output or not model.graph.node:
        raise ExportError(f"{p} is not an ONNX model (no IR version, graph nodes or outputs found); give a .onnx file")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _value_info_desc(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return f"{vi.name} (not a tensor)"
    dims = (
        [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        if tt.HasField("shape")
        else None
    )
    shape = f"[{', '.join(dims)}]" if dims is not None else "[?]"
    return f"{vi.name} {shape} {_dtype_name(tt.elem_type) if tt.elem_type else '?'}"


def _rank(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    return len(tt.shape.dim) if vi.type.HasField("tensor_type") and tt.HasField("shape") else None


def _last_dim(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or not tt.shape.dim:
        return None
    last = tt.shape.dim[-1]
    return int(last.dim_value) if last.HasField("dim_value") else None


def describe_outputs(model: onnx.ModelProto) -> str:
    return ", ".join(_value_info_desc(v) for v in model.graph.output)


def choose_output(model: onnx.ModelProto, requested: str | None) -> OutputChoice:
    """Which host output to filter: --output, else `sentence_embedding`, else the single pooled one.

    "Pooled" means rank 2 ([batch, d]). A graph with exactly one output is taken whatever its rank
    (a token-level `last_hidden_state` is filtered per token).
    """
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    if requested is not None:
        if requested not in names:
            raise ExportError(f"the host has no output {requested!r}; its outputs are: {describe_outputs(model)}")
        return OutputChoice(requested, "chosen with --output")
    if PREFERRED_OUTPUT in names:
        return OutputChoice(PREFERRED_OUTPUT, f"the host's {PREFERRED_OUTPUT!r} output")
    pooled = [o.name for o in outputs if _rank(o) == 2]
    if len(pooled) == 1:
        others = [n for n in names if n != pooled[0]]
        return OutputChoice(
            pooled[0], "its only pooled (rank-2) output" + (f"; not {', '.join(others)}" if others else "")
        )
    if len(outputs) == 1:
        rank = _rank(outputs[0])
        return OutputChoice(
            names[0], "its only output" + (f" (rank {rank}, filtered per token)" if rank and rank > 2 else "")
        )
    raise ExportError(
        f"cannot tell which host output to filter ({len(pooled)} pooled outputs, no {PREFERRED_OUTPUT!r}); "
        f"pass --output NAME, one of: {describe_outputs(model)}"
    )


def append_filter(
    host: onnx.ModelProto,
    artifact: FilterArtifact,
    *,
    output: str | None = None,
    filtered_name: str | None = None,
    normalize: bool = False,
    source: str = "the host",
) -> AppendInfo:
    """Edit `host` in place: the filter goes after the chosen output, whose result becomes output 0.

    By default the filtered tensor takes the host output's name and the original tensor is renamed
    `<name>_unfiltered` (kept as the last output). With `filtered_name`, the host's output keeps its
    name and the filtered tensor gets the new one.
    """
    onnx = _onnx()
    h = onnx.helper
    tp = onnx.TensorProto
    graph = host.graph
    opset = default_opset_version(host)
    if opset is None:
        raise ExportError(
            f"{source} imports no ai.onnx opset, so the filter's MatMul cannot be added; re-export it with a standard opset"
        )
    if opset < MIN_OPSET:
        raise ExportError(
            f"{source} uses opset {opset}; the filter needs opset {MIN_OPSET} or newer (convert it with onnx.version_converter)"
        )
    existing = {p.key: p.value for p in host.metadata_props}
    if f"{METADATA_PREFIX}projection_sha256" in existing:
        raise ExportError(
            f"{source} already contains an embfilter filter (projection "
            f"{existing[f'{METADATA_PREFIX}projection_sha256'][:16]}…); append to the original, unfiltered model"
        )
    choice = choose_output(host, output)
    vi = next(o for o in graph.output if o.name == choice.name)
    if not vi.type.HasField("tensor_type"):
        raise ExportError(
            f"output {choice.name!r} of {source} is not a tensor; pass --output with a tensor output: {describe_outputs(host)}"
        )
    elem = vi.type.tensor_type.elem_type
    if elem not in (tp.FLOAT, tp.DOUBLE, tp.FLOAT16, tp.BFLOAT16):
        raise ExportError(
            f"output {choice.name!r} of {source} is {_dtype_name(elem) if elem else 'of unknown type'}, not a float "
            f"tensor; choose an embedding output with --output: {describe_outputs(host)}"
        )
    rank = _rank(vi)
    last = _last_dim(vi)
    d = artifact.hidden_size
    if rank is not None and rank < 1:
        raise ExportError(f"output {choice.name!r} of {source} is a scalar; choose an embedding output with --output")
    if last is not None and last != d:
        raise ExportError(
            f"output {choice.name!r} of {source} has dimension {last} but the filter expects {d} "
            f"(fitted on {artifact.model_source or 'another model'}); use a filter fitted on the model this graph embeds with"
        )
    if choice.name in {i.name for i in graph.input} or choice.name in {t.name for t in graph.initializer}:
        raise ExportError(
            f"output {choice.name!r} of {source} is a graph input or constant, not a computed embedding; choose another with --output"
        )

    used = _all_names(graph)
    names = _Names(used)
    if filtered_name is None:
        filtered, unfiltered = choice.name, choice.name + UNFILTERED_SUFFIX
        if unfiltered in used:
            raise ExportError(
                f"{source} already has a tensor named {unfiltered!r}; pass --filtered-name to give the filtered output a new name"
            )
        used.add(unfiltered)
        _rename_tensor(graph, choice.name, unfiltered)
    else:
        if filtered_name in used:
            raise ExportError(f"--filtered-name {filtered_name!r} is already a tensor name in {source}; choose another")
        used.add(filtered_name)
        filtered, unfiltered = filtered_name, choice.name

    half = elem in (tp.FLOAT16, tp.BFLOAT16)
    mat_type = tp.FLOAT if half else elem  # half hosts: Cast in, fp32 MatMul with the exact P, Cast out
    pt_name = names("projection_t")
    graph.initializer.append(_projection_tensor(artifact, pt_name, mat_type))
    if host.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        graph.input.append(h.make_tensor_value_info(pt_name, mat_type, [d, artifact.output_dim]))
    graph.node.extend(
        _filter_nodes(
            unfiltered,
            filtered,
            pt_name,
            io_type=elem,
            mat_type=mat_type,
            normalize=normalize,
            opset=opset,
            names=names,
        )
    )

    # Output list: the filtered tensor first, then the host's other outputs in their order, then the unfiltered one.
    old = [o for o in graph.output]
    dims = list(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
    new_vi = h.make_tensor_value_info(filtered, elem, None)
    if dims is not None:
        shape = new_vi.type.tensor_type.shape
        for dim in dims[:-1]:
            shape.dim.add().CopyFrom(dim)
        shape.dim.add().dim_value = artifact.output_dim
    unf_vi = onnx.ValueInfoProto()
    unf_vi.CopyFrom(vi)
    unf_vi.name = unfiltered
    rest = [o for o in old if o.name != choice.name]
    del graph.output[:]
    graph.output.extend([new_vi, *rest, unf_vi])

    _set_metadata(
        host,
        filter_metadata(
            artifact,
            normalize=normalize,
            host_output=choice.name,
            filtered_output=filtered,
            unfiltered_output=unfiltered,
        ),
    )
    return AppendInfo(
        host_output=choice.name,
        filtered_name=filtered,
        unfiltered_name=unfiltered,
        reason=choice.reason,
        elem_type=elem,
        rank=rank,
        opset=opset,
        projection_initializer=pt_name,
    )


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor `old` everywhere in `graph`, including uses inside subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            _rename_uses(sub, old, new)
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    # A subgraph may read an outer tensor by name; ONNX names are unique (SSA), so no shadowing to respect.
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            _rename_uses(sub, old, new)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    onnx = _onnx()

    def from_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    for tensor in from_graph(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise ExportError(
        f"tensor {tensor.name!r} is marked as external data but has no location; the host file is damaged"
    )


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external data files a model refers to (relative to its folder)."""
    return sorted({_location(t) for t in _external_tensors(model)})


def _needs_external(model: onnx.ModelProto, extra_bytes: int) -> bool:
    return model.ByteSize() + extra_bytes > PROTOBUF_LIMIT


def _filter_data_path(out: Path, reserved: set[str]) -> Path:
    name = f"{out.name}.data"
    if name in reserved:  # never write over (or share) one of the host's own data files
        name = f"{out.name}.embfilter.data"
    return out.with_name(name)


class _SideFiles:
    """Files written beside the output (filter data, links to host data), undone if the export fails.

    A side file that already exists (re-export with --force) is moved aside first and put back on
    failure, so a failed export never breaks the previous output.
    """

    def __init__(self) -> None:
        self.created: list[Path] = []
        self.backups: list[tuple[Path, Path]] = []

    def claim(self, path: Path) -> None:
        """Free `path` for a new file, remembering how to restore what was there."""
        if path.exists():
            backup = path.with_name(f".{path.name}.{os.getpid()}.bak")
            os.replace(path, backup)
            self.backups.append((backup, path))
        self.created.append(path)

    def rollback(self) -> None:
        for p in reversed(self.created):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for backup, original in self.backups:
            with contextlib.suppress(FileNotFoundError):
                os.replace(backup, original)

    def commit(self) -> None:
        for backup, _ in self.backups:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()


@contextlib.contextmanager
def _side_files() -> Iterator[_SideFiles]:
    side = _SideFiles()
    try:
        yield side
    except BaseException:
        side.rollback()
        raise
    side.commit()


def _externalize_initializer(model: onnx.ModelProto, name: str, data_path: Path, side: _SideFiles) -> None:
    """Move initializer `name` into its own data file `data_path`."""
    onnx = _onnx()
    tensor = next(t for t in model.graph.initializer if t.name == name)
    raw = onnx.numpy_helper.to_array(tensor).tobytes()  # to_array gives native little-endian C order
    side.claim(data_path)
    data_path.write_bytes(raw)
    tensor.raw_data = raw  # set_external_data insists on raw_data being present, then we drop it
    for fld in ("float_data", "double_data", "int32_data", "int64_data"):
        tensor.ClearField(fld)
    onnx.external_data_helper.set_external_data(tensor, location=data_path.name, offset=0, length=len(raw))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _link_host_data(host_path: Path, out: Path, locations: list[str], side: _SideFiles) -> list[str]:
    """Make the host's external data files visible from `out`'s folder; return those linked.

    onnx and onnxruntime reject `..`, absolute and symlinked locations, so a relative path back to
    the host folder cannot work; a hard link shares the bytes without copying or touching them.
    """
    host_dir = host_path.resolve().parent
    out_dir = out.resolve().parent
    if host_dir == out_dir:
        return []
    linked = []
    for loc in locations:
        src = (host_dir / loc).resolve()
        if Path(loc).is_absolute() or host_dir not in src.parents:
            raise ExportError(
                f"the host refers to external data {loc!r} outside its own folder, which onnxruntime refuses to load; "
                "fix the host's locations first"
            )
        if not src.is_file():
            raise ExportError(f"the host's external data file {src} is missing; the host cannot be loaded as it is")
        dst = out_dir / loc
        if dst.exists():
            if os.path.samefile(src, dst):
                continue  # linked by an earlier export
            raise ExportError(
                f"{dst} exists and is not the host's data file {src}; the output folder needs the host's file under "
                f"that name: write the output next to the host (-o {host_dir}/NAME.onnx) or remove {dst}"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError as exc:
            reason = "another filesystem" if exc.errno == errno.EXDEV else exc.strerror or type(exc).__name__
            raise ExportError(
                f"cannot hard-link the host's external data {src} into {out_dir} ({reason}); onnxruntime only reads "
                f"external data from the model's own folder, so write the output next to the host: -o {host_dir}/NAME.onnx"
            ) from exc
        side.created.append(dst)
        linked.append(loc)
    return linked


def export_appended(
    artifact: FilterArtifact,
    host_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    output: str | None = None,
    filtered_name: str | None = None,
    normalize: bool = False,
    check: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Append the filter to the ONNX model at `host_path` and write the result to `out` (then check it).

    `log` receives one-line notes for the user (which output was chosen and why, linked files).
    """
    note = log or (lambda _msg: None)
    host_path = Path(host_path)
    out = check_writable(out, force)
    host = load_host(host_path)
    locations = external_locations(host)
    info = append_filter(
        host, artifact, output=output, filtered_name=filtered_name, normalize=normalize, source=str(host_path)
    )
    note(
        f"Filtering output {info.host_output!r} of {host_path.name} ({info.reason}); the result is output 0 "
        f"{_value_info_desc(host.graph.output[0])}, the unfiltered tensor stays as {info.unfiltered_name!r}"
    )
    pt = next(t for t in host.graph.initializer if t.name == info.projection_initializer)
    # The filter gets its own data file when the host keeps its weights outside (LLM-sized graphs) and
    # the filter is not tiny, or when inlining it would cross protobuf's 2 GB limit.
    auto = _needs_external(host, 0) or (bool(locations) and len(pt.raw_data) > 1 << 20)
    externalize = auto if external_data is None else external_data
    data_path = _filter_data_path(out, set(locations)) if externalize else None
    if data_path is not None:
        check_writable(data_path, force)
    report: CheckReport | None = None
    with _side_files() as side:
        linked = _link_host_data(host_path, out, locations, side) if locations else []
        if linked:
            note(
                f"Hard-linked {len(linked)} external data file(s) of the host into {out.resolve().parent} "
                f"(no copy; onnxruntime reads external data only from the model's folder): {', '.join(linked)}"
            )
        with atomic_path(out, force=force) as tmp:
            if data_path is not None:
                _externalize_initializer(host, info.projection_initializer, data_path, side)
            _save(host, tmp)
            if check:
                _check_or_blame_host(tmp, host_path)
                report = check_appended(host_path, tmp, artifact, info, normalize=normalize)
    return ExportResult(
        path=out,
        kind="onnx-append",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype=_dtype_name(info.elem_type),
        normalize=normalize,
        opset=info.opset,
        check=report,
        extra={
            "host": str(host_path),
            "host_output": info.host_output,
            "reason": info.reason,
            "filtered_output": info.filtered_name,
            "unfiltered_output": info.unfiltered_name,
            "per_token": bool(info.rank and info.rank > 2),
            "ir_version": int(host.ir_version),
            "external_data": data_path.name if data_path else None,
            "linked_host_data": linked,
        },
    )


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx = _onnx()
    try:
        onnx.save_model(model, str(path))
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(f"the graph is too large to save inline ({_first_line(exc)}); pass --external-data") from exc


def _run_checker(path: Path, full: bool) -> None:
    onnx = _onnx()
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {_first_line(exc)}; nothing was written") from exc


def _check_or_blame_host(path: Path, host_path: Path) -> None:
    """onnx.checker on the result; if the host fails the same check, that is the host's problem."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(str(host_path))
        except onnx.checker.ValidationError:
            return  # the host itself does not pass the checker; onnxruntime below is the real test
        raise ExportError(f"onnx.checker rejected the filtered graph: {_first_line(exc)}; nothing was written") from exc


def _session(path: str | os.PathLike[str]) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings would otherwise go to stderr unasked
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: {_first_line(exc)}") from exc


def _gather_vocab(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of an embedding table fed by `input_name` (Gather on an initializer), if one is found.

    Follows a few shape/type-only ops (Cast, Reshape, …) between the input and the Gather.
    """
    graph = model.graph
    init_dims = {t.name: list(t.dims) for t in graph.initializer}
    passthrough = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
    frontier, seen, sizes = {input_name}, set(), []
    for _ in range(6):
        nxt = set()
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
    onnx = _onnx()
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
            dtype = _np_dtype(elem)
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
            feeds[vi.name] = rng.standard_normal(shape).astype(_np_dtype(elem))
        else:
            raise ExportError(
                f"the parity check cannot make inputs of type {_dtype_name(elem)} (input {vi.name!r}); pass --no-check"
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
    onnx = _onnx()
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
            f"the parity check could not run the host on generated inputs ({_first_line(exc)}); pass --no-check to skip it"
        ) from exc
    del session
    session = _session(out_path)
    try:
        filtered, unfiltered = session.run([info.filtered_name, info.unfiltered_name], feeds)
    except Exception as exc:
        raise ExportError(f"the filtered graph failed in onnxruntime: {_first_line(exc)}; nothing was written") from exc
    del session
    if host_out.shape[-1] != artifact.hidden_size:
        raise ExportError(
            f"output {info.host_output!r} has dimension {host_out.shape[-1]} at run time but the filter expects "
            f"{artifact.hidden_size}; use a filter fitted on this graph's model"
        )
    ref = _reference(host_out, artifact, normalize)
    err = max_relative_error(filtered, ref)
    bound = REL_BOUNDS.get(_dtype_name(info.elem_type), 1e-5)
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
