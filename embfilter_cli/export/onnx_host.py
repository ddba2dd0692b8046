"""Editing a host embedding graph: the filter goes after one of its outputs.

Hosts are edited, not merged: the chosen output's tensor is renamed `<name>_unfiltered`, the filter
nodes write a new tensor under the host's name, and that becomes output 0. The host keeps its IR
version and opset imports. Hosts are loaded without their external weights (see `onnx_data`).

Not handled: sparse initializers as the chosen output, outputs produced inside functions' private
scopes, quantized (integer) outputs, and hosts that use no `ai.onnx` opset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embfilter_cli.errors import ExportError
from embfilter_cli.export.onnx_graph import (
    METADATA_PREFIX,
    MIN_OPSET,
    FreshNames,
    default_opset_version,
    dtype_name,
    filter_metadata,
    filter_nodes,
    first_line,
    mean_tensor,
    onnx_module,
    projection_tensor,
    set_metadata,
)

if TYPE_CHECKING:
    import onnx

    from embfilter_cli.filters.artifact import FilterArtifact


UNFILTERED_SUFFIX = "_unfiltered"
PREFERRED_OUTPUT = "sentence_embedding"


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


def load_host(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model's graph without its external weights; anything else is an ExportError."""
    onnx = onnx_module()
    p = Path(path)
    if not p.exists():
        raise ExportError(f"--append-to {p}: no such file; give the path of an ONNX model (.onnx)")
    if p.is_dir():
        raise ExportError(f"--append-to {p} is a directory; give the .onnx file inside it")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(
            f"{p} is not an ONNX model ({type(exc).__name__}: {first_line(exc)}); give a .onnx file"
        ) from exc
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields: insist on a real graph.
    if model.ir_version <= 0 or not model.graph.node:
        raise ExportError(f"{p} is not an ONNX model (no IR version or graph nodes found); give a .onnx file")
    if not model.graph.output:
        raise ExportError(
            f"{p} is an ONNX model but its graph declares no outputs, so there is no embedding to filter; "
            "re-export it with its embedding as a graph output"
        )
    return model


def value_info_desc(vi: onnx.ValueInfoProto) -> str:
    """`name [dims] dtype` of a graph input or output, for messages."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return f"{vi.name} (not a tensor)"
    dims = (
        [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        if tt.HasField("shape")
        else None
    )
    shape = f"[{', '.join(dims)}]" if dims is not None else "[?]"
    return f"{vi.name} {shape} {dtype_name(tt.elem_type) if tt.elem_type else '?'}"


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
    """Every output of `model` as `name [dims] dtype`, comma-separated (for error messages)."""
    return ", ".join(value_info_desc(v) for v in model.graph.output)


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
    onnx = onnx_module()
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
            f"output {choice.name!r} of {source} is {dtype_name(elem) if elem else 'of unknown type'}, not a float "
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
    names = FreshNames(used)
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
    graph.initializer.append(projection_tensor(artifact, pt_name, mat_type))
    mean_name = names("mean") if artifact.centered else None
    if mean_name is not None:
        graph.initializer.append(mean_tensor(artifact, mean_name, mat_type))
    if host.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        graph.input.append(h.make_tensor_value_info(pt_name, mat_type, [d, artifact.output_dim]))
        if mean_name is not None:
            graph.input.append(h.make_tensor_value_info(mean_name, mat_type, [artifact.output_dim]))
    graph.node.extend(
        filter_nodes(
            unfiltered,
            filtered,
            pt_name,
            io_type=elem,
            mat_type=mat_type,
            normalize=normalize,
            opset=opset,
            names=names,
            mean_name=mean_name,
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

    set_metadata(
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
