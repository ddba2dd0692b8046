"""Where a model's files are: the value every model reader takes (no I/O beyond config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embfilter_cli.errors import ModelNotFoundError

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
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ModelNotFoundError(f"{cfg} is not valid JSON ({exc}); fix or remove it") from exc


def read_weight_map(index_file: Path, name: str | None = None, fix: str = "re-download the model") -> dict[str, str]:
    """Tensor name → shard file, from a sharded checkpoint's index JSON (`*.index.json`).

    Args:
        index_file: the index on disk.
        name: how to call the index in messages (default: its path).
        fix: the next step, appended to every message.
    """
    label = name or str(index_file)
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{label} is not valid JSON ({exc}); {fix}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelNotFoundError(f"{label} has no weight_map; {fix}")
    return {str(k): str(v) for k, v in weight_map.items()}
