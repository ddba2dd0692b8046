"""`embfilter export --format sentence-transformers` as a whole model: find and check the model,
build the `embed` reference the export is compared with, and call `export.st_model`."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from embfilter_cli.errors import ModelNotFoundError


def prompt_for(recipe: str) -> str:
    """The prefix prompt for `--recipe` ('' for none); refuses templates with text after {text}."""
    from embfilter_cli.export.st_model import prefix_prompt
    from embfilter_cli.text.recipes import resolve_recipe

    rec = resolve_recipe(recipe)
    return "" if rec.name == "none" else prefix_prompt(rec.template, rec.name)


def filter_model(artifact: Any, spec: str | None, revision: str | None) -> Any:
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
    artifact: Any,
    target: Path,
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
    info: Callable[[str], None],
) -> Any:
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
    with _conversion_dir(no_cache) as cache_dir:
        options: dict[str, Any] = {"cache_dir": cache_dir, "notify": info}
        folder, _ = model_target(location, revision, **options)
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
