"""Exporting a filter: the one path behind `embfilter export` and `Filter.to_onnx`/`append_to_onnx`/
`to_sentence_transformers`.

A whole sentence-transformers model needs more than the filter: `export_whole_model` finds and checks
the model, builds the `embed` reference the export is compared with, and calls `export.st_model`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embfilter_cli.api.hooks import Hooks, hooks_or_default
from embfilter_cli.errors import ModelNotFoundError

if TYPE_CHECKING:
    from embfilter_cli.export.report import ExportResult
    from embfilter_cli.filters.artifact import FilterArtifact
    from embfilter_cli.model.location import ModelLocation


def prompt_for(recipe: str) -> str:
    """The prefix prompt for `--recipe` ('' for none); refuses templates with text after {text}."""
    from embfilter_cli.export.st_model import prefix_prompt
    from embfilter_cli.text.recipes import resolve_recipe

    rec = resolve_recipe(recipe)
    return "" if rec.name == "none" else prefix_prompt(rec.template, rec.name)


def filter_model(artifact: FilterArtifact, spec: str | None, revision: str | None) -> ModelLocation:
    """`--model`, else the filter's own model when it is here (a local path or the built-in GGUF)."""
    from embfilter_cli.model.locate import resolve_model

    if spec is not None:
        return resolve_model(spec, revision=revision)
    source = artifact.model_source
    if Path(source).exists():
        return resolve_model(source)
    with contextlib.suppress(ModelNotFoundError):
        default = resolve_model(None)
        if default.source == source:
            return default
    raise ModelNotFoundError(
        f"the filter was fitted on {source}, which is not here; pass --model (a folder, .gguf or Hub id) for a whole "
        "sentence-transformers model, or --dense-only for the Dense module folder alone"
    )


@contextlib.contextmanager
def _conversion_dir(no_cache: bool) -> Iterator[str | None]:
    """Where a GGUF model is converted: the embfilter cache, or with --no-cache a folder deleted after."""
    if not no_cache:
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="embfilter-export-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_whole_model(
    artifact: FilterArtifact,
    target: str | os.PathLike[str],
    *,
    model: str | None,
    revision: str | None,
    pooling: str,
    recipe: str,
    max_length: int,
    normalize: bool,
    no_cache: bool,
    check: bool,
    force: bool,
    hooks: Hooks | None = None,
) -> ExportResult:
    """Check the filter against the model, then write and check the sentence-transformers folder."""
    import numpy as np

    from embfilter_cli.export.st_model import StModelSpec, export_st_model, require_tokenizer
    from embfilter_cli.filters.centering import check_centering_use
    from embfilter_cli.model.head import read_head_for_filter
    from embfilter_cli.text.embedding import load_encoder_at, model_target
    from embfilter_cli.text.recipes import resolve_recipe

    prompt = prompt_for(recipe)  # before anything loads
    rec = resolve_recipe(recipe)
    # A centred filter's mean belongs to one pooling and recipe (its Dense bias is −mean).
    check_centering_use(artifact.centering, pooling, rec.name, rec.template, str(artifact.path))
    location = filter_model(artifact, model, revision)
    read_head_for_filter(location, artifact)  # refuses a filter fitted on another model
    if location.kind == "hf_folder":
        require_tokenizer(location.path)
    info = hooks_or_default(hooks).info
    with _conversion_dir(no_cache) as cache_dir:
        options: dict[str, Any] = {"cache_dir": cache_dir, "notify": info}
        folder, _ = model_target(location, revision, require_folder=True, **options)  # ships the folder: any size
        info(f"Model: {location.source}; pooling {pooling}" + (f", prompt {prompt!r}" if prompt else ""))
        encoder = load_encoder_at(location, device="cpu", dtype="float32", revision=revision, **options)
        limit = encoder.effective_max_length(max_length)

        def reference(texts: list[str]) -> np.ndarray:
            vectors = artifact.apply(encoder.embed(texts, pooling=pooling, recipe=recipe, max_length=limit))
            vectors = np.asarray(vectors, dtype=np.float64)
            if normalize:
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-300)
            return vectors

        spec = StModelSpec(
            model=folder,
            pooling=pooling,
            prompt=prompt,
            normalize=normalize,
            max_length=limit,
            revision=revision if not Path(folder).exists() else None,
            provenance={"model_source": location.source, "recipe": recipe},
        )
        model_inputs = [p for p in (location.path, Path(folder)) if p.exists()]  # never replaced by -o --force
        return export_st_model(
            artifact, spec, target, reference=reference, check=check, force=force, inputs=model_inputs
        )


@dataclass
class ExportOptions:
    """How to export (`embfilter export`'s options past the format and the paths)."""

    normalize: bool = False
    check: bool = True
    force: bool = False
    # ONNX
    append_to: str | os.PathLike[str] | None = None
    host_output: str | None = None
    filtered_name: str | None = None
    opset: int | None = None
    fp16: bool = False  # also npy and safetensors
    per_token: bool = False
    external_data: bool | None = None
    # a whole sentence-transformers model (else the Dense folder alone)
    whole: bool = False
    model: str | None = None
    revision: str | None = None
    pooling: str = "mean"
    recipe: str = "none"
    max_length: int = 512
    no_cache: bool = False


def export_filter(
    artifact: FilterArtifact,
    kind: str,
    target: str | os.PathLike[str],
    options: ExportOptions,
    hooks: Hooks | None = None,
) -> ExportResult:
    """Write `artifact` as `kind` ("onnx", "sentence-transformers", "npy" or "safetensors") to `target`, checked
    unless `options.check` is off."""
    o = options
    if kind == "onnx":
        from embfilter_cli.export import onnx_export
        from embfilter_cli.export.onnx_graph import DEFAULT_OPSET

        if o.append_to is not None:
            return onnx_export.export_appended(
                artifact,
                o.append_to,
                target,
                output=o.host_output,
                filtered_name=o.filtered_name,
                normalize=o.normalize,
                check=o.check,
                force=o.force,
                external_data=o.external_data,
                log=hooks_or_default(hooks).info,
            )
        return onnx_export.export_standalone(
            artifact,
            target,
            normalize=o.normalize,
            opset=o.opset or DEFAULT_OPSET,
            fp16=o.fp16,
            per_token=o.per_token,
            check=o.check,
            force=o.force,
            external_data=o.external_data,
        )
    from embfilter_cli.export import formats

    if o.whole:
        return export_whole_model(
            artifact,
            target,
            model=o.model,
            revision=o.revision,
            pooling=o.pooling,
            recipe=o.recipe,
            max_length=o.max_length,
            normalize=o.normalize,
            no_cache=o.no_cache,
            check=o.check,
            force=o.force,
            hooks=hooks,
        )
    if kind == "sentence-transformers":
        return formats.export_sentence_transformers(artifact, target, check=o.check, force=o.force)
    if kind == "npy":
        return formats.export_npy(artifact, target, fp16=o.fp16, check=o.check, force=o.force)
    if kind == "safetensors":
        return formats.export_safetensors(artifact, target, fp16=o.fp16, check=o.check, force=o.force)
    raise ValueError(f"unknown export kind {kind!r}")  # a bug in the caller: the CLI offers a fixed list


__all__ = ["ExportOptions", "export_filter", "export_whole_model", "filter_model", "prompt_for"]
