"""`embfilter cache`: listing, pruning, the size limit, locks that keep entries in use, killed builders' leftovers.

Entries are synthetic (a GGUF conversion folder with its manifest, eval entries written through
`text.cache.Cache`, a self-texts file with its header), so every test runs in well under a second
except the ones that start a process to hold a lock or to be killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli import cache_lock, cache_store
from embfilter_cli.cache_store import list_entries, parse_age, parse_size, prune
from embfilter_cli.cli import app
from embfilter_cli.errors import CacheError
from embfilter_cli.text.cache import Cache

ROOT = Path(__file__).resolve().parents[1]
MB = 10**6


def make_conversion(cache: Path, name: str, size: int, transformers: str | None = None) -> Path:
    """A GGUF conversion folder as `model.gguf_convert` leaves it: files, manifest, stat memo."""
    folder = cache / "gguf" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    version = transformers or cache_store.installed_transformers()
    manifest = {"gguf_name": f"{name}.gguf", "transformers": version, "files": {}}
    (folder / cache_store.GGUF_MANIFEST).write_text(json.dumps(manifest))
    (cache / "gguf" / f"{name}.verified.json").write_text("{}")
    return folder


def make_self_texts(cache: Path, name: str, size: int) -> Path:
    path = cache / "self-texts" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": "self-texts", "source": "smollm2-135m", "created": "2026-12-01T10:00:00+00:00"}
    path.write_text(json.dumps({**header, "texts": ["x" * size]}))
    return path


def used_at(cache: Path, entry: Path, seconds_ago: float) -> None:
    """Record a use of `entry` `seconds_ago` seconds ago."""
    cache_lock.mark_used(cache, entry)
    stamp = time.time() - seconds_ago
    os.utime(cache_lock.marker_path(cache, entry), (stamp, stamp))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EMBFILTER_CACHE", str(root))
    monkeypatch.delenv(cache_store.MAX_SIZE_ENV, raising=False)
    return root


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


HOLDER = (
    "import sys, time\nfrom pathlib import Path\nfrom embfilter_cli import cache_lock\n"
    "cache_lock.hold_shared(Path(sys.argv[1]), Path(sys.argv[2]))\nprint('held', flush=True)\ntime.sleep(120)\n"
)


@pytest.fixture
def held_by_other_process() -> Iterator:
    """`hold(cache, entry)`: another live process holds `entry` shared (as a run that loaded it)."""
    procs: list[subprocess.Popen[str]] = []

    def hold(cache: Path, entry: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(cache), str(entry)], stdout=subprocess.PIPE, text=True, env=_child_env()
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- sizes and ages


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("500MB", 500 * 10**6), ("1.5G", 1_500_000_000), ("512MiB", 512 * 2**20), ("0", 0)],
)
def test_sizes_read_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


def test_ages_read_seconds_to_weeks():
    assert [parse_age(t) for t in ("90s", "45m", "12h", "30d", "2w")] == [90, 2700, 43200, 2592000, 1209600]


@pytest.mark.parametrize("text", ["", "20XB", "-1GB", "GB", "2iB", "1e9"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(CacheError, match=f"--max-size {text!r} is not a size"):
        parse_size(text)


# --------------------------------------------------------------------------- listing


def test_ls_lists_every_kind_with_source_size_dates_and_a_total(runner, cache):
    conversion = make_conversion(cache, "a" * 32, 3 * MB)
    store = Cache(cache)
    with store.describing("smollm2-135m"):
        store.save_embeddings("k1", np.ones((4, 8), dtype=np.float32))
    store.save_json("heads", "k2", {"x": 1})
    texts = make_self_texts(cache, "s1", 1000)
    used_at(cache, conversion, 3600)

    result = runner.invoke(app, ["cache", "--json"])
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    kinds = [e["kind"] for e in listed["entries"]]
    assert kinds == ["gguf", "embeddings", "heads", "self-texts"]  # registry order
    by_kind = {e["kind"]: e for e in listed["entries"]}
    assert by_kind["gguf"]["source"] == f"{'a' * 32}.gguf" and by_kind["gguf"]["last_used"] is not None
    assert by_kind["gguf"]["bytes"] >= 3 * MB  # files, manifest and the stat memo beside the folder
    assert by_kind["embeddings"]["source"] == "smollm2-135m" and by_kind["embeddings"]["last_used"] is None
    assert by_kind["self-texts"]["source"] == "smollm2-135m"
    assert by_kind["self-texts"]["created"] == "2026-12-01T10:00:00Z"  # from its header, not the file's mtime
    assert by_kind["self-texts"]["bytes"] == texts.stat().st_size
    assert listed["total_bytes"] == sum(e["bytes"] for e in listed["entries"])
    assert listed["max_size_bytes"] == cache_store.DEFAULT_MAX_SIZE and result.stderr == ""

    table = runner.invoke(app, ["cache", "ls"])
    assert table.exit_code == 0 and table.stderr == ""
    assert table.stdout.splitlines()[-1].startswith("Total: 4 entries, 3.0 MB in ")
    assert "self-texts" in table.stdout and "smollm2-135m" in table.stdout


def test_a_cache_hit_records_its_last_use(cache):
    store = Cache(cache)
    store.save_embeddings("k", np.ones((2, 3), dtype=np.float32))
    (entry,) = list_entries(cache)
    assert entry.last_used is None
    assert store.load_embeddings("k") is not None
    (entry,) = list_entries(cache)
    assert entry.last_used is not None and abs(entry.last_used - time.time()) < 60


def test_an_empty_or_missing_cache_lists_nothing(runner, cache):
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 0 and result.stdout.startswith("Total: 0 entries, 0 B in ")
    assert not cache.exists()  # listing creates nothing


# --------------------------------------------------------------------------- prune


def test_prune_older_than_removes_only_old_entries_and_dry_run_removes_nothing(runner, cache):
    old, new = make_conversion(cache, "o" * 32, MB), make_conversion(cache, "n" * 32, MB)
    used_at(cache, old, 40 * 86400)
    used_at(cache, new, 3600)
    dry = runner.invoke(app, ["cache", "prune", "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0 and "would remove" in dry.stdout and old.exists()
    assert not (cache / cache_lock.LOCKS).exists()  # a dry run creates nothing, not even a lock file
    result = runner.invoke(app, ["cache", "prune", "--older-than", "30d", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [e["path"] for e in report["removed"]] == [str(old)]
    assert not old.exists() and new.exists()
    assert not (cache / "gguf" / f"{old.name}.verified.json").exists()  # its memo went with it
    assert not cache_lock.marker_path(cache, old).exists() and not cache_lock.lock_path(cache, old).exists()
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [new.name, f"{new.name}.verified.json"]


def test_prune_max_size_removes_old_transformers_first_then_least_recently_used(cache):
    outdated = make_conversion(cache, "t" * 32, 2 * MB, transformers="0.0.1")
    lru = make_conversion(cache, "l" * 32, 2 * MB)
    recent = make_conversion(cache, "r" * 32, 2 * MB)
    used_at(cache, outdated, 10)  # used recently, but made by another transformers: never hit again
    used_at(cache, lru, 7200)
    used_at(cache, recent, 60)
    done = prune(cache, max_bytes=int(2.5 * MB))
    assert [e.path for e in done.removed] == [outdated, lru] and recent.exists()
    assert done.remaining == sum(e.bytes for e in list_entries(cache))


def test_prune_all_keeps_an_entry_another_process_holds(runner, cache, held_by_other_process):
    busy, free = make_conversion(cache, "b" * 32, MB), make_conversion(cache, "f" * 32, MB)
    held_by_other_process(cache, busy)
    listed = json.loads(runner.invoke(app, ["cache", "--json"]).stdout)
    assert [e["in_use"] for e in listed["entries"]] == [True, False]
    dry = json.loads(runner.invoke(app, ["cache", "prune", "--all", "--dry-run", "--json"]).stdout)
    assert [e["path"] for e in dry["in_use"]] == [str(busy)] and [e["path"] for e in dry["removed"]] == [str(free)]
    assert free.exists()
    result = runner.invoke(app, ["cache", "prune", "--all"])
    assert result.exit_code == 0, result.stderr
    assert busy.exists() and not free.exists()
    assert "kept: in use" in result.stdout and "1 in use kept" in result.stdout


# --------------------------------------------------------------------------- the size limit


def test_the_limit_evicts_least_recently_used_keeps_locked_and_new_and_says_so_once(
    cache, monkeypatch, held_by_other_process
):
    monkeypatch.setenv(cache_store.MAX_SIZE_ENV, "5.5MB")
    locked = make_conversion(cache, "k" * 32, 2 * MB)
    oldest = make_conversion(cache, "o" * 32, 2 * MB)
    middle = make_self_texts(cache, "m" * 32, 1 * MB)
    used_at(cache, locked, 9000)  # the least recently used, but a live process holds it
    used_at(cache, oldest, 8000)
    used_at(cache, middle, 7000)
    held_by_other_process(cache, locked)
    notes: list[str] = []
    store = Cache(cache, notify=notes.append)
    store.save_embeddings("new", np.zeros((1000, 500), dtype=np.float32))  # 2 MB: 7 MB in all, over 5.5 MB
    new = cache / "embeddings" / "new.safetensors"
    assert locked.exists() and new.exists() and middle.exists() and not oldest.exists()
    assert len(notes) == 1
    assert notes[0].startswith(
        f"The cache {cache} passed its 5.5 MB limit; removed 1 least recently used entry (2.0 MB)"
    )
    assert sum(e.bytes for e in list_entries(cache)) <= 5.5 * MB

    notes.clear()
    store.save_embeddings("small", np.zeros((2, 2), dtype=np.float32))  # within the limit now: no notice
    assert notes == []


def test_the_limit_never_removes_the_entry_just_built_even_when_it_alone_is_too_big(cache, monkeypatch):
    monkeypatch.setenv(cache_store.MAX_SIZE_ENV, "1MB")
    other = make_conversion(cache, "o" * 32, MB)
    notes: list[str] = []
    Cache(cache, notify=notes.append).save_embeddings("big", np.zeros((1000, 1000), dtype=np.float32))
    assert (cache / "embeddings" / "big.safetensors").exists() and not other.exists()
    assert "(still 4.0 MB: the rest is in use or just built)" in notes[0]


def test_no_limit_with_zero(cache, monkeypatch):
    monkeypatch.setenv(cache_store.MAX_SIZE_ENV, "0")
    other = make_conversion(cache, "o" * 32, MB)
    Cache(cache).save_embeddings("big", np.zeros((1000, 1000), dtype=np.float32))
    assert other.exists()


# --------------------------------------------------------------------------- failures: one Error: line


def _one_error(result, message: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"Error: {message}")


@pytest.mark.parametrize("argv", [["cache"], ["cache", "ls", "--json"], ["cache", "prune", "--all"]])
def test_a_cache_path_that_is_a_file_is_one_error_line(runner, cache, argv):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("not a folder")
    _one_error(runner.invoke(app, argv), f"the cache path {cache} is not a folder")
    assert cache.read_text() == "not a folder"


def test_a_cache_path_that_is_a_file_stops_eval_before_any_work(cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("x")
    with pytest.raises(CacheError, match="is not a folder"):
        Cache(cache)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cache", "prune", "--max-size", "lots"], "--max-size 'lots' is not a size"),
        (["cache", "prune", "--older-than", "1y"], "--older-than '1y' is not an age"),
    ],
)
def test_bad_prune_values_are_one_error_line_and_remove_nothing(runner, cache, argv, message):
    entry = make_conversion(cache, "a" * 32, 10)
    _one_error(runner.invoke(app, argv), message)
    assert entry.exists()


def test_a_bad_limit_variable_is_one_error_line(runner, cache, monkeypatch):
    monkeypatch.setenv(cache_store.MAX_SIZE_ENV, "big")
    _one_error(runner.invoke(app, ["cache"]), f"{cache_store.MAX_SIZE_ENV} 'big' is not a size")
    with pytest.raises(CacheError, match="is not a size"):
        Cache(cache)  # eval refuses it before any work


def test_an_entry_that_cannot_be_removed_is_one_error_line(runner, cache, monkeypatch):
    entry = make_conversion(cache, "a" * 32, 10)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_store.os, "rename", refuse)
    _one_error(runner.invoke(app, ["cache", "prune", "--all"]), f"could not remove {entry} from the cache")
    assert entry.exists() and (entry / "model.safetensors").stat().st_size == 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["cache", "prune"], "say what to remove"), (["cache", "prune", "--all", "--max-size", "1GB"], "--all removes")],
)
def test_prune_usage_errors(runner, cache, argv, message):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith(f"Error: {message}")


# --------------------------------------------------------------------------- leftovers of killed builders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_stale_temporaries_need_a_dead_pid_and_a_free_lock(cache, held_by_other_process):
    gguf = cache / "gguf"
    gguf.mkdir(parents=True)
    dead = gguf / f".{'d' * 32}.{_dead_pid()}.abcd1234.tmp"
    alive = gguf / f".{'a' * 32}.{os.getppid()}.abcd1234.tmp"
    locked = gguf / f".{'l' * 32}.{_dead_pid()}.abcd1234.tmp"
    young_old_style = gguf / f".{'y' * 32}.abcd1234.tmp"
    for path in (dead, alive, locked, young_old_style):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 100)
    held_by_other_process(cache, gguf / ("l" * 32))  # a live builder of that entry (say, another version)
    assert cache_lock.stale_temporaries(cache, "gguf") == [dead]
    old_style = gguf / f".{'o' * 32}.abcd1234.tmp"
    old_style.mkdir()
    stamp = time.time() - 2 * cache_lock.OLD_TEMP_AGE
    os.utime(old_style, (stamp, stamp))
    assert sorted(cache_lock.stale_temporaries(cache, "gguf")) == sorted([dead, old_style])
    assert cache_lock.remove_stale_temporaries(cache, "gguf") >= 100
    assert sorted(p.name for p in gguf.iterdir()) == sorted(p.name for p in (alive, locked, young_old_style))


def test_eval_with_a_cache_that_is_a_file_is_one_error_line(runner, tiny_llama, tmp_path, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv("EMBFILTER_CACHE", str(blocker))  # (--cache-dir FILE is refused by click as a usage error)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a cat\ta dog\t1\nthe park\tthe rain\t2\nmarkets fell\tstocks fell\t3\n")
    argv = ["eval", "--model", str(tiny_llama), "--data", str(tsv), "--ratio", "2"]
    _one_error(runner.invoke(app, argv), f"the cache path {blocker} is not a folder")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["cachefile", "pairs.tsv"]


def test_an_unreadable_cache_folder_is_one_error_line(runner, cache, monkeypatch):
    make_conversion(cache, "a" * 32, 10)
    real = Path.iterdir

    def iterdir(self):
        if self == cache / "gguf":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    _one_error(runner.invoke(app, ["cache"]), f"cannot read the cache folder {cache / 'gguf'} (Permission denied)")
