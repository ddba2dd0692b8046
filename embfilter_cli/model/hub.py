"""Fetch from the Hugging Face Hub only what reading W_U needs: never the whole checkpoint.

For a Hub id this downloads, through `huggingface_hub.hf_hub_download` into the standard cache
(one snapshot folder per commit), in this order:
  1. `config.json` (this also resolves the revision to a commit; every later file is fetched at
     that commit, so a branch that moves mid-run cannot mix two versions);
  2. the tokenizer files that exist (they give the tokenizer's vocabulary, used to drop padding rows);
  3. the checkpoint index (`model.safetensors.index.json`, else `pytorch_model.bin.index.json`)
     and then ONLY the shard its `weight_map` names for the unembedding tensor — or, for an
     unsharded repo, its single `model.safetensors` (else `pytorch_model.bin`).

`HF_HOME`/`HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE` and the token (`HF_TOKEN` or a stored
login) are left to `huggingface_hub`: nothing here passes a cache folder, endpoint or token.
Files already known for a commit (present, or recorded as absent by an earlier run) are taken
from the cache without a request, which is also what makes `HF_HUB_OFFLINE=1` work.

Not handled: GGUF-only repos (download the `.gguf` and pass its path), repos whose weights live in
a subfolder, tensors split across shards, Xet-specific behaviour beyond what `huggingface_hub` does.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embfilter_cli.errors import HubAccessError, ModelNotFoundError
from embfilter_cli.jsonable import loads as json_loads
from embfilter_cli.model.location import ModelLocation, read_weight_map

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NO_INDEX_HINT = (
    "embfilter reads Transformers-format checkpoints (safetensors or pytorch_model.bin); for a GGUF-only repo "
    "download the .gguf file and pass its path to --model"
)


class _SilentBar:
    """A do-nothing progress bar with the interface `hf_hub_download`'s `tqdm_class` needs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass


def config_hidden_size(config: dict[str, Any]) -> int | None:
    """The hidden size a config.json declares (decoder-only and multimodal layouts), or None."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def fetch_head_files(
    repo_id: str,
    *,
    spec: str = "",
    revision: str | None = None,
    tensor_name: str | None = None,
    check_config: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> ModelLocation:
    """Download config, tokenizer files, index and the one shard holding W_U; return their snapshot.

    Args:
        repo_id: Hub id, `org/name`.
        spec: what the user typed (an alias or the id), kept for naming outputs.
        revision: branch, tag or commit; None means the repo's default branch.
        tensor_name: the unembedding tensor to use instead of guessing (`--tensor`).
        check_config: called with the parsed config.json before any weights are downloaded, so a
            command can reject impossible arguments (e.g. a band wider than `hidden_size`) cheaply.
        progress: show huggingface_hub's download bars; None means "when stderr is a terminal".

    Returns:
        An `hf_folder` location: the snapshot folder in the HF cache, `source` = repo_id,
        `revision` = the commit hash, and `files["head_shard"]` = the weights file holding W_U.

    Raises:
        ModelNotFoundError: unknown repo, revision or file, or (offline) not in the cache.
        HubAccessError: gated/unauthorised, network unreachable, or the Hub failed.
        UnembeddingNotFoundError: the index names no tensor usable as W_U.
    """
    fetcher = _Fetcher(repo_id, revision, progress if progress is not None else sys.stderr.isatty())
    config_path = fetcher.required(
        "config.json",
        fetcher.requested_revision,
        missing=lambda: ModelNotFoundError(
            f"Hub repo {repo_id} has no config.json at revision {fetcher.requested_revision}; {_NO_INDEX_HINT}"
        ),
    )
    snapshot = config_path.parent
    commit = snapshot.name
    if not _COMMIT.match(commit):  # the cache layout is snapshots/<commit>/<file>; anything else is not it
        raise HubAccessError(
            f"unexpected Hugging Face cache layout at {config_path} (expected .../snapshots/<commit>/config.json); "
            "upgrade huggingface_hub, or pass a local model folder to --model"
        )
    config = _read_json(config_path, repo_id)
    if check_config is not None:
        check_config(config)
    for name in TOKENIZER_FILES:
        fetcher.optional(name, commit)

    index_path = next((p for p in (fetcher.optional(name, commit) for name in INDEX_FILES) if p is not None), None)
    if index_path is not None:
        weight_map = read_weight_map(
            index_path,
            f"{index_path.name} of {repo_id}",
            fix=f"delete {index_path} from the cache and run again; if that does not help, the repo's index is broken: "
            "report it or try another --revision",
        )
        from embfilter_cli.model.unembedding import choose_unembedding  # imports torch: only once it is needed

        tensor, _ = choose_unembedding(list(weight_map), config, tensor_name, f"{repo_id} ({index_path.name})")
        shard_name = weight_map[tensor]
        if shard_name.startswith("/") or ".." in shard_name.split("/"):
            raise ModelNotFoundError(
                f"{index_path.name} of {repo_id} maps {tensor} to {shard_name!r}, which is not a file inside the repo; "
                "the index is broken: report it to the repo's owner or try another --revision"
            )
        head_shard = fetcher.required(
            shard_name,
            commit,
            missing=lambda: ModelNotFoundError(
                f"{index_path.name} of {repo_id} at {commit[:12]} maps {tensor} to {shard_name}, but the repo has no such "
                "file; the upload is incomplete: try another --revision or report it to the repo's owner"
            ),
        )
    else:
        head_shard = None
        for filename in SINGLE_WEIGHT_FILES:
            head_shard = fetcher.optional(filename, commit)
            if head_shard is not None:
                break
        if head_shard is None:
            if fetcher.offline:
                raise fetcher.not_cached("the weights (index or model.safetensors)")
            raise ModelNotFoundError(
                f"Hub repo {repo_id} at {commit[:12]} has none of {', '.join(INDEX_FILES + SINGLE_WEIGHT_FILES)}; "
                f"{_NO_INDEX_HINT}"
            )
    assert head_shard is not None  # both branches above either found the shard or raised
    return ModelLocation(spec or repo_id, "hf_folder", snapshot, repo_id, commit, files={"head_shard": head_shard})


def _read_json(path: Path, repo_id: str) -> dict[str, Any]:
    try:
        data = json_loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(
            f"{path.name} of {repo_id} is not valid JSON ({exc}); delete {path} from the cache and run again"
        ) from exc
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path.name} of {repo_id} is not a JSON object; delete {path} and run again")
    return data


class _Fetcher:
    """hf_hub_download for one repo, with the Hub's failures turned into one-line errors."""

    def __init__(self, repo_id: str, revision: str | None, progress: bool) -> None:
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.requested_revision = revision or constants.DEFAULT_REVISION
        self.progress = progress
        self.offline = bool(constants.is_offline_mode())
        self.cache_dir = constants.HF_HUB_CACHE
        self.endpoint = constants.ENDPOINT

    def optional(self, filename: str, commit: str) -> Path | None:
        """A file that may legitimately be absent: its cached path, a fresh download, or None."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import _CACHED_NO_EXIST

        # A commit is immutable, so what an earlier run saw (present or absent) still holds: no request.
        cached = try_to_load_from_cache(self.repo_id, filename, revision=commit)
        if cached is _CACHED_NO_EXIST:
            return None
        if isinstance(cached, str):
            return Path(cached)
        if self.offline:
            return None  # unknown and we may not ask; required files report the cache miss
        return self.download(filename, commit, missing=None)

    def required(self, filename: str, revision: str, missing: Callable[[], Exception]) -> Path:
        """A file the model cannot do without; `missing` builds the error raised when the repo lacks it."""
        path = self.download(filename, revision, missing)
        assert path is not None  # download() returns None only when missing is None
        return path

    def download(self, filename: str, revision: str, missing: Callable[[], Exception] | None) -> Path | None:
        """Download (or take from the cache) one file; on a 404, raise `missing()`, or return None without it."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        kwargs: dict[str, Any] = {} if self.progress else {"tqdm_class": _SilentBar}
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=revision, **kwargs))
        except HFValidationError as exc:
            raise ModelNotFoundError(
                f"{self.repo_id!r} is not a valid Hub id ({exc}); check the spelling, or run `embfilter models`"
            ) from None
        except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
            raise HubAccessError(
                f"{self.repo_id} is gated (HTTP {_status(exc)}): accept its licence at "
                f"{self.endpoint}/{self.repo_id} while logged in, then set HF_TOKEN to a read token of that account"
            ) from None
        except RepositoryNotFoundError as exc:
            raise ModelNotFoundError(
                f"Hub repo {self.repo_id} was not found (HTTP {_status(exc)}); check the id (aliases: "
                f"`embfilter models`)" + ("" if _has_token() else ", or set HF_TOKEN if the repo is private")
            ) from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(
                f"revision {revision!r} does not exist in {self.repo_id}; pass an existing branch, tag or commit "
                "hash to --revision"
            ) from None
        except RemoteEntryNotFoundError:
            if missing is None:
                return None
            raise missing() from None
        except LocalEntryNotFoundError as exc:
            if self.offline:
                raise self.not_cached(filename) from None
            raise HubAccessError(
                f"cannot reach the Hugging Face Hub at {self.endpoint} to fetch {filename} of {self.repo_id}, and it "
                f"is not in the cache ({_cause(exc)}); check the connection (and HF_ENDPOINT/proxy settings), or use "
                "HF_HUB_OFFLINE=1 with a cached model, or pass a local path to --model"
            ) from None
        except HfHubHTTPError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise HubAccessError(
                    f"the Hub refused {filename} of {self.repo_id} (HTTP {status}); set HF_TOKEN to a token with read "
                    f"access, and accept the model's licence at {self.endpoint}/{self.repo_id} if it is gated"
                ) from None
            raise HubAccessError(
                f"the Hub answered HTTP {status} for {filename} of {self.repo_id}; try again later, or pass a local "
                "path to --model"
            ) from None
        except OSError as exc:  # disk full, cache not writable, truncated transfer
            raise HubAccessError(
                f"downloading {filename} of {self.repo_id} into {self.cache_dir} failed ({exc}); check free disk "
                "space and that the cache is writable (or set HF_HOME), then run again"
            ) from None
        except Exception as exc:
            if _is_transport_error(exc):  # e.g. a proxy failure, which huggingface_hub re-raises as is
                raise HubAccessError(
                    f"cannot reach the Hugging Face Hub at {self.endpoint} ({type(exc).__name__}: {exc}); check the "
                    "connection and proxy settings, or use HF_HUB_OFFLINE=1 with a cached model, or a local path"
                ) from None
            raise

    def not_cached(self, what: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"{self.repo_id} (revision {self.requested_revision}) is not in the Hugging Face cache at {self.cache_dir} "
            f"({what} missing) and HF_HUB_OFFLINE=1 forbids downloading; run once online, or pass a local path to "
            "--model"
        )


def _status(exc: Any) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _cause(exc: BaseException) -> str:
    """The root cause's type and first line, e.g. 'ConnectError: [Errno 111] Connection refused'."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0]}" if text else type(root).__name__


def _is_transport_error(exc: BaseException) -> bool:
    for module_name in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(module_name)
        base = getattr(module, "TransportError", None) or getattr(module, "RequestException", None)
        if isinstance(base, type) and isinstance(exc, base):
            return True
    return False
