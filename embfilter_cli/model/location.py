"""Where a model's files are: the value every model reader takes (no I/O beyond config.json)."""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embfilter_cli.errors import ModelNotFoundError
from embfilter_cli.jsonable import loads as json_loads

SourceKind = Literal["hf_folder", "safetensors_file", "bin_file", "gguf_file"]


@dataclass
class ModelLocation:
    """Where a model's files are, and how to name it in artifact metadata."""

    spec: str  # what the user typed ("" for the default)
    kind: SourceKind
    path: Path  # the folder (hf_folder) or the single file
    source: str  # canonical name: Hub id, or absolute path
    revision: str  # Hub commit hash, or "local"
    files: dict[str, Path] = field(default_factory=dict)  # role -> local file (e.g. the head shard)

    @property
    def config(self) -> dict[str, Any]:
        """config.json of a folder, or {} when there is none."""
        if self.kind != "hf_folder":
            return {}
        cfg = self.path / "config.json"
        if not cfg.exists() and not cfg.is_symlink():
            return {}
        return check_config(read_json_object(cfg, "fix or remove it"), str(cfg))


# Nested configs of multimodal and encoder-decoder checkpoints; each must be an object when present.
NESTED_CONFIGS = ("text_config", "language_config", "llm_config", "decoder", "encoder")


def check_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the parts of a config.json embfilter reads have the right JSON types."""
    for key in NESTED_CONFIGS:
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            raise ModelNotFoundError(
                f"{where}: {key} is a {type(config[key]).__name__}, not an object; fix or remove config.json"
            )
    for key in ("tie_word_embeddings",):
        for cfg in (config, config.get("text_config") or {}):
            if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
                raise ModelNotFoundError(f"{where}: {key} must be true or false; fix or remove config.json")
    return config


def regular_file(path: Path) -> Path:
    """`path` if it is (a link to) a regular file; a directory, FIFO, device or dangling link is refused.

    A FIFO would block the read forever and a device could be endless, so this is checked before
    any file named by a user or a model folder is opened.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} does not exist (or is a dangling link); check the path") from None
    except OSError as exc:
        raise ModelNotFoundError(f"{path} could not be read ({exc.strerror or exc}); check the path") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ModelNotFoundError(f"{path} is {what}; a model file was expected there")
    return path


def plain_folder(folder: Path) -> Path:
    """`folder` if each entry is a regular file or a folder (links followed); a FIFO, device or socket is refused.

    transformers opens a model folder's files itself: a FIFO named config.json or tokenizer.json is
    skipped as if missing (an error about something else) or, opened, blocks forever. So a folder
    is checked before it is handed over. Dangling links pass: the reader reports the missing file.
    """
    for entry in sorted(folder.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelNotFoundError(f"{entry} is not a regular file; a model file was expected there")
    return folder


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from a model's metadata file, or one ModelNotFoundError naming `path` and `fix`."""
    regular_file(path)
    try:
        data = json_loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = f" ({exc})" if not isinstance(exc, RecursionError) else " (nested too deeply)"
        raise ModelNotFoundError(f"{path} is not valid JSON{detail}; {fix}") from None
    except OSError as exc:
        raise ModelNotFoundError(f"{path} could not be read ({exc.strerror or exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a file name read from a model's metadata, confined to `folder`.

    The name must be a relative path that stays inside the folder without following anything:
    no absolute path, drive, `..` component, backslash or NUL. Files the folder itself holds are
    read as they are (the Hugging Face cache links its snapshot files to blobs elsewhere).
    """
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"{what} names {name!r}, which is not a file name; re-download the model")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in parts):
        raise ModelNotFoundError(
            f"{what} names {name!r}, a path outside the model folder {folder}; embfilter only reads files "
            "inside the folder, fix the index or re-download the model"
        )
    return folder / name


def read_weight_map(index_file: Path, name: str | None = None, fix: str = "re-download the model") -> dict[str, str]:
    """Tensor name → shard file, from a sharded checkpoint's index JSON (`*.index.json`).

    Every shard name must stay inside the index's folder (see `inside`): a local index naming
    `../../x` or an absolute path is refused, as the Hub reader already did for downloads.

    Args:
        index_file: the index on disk.
        name: how to call the index in messages (default: its path).
        fix: the next step, appended to every message.
    """
    label = name or str(index_file)
    data = read_json_object(index_file, fix)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelNotFoundError(f"{label} has no weight_map object; {fix}")
    for value in weight_map.values():
        inside(index_file.parent, value, label)
    return {str(k): str(v) for k, v in weight_map.items()}
