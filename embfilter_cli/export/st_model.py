"""A whole sentence-transformers model: the LLM, its tokenizer, pooling, the filter and Normalize.

Pure core (no click, no printing). `export_st_model` assembles the model with
sentence-transformers' own modules and saves it with the library's own `save`, so the folder
matches the installed release:

    modules.json, config_sentence_transformers.json     (prompts, cosine similarity)
    config.json, model.safetensors, tokenizer files      (module 0: Transformer, at the root)
    sentence_bert_config.json                            (max_seq_length, modality_config)
    1_Pooling/   mean or lasttoken (attention-masked, prompt tokens included, like `embed`)
    2_Dense/     the filter: weight P (k×d), identity activation; bias −m when the filter centres
    3_Normalize/ only with normalize
    embfilter.json                                       which filter, model, pooling, prompt

Three settings make the folder give `embfilter embed`'s vectors (the check below compares them):
- the Transformer's `modality_config` is pinned to plain text. sentence-transformers 6 otherwise
  renders every input through the tokenizer's chat template when it has one (SmolLM2's does), which
  puts a system prompt in front of each text and changes the vectors;
- the tokenizer pads on the right. With right padding the real tokens keep positions 0…n−1, so a
  padded batch equals an unpadded forward pass, which is what `embed` computes (it passes explicit
  position ids instead);
- a recipe becomes the model's default prompt only when it is a prefix (one `{text}`, at the end):
  sentence-transformers prepends prompts and cannot append text after the input.

The check encodes a few texts of different lengths with the saved folder (loaded afresh by
`SentenceTransformer(folder)`) and compares them with `reference(texts)`, the caller's `embed` +
filter (+ normalize): every row must have cosine ≥ 0.99999 and relative error ≤ 1e-4.

Not handled: recipes with text after `{text}` (PromptEOL, summarize, echo: use `embfilter embed` or
the ONNX path), truncation that keeps a template's tail (sentence-transformers cuts the sequence at
`max_seq_length` tokens, which for a prefix prompt cuts the text like `embed` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embfilter_cli import __version__
from embfilter_cli.errors import ExportError, InputDataError, MissingDependencyError, ModelNotFoundError
from embfilter_cli.export.report import CheckReport, ExportResult, max_relative_error
from embfilter_cli.filters.artifact import FilterArtifact

ST_INSTALL = "pip install 'embfilter[st]'"
TEXT_SLOT = "{text}"
PROMPT_NAME = "recipe"
POOLING_MODES = {"mean": "mean", "last": "lasttoken"}
MIN_COSINE = 0.99999
REL_BOUND = 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
CHECK_TEXTS = (
    "The cat sat on the mat.",
    "Stock markets fell sharply on Monday, and analysts expect the slide to continue through the week.",
    "Rain.",
    "Über naïve café owners, 3.5% richer.",
)
# Only text: never the chat-template ("message") rendering that sentence-transformers 6 infers
# for tokenizers with a chat template.
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}

MARKER = "embfilter.json"  # what makes a folder ours: --force replaces only folders that have it
FORMAT_TAG = "embfilter.sentence-transformers/1"
ReferenceFn = Callable[[list[str]], np.ndarray]


@dataclass
class StModelSpec:
    """What to assemble: where the transformer is and how `embed` would use it."""

    model: str  # a Hugging Face folder or Hub id
    pooling: str  # "mean" or "last" (embed's names)
    prompt: str = ""  # a prefix prompt, "" for none
    normalize: bool = False
    max_length: int = 512
    revision: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # model/recipe facts for embfilter.json


def prefix_prompt(template: str, recipe_name: str) -> str:
    """The sentence-transformers prompt for a recipe template: the text before a final `{text}`.

    Raises InputDataError for templates with text after `{text}` or with more than one slot.
    """
    if template.count(TEXT_SLOT) == 1 and template.endswith(TEXT_SLOT):
        return template[: -len(TEXT_SLOT)]
    raise InputDataError(
        f"the {recipe_name} recipe ({template!r}) puts text after {{text}}; a sentence-transformers prompt can only "
        "come before the text. Embed with `embfilter embed --recipe ...` instead, or use a prefix template such as "
        "'Query: {text}' (or export the filter alone with --onnx and run it after your own prompt + model)"
    )


def require_tokenizer(folder: Path) -> None:
    """Refuse a local model folder that has no tokenizer files (sentence-transformers needs one)."""
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)} are all missing); copy the tokenizer files of "
            "the model it came from into it (tokenizer.save_pretrained(folder))"
        )


def _st_modules() -> tuple[Any, Any, Any, Any, Any]:
    """(SentenceTransformer, Transformer, Pooling, Dense, Normalize), or a MissingDependencyError."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError(
            f"a sentence-transformers model needs the sentence-transformers package; run `{ST_INSTALL}` "
            "(or pass --dense-only for the Dense module folder, which needs nothing extra)"
        ) from exc
    import sentence_transformers

    major = int(sentence_transformers.__version__.split(".")[0])
    if major < 6:  # the text-only modality_config that keeps chat templates out arrived in 6.0
        raise MissingDependencyError(
            f"a whole sentence-transformers model needs sentence-transformers 6 or newer (installed: "
            f"{sentence_transformers.__version__}); run `pip install -U 'sentence-transformers>=6'`, or pass "
            "--dense-only"
        )
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    return SentenceTransformer, Transformer, Pooling, Dense, Normalize


def _check_out(out: Path, force: bool, inputs: Sequence[str | os.PathLike[str]]) -> None:
    from embfilter_cli.files import check_folder_output

    check_folder_output(
        out, force, what="a sentence-transformers model", marker=f"{MARKER} of ours", ours=is_export, inputs=inputs
    )


def is_export(folder: Path) -> bool:
    """Whether `folder` is a model an earlier `export_st_model` wrote (its `embfilter.json` says so)."""
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith(FORMAT_TAG.split("/")[0] + "/")


def _assemble(artifact: FilterArtifact, spec: StModelSpec) -> Any:
    import torch

    sentence_transformer, transformer_cls, pooling_cls, dense_cls, normalize_cls = _st_modules()
    hub = {"revision": spec.revision} if spec.revision else {}
    transformer = transformer_cls(
        spec.model,
        max_seq_length=spec.max_length,
        model_kwargs={"dtype": torch.float32, **hub},
        processor_kwargs=dict(hub),
        config_kwargs=dict(hub),
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    tokenizer = transformer.tokenizer
    tokenizer.padding_side = "right"  # see the module docstring
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformer.auto_model.config
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    if hidden != artifact.hidden_size:
        raise ExportError(
            f"{spec.model} has hidden size {hidden} but the filter expects {artifact.hidden_size}; "
            "export with the model the filter was fitted on"
        )
    mean = getattr(artifact, "mean", None)  # a centring filter: y = P·x − m
    weight = torch.from_numpy(np.ascontiguousarray(artifact.projection, dtype=np.float32))
    dense = dense_cls(
        in_features=artifact.hidden_size,
        out_features=artifact.output_dim,
        bias=mean is not None,
        activation_function=torch.nn.Identity(),
        init_weight=weight,
        init_bias=None if mean is None else -torch.from_numpy(np.asarray(mean, dtype=np.float32)),
    )
    modules = [transformer, pooling_cls(hidden, pooling_mode=POOLING_MODES[spec.pooling]), dense]
    if spec.normalize:
        modules.append(normalize_cls())
    prompts = {PROMPT_NAME: spec.prompt} if spec.prompt else None
    return sentence_transformer(
        modules=modules,
        device="cpu",
        prompts=prompts,
        default_prompt_name=PROMPT_NAME if prompts else None,
        similarity_fn_name="cosine",
    )


def _check(folder: Path, reference: ReferenceFn, texts: list[str]) -> CheckReport:
    sentence_transformer = _st_modules()[0]
    model = sentence_transformer(str(folder), device="cpu")
    got = np.asarray(model.encode(texts, batch_size=len(texts), convert_to_numpy=True), dtype=np.float64)
    ref = np.asarray(reference(texts), dtype=np.float64)
    if got.shape != ref.shape:
        raise ExportError(f"the saved model gives shape {got.shape} where embed gives {ref.shape}; nothing was written")
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    err = max_relative_error(got, ref)
    if not (cos.min() >= MIN_COSINE and err <= REL_BOUND):
        raise ExportError(
            f"the saved model's vectors differ from `embfilter embed`'s (min cosine {cos.min():.6f}, max relative "
            f"error {err:.3g}); nothing was written"
        )
    return CheckReport(
        max_rel_error=err,
        bound=REL_BOUND,
        vectors=len(texts),
        detail={"compared": "SentenceTransformer(folder).encode vs embfilter embed", "min_cosine": float(cos.min())},
    )


def export_st_model(
    artifact: FilterArtifact,
    spec: StModelSpec,
    out: str | os.PathLike[str],
    *,
    reference: ReferenceFn | None = None,
    check: bool = True,
    force: bool = False,
    check_texts: list[str] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> ExportResult:
    """Write a whole sentence-transformers model whose `encode` equals `embed` + the filter.

    Args:
        artifact: the filter (already checked against the model by the caller).
        spec: the transformer and how to pool, prompt and normalise.
        out: the folder to write (replaced as a whole with `force`).
        reference: texts → the vectors `embfilter embed` gives (filtered, normalised if asked);
            required when `check` is on.
        check: load the saved folder with sentence-transformers and compare with `reference`.
        check_texts: the texts to compare on (default: four of different lengths).
        inputs: what the export reads (the filter, a local model folder): `out` is never replaced
            when it holds one, nor when it is not an earlier export (see `files.check_folder_output`).
    """
    if spec.pooling not in POOLING_MODES:
        raise InputDataError(f"pooling {spec.pooling!r} is not one of {', '.join(POOLING_MODES)}")
    out = Path(out)
    _check_out(out, force, [*inputs, *([artifact.path] if artifact.path else [])])
    from embfilter_cli.model.quiet import quiet_transformers

    with quiet_transformers():
        model = _assemble(artifact, spec)
    report = None
    from embfilter_cli.files import temp_dir_beside

    with temp_dir_beside(out) as tmp:  # removed (with the folders made for it) if anything below fails
        with quiet_transformers():
            model.save(str(tmp))
        (tmp / MARKER).write_text(json.dumps(_provenance(artifact, spec), indent=2) + "\n", encoding="utf-8")
        _normal_modes(tmp)
        if check:
            if reference is None:
                raise ValueError("check=True needs a reference function")
            with quiet_transformers():
                report = _check(tmp, reference, list(check_texts or CHECK_TEXTS))
        _publish(tmp, out)
    return ExportResult(
        path=out,
        kind="sentence-transformers-model",
        input_dim=artifact.hidden_size,
        output_dim=artifact.output_dim,
        dtype="float32",
        normalize=spec.normalize,
        check=report,
        extra={
            "model": spec.model,
            "pooling": spec.pooling,
            "prompt": spec.prompt or None,
            "modules": [type(m).__name__ for m in model],
        },
    )


def _provenance(artifact: FilterArtifact, spec: StModelSpec) -> dict[str, Any]:
    keys = ("model_source", "model_revision", "unembedding_sha256", "band", "projection_sha256")
    return {
        "format": FORMAT_TAG,
        "exported_by": f"embfilter {__version__}",
        "filter": {k: artifact.metadata[k] for k in keys if k in artifact.metadata},
        "pooling": spec.pooling,
        "prompt": spec.prompt,
        "normalize": spec.normalize,
        "max_seq_length": spec.max_length,
        **spec.provenance,
    }


def _normal_modes(folder: Path) -> None:
    """mkdtemp and safetensors create 0700/0600 entries; a served model needs the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing one (--force) is moved aside first."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


__all__ = ["CHECK_TEXTS", "StModelSpec", "export_st_model", "prefix_prompt", "require_tokenizer"]
