"""The filter's ONNX nodes and the standalone filter graph.

Pure core (no click, no printing): graphs are built directly with `onnx.helper` — torch 2.13's
default exporter needs onnxscript, and a MatMul needs no exporter. The filter is `y = x · Pᵀ` with
Pᵀ stored as a (d, k) initializer, and for a centred filter `y = x · Pᵀ − m` (a Sub with the (k,)
mean initializer right after the MatMul, before any normalisation); MatMul and Sub broadcast over
leading axes, so the same nodes filter pooled `[batch, d]` and token-level `[batch, seq, d]` tensors. Optional L2
normalisation is `y / max(‖y‖₂, 1e-12)` (a zero vector stays zero instead of becoming NaN) and is
always computed in at least float32, because squaring half-precision values overflows past 256.
The filter's ops (MatMul, Sub, Cast, ReduceL2, Max, Div) exist from opset 8; ReduceL2 takes its axes as
an attribute before opset 18 and as an input from 18.

Also the small helpers every ONNX module shares: the lazy `onnx` import (so importing this module
stays cheap), element-type names, and the `embfilter.*` provenance metadata.

Editing a host graph is `onnx_host`; external data files `onnx_data`; checks `onnx_check`; writing
and checking a whole export `onnx_export`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embfilter_cli import __version__
from embfilter_cli.errors import ExportError

if TYPE_CHECKING:  # onnx is imported inside functions so that importing this module stays cheap
    import onnx
    from onnx import NodeProto

    from embfilter_cli.filters.artifact import FilterArtifact


DEFAULT_OPSET = 17
MIN_OPSET = 8  # Max with broadcasting (the zero-norm guard) arrives in opset 8
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
STANDALONE_INPUT = "embeddings"
STANDALONE_OUTPUT = "filtered_embeddings"
METADATA_PREFIX = "embfilter."
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


def onnx_module() -> Any:
    """The `onnx` package, imported on first use; a MissingDependencyError naming the pip command if absent."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        from embfilter_cli.errors import MissingDependencyError

        raise MissingDependencyError("ONNX export needs the onnx package: pip install onnx onnxruntime") from exc
    return onnx


def dtype_name(elem_type: int) -> str:
    """numpy-style name of an ONNX element type (float32, float16, int64, …)."""
    onnx = onnx_module()
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type; bfloat16 (which numpy lacks) is an ExportError."""
    onnx = onnx_module()
    if elem_type == onnx.TensorProto.BFLOAT16:
        # numpy has no bfloat16; onnxruntime hands such tensors out as ml_dtypes-backed arrays or not at all
        raise ExportError("bfloat16 tensors cannot be fed from numpy; run with --no-check or export a float32 host")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


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
    if artifact.centered:  # which mean the graph subtracts, and how it was made
        meta[f"{METADATA_PREFIX}mean_sha256"] = artifact.metadata["mean_sha256"]
        meta[f"{METADATA_PREFIX}centering"] = artifact.metadata["centering"]
    meta[f"{METADATA_PREFIX}exported_by"] = f"embfilter {__version__}"
    for key, value in extra.items():
        meta[f"{METADATA_PREFIX}{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return meta


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Add `meta` to the model's `metadata_props`, keeping the entries already there."""
    onnx = onnx_module()
    # set_model_props replaces the whole list: merge so that the host's own entries survive.
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})


class FreshNames:
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


def filter_nodes(
    x: str,
    y: str,
    pt_name: str,
    *,
    io_type: int,
    mat_type: int,
    normalize: bool,
    opset: int,
    names: FreshNames,
    mean_name: str | None = None,
) -> list[onnx.NodeProto]:
    """Nodes computing y = x·Pᵀ (− m when `mean_name` names the mean initializer), optionally L2-normalised.

    io_type is the element type of x and y; mat_type that of Pᵀ, m, the MatMul and the Sub;
    normalisation runs in float32 when mat_type is a half type (a sum of squares overflows fp16),
    else in mat_type.
    """
    onnx = onnx_module()
    h = onnx.helper
    tp = onnx.TensorProto
    half = (tp.FLOAT16, tp.BFLOAT16)
    norm_type = tp.FLOAT if mat_type in half else mat_type
    nodes: list[NodeProto] = []
    # The op sequence first, then the wiring, so that the last node writes `y` whichever ops occur.
    ops: list[tuple[str, dict[str, Any]]] = []
    if io_type != mat_type:
        ops.append(("Cast", {"to": mat_type}))
    ops.append(("MatMul", {}))
    if mean_name is not None:
        ops.append(("Sub", {}))
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
            out = y if last else names(f"cast_{dtype_name(attrs['to'])}")
            nodes.append(h.make_node("Cast", [cur], [out], name=names("Cast"), to=attrs["to"]))
        elif op == "MatMul":
            out = y if last else names("projected")
            nodes.append(h.make_node("MatMul", [cur, pt_name], [out], name=names("MatMul")))
        elif op == "Sub":
            out = y if last else names("centred")
            nodes.append(h.make_node("Sub", [cur, mean_name], [out], name=names("Sub")))
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
            eps_np = np.array([NORM_EPS], dtype=np_dtype(norm_type))
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


def projection_tensor(artifact: FilterArtifact, name: str, elem_type: int) -> onnx.TensorProto:
    """Pᵀ as a (d, k) initializer in `elem_type`."""
    onnx = onnx_module()
    pt = np.ascontiguousarray(artifact.projection.T.astype(np_dtype(elem_type)))
    return onnx.numpy_helper.from_array(pt, name)


def mean_tensor(artifact: FilterArtifact, name: str, elem_type: int) -> onnx.TensorProto:
    """The centred filter's mean m as a (k,) initializer in `elem_type`."""
    onnx = onnx_module()
    if artifact.mean is None:
        raise ValueError("the filter has no mean")  # a bug in the caller
    return onnx.numpy_helper.from_array(np.ascontiguousarray(artifact.mean.astype(np_dtype(elem_type))), name)


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
    onnx = onnx_module()
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
    names = FreshNames({STANDALONE_INPUT, STANDALONE_OUTPUT}, prefix="")
    pt_name = names("projection_t")
    mean_name = names("mean") if artifact.centered else None
    nodes = filter_nodes(
        STANDALONE_INPUT,
        STANDALONE_OUTPUT,
        pt_name,
        io_type=io_type,
        mat_type=io_type,
        normalize=normalize,
        opset=opset,
        names=names,
        mean_name=mean_name,
    )
    opset_ids = [h.make_opsetid("", opset)]
    # The oldest IR version that carries this opset, so that older runtimes can load the file.
    ir_version = h.find_min_ir_version_for(opset_ids)
    inputs = [h.make_tensor_value_info(STANDALONE_INPUT, io_type, [*lead, d])]
    # The projection stays initializer 0 (onnx_export externalizes it by position); the mean follows.
    initializers = [projection_tensor(artifact, pt_name, io_type)]
    if mean_name is not None:
        initializers.append(mean_tensor(artifact, mean_name, io_type))
    if ir_version < 4:  # before IR 4 every initializer must also be a graph input
        inputs.append(h.make_tensor_value_info(pt_name, io_type, [d, k]))
        if mean_name is not None:
            inputs.append(h.make_tensor_value_info(mean_name, io_type, [k]))
    graph = h.make_graph(
        nodes,
        "embfilter",
        inputs,
        [h.make_tensor_value_info(STANDALONE_OUTPUT, io_type, [*lead, k])],
        initializers,
        doc_string=f"EmbedFilter: {STANDALONE_OUTPUT} = {'normalize(' if normalize else ''}{STANDALONE_INPUT} · Pᵀ"
        f"{' − m' if mean_name else ''}{')' if normalize else ''}, P {k}×{d} from "
        f"{artifact.model_source or 'a fitted filter'}",
    )
    model = h.make_model(
        graph, opset_imports=opset_ids, producer_name="embfilter", producer_version=__version__, ir_version=ir_version
    )
    set_metadata(
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
