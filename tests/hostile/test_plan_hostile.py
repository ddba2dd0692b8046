"""Table jobs planned by a hostile user: resume with other options, inputs and outputs that overlap,
colliding names, symlink loops, and shards of every input format (issue 16, kinds 1, 2 and 3).

Judged on behaviour: the exit status, one `Error:` line and no traceback for a refusal, inputs
byte for byte unchanged (`Snapshot`), no temporary file left, and a resumed output byte for byte
equal to a fresh run with the same options (both written here, by the same code, on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from tests.hostile._util import Snapshot, expect_error

D = 16  # make_filter's hidden size


def _x(rows: int, seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)


def _table(rows: int, seed: int, first_id: int = 0) -> pa.Table:
    ids = list(range(first_id, first_id + rows))
    return pa.table(
        {
            "id": ids,
            "embedding": pa.array(list(_x(rows, seed)), pa.list_(pa.float32())),
            "other": pa.array(list(_x(rows, seed + 100)), pa.list_(pa.float32())),
        }
    )


def _dataset(folder: Path, sizes: tuple[int, ...] = (5, 7, 4)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    first = 0
    for i, n in enumerate(sizes):
        path = folder / ("sub" if i == 2 else "") / f"p{i}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(_table(n, i, first), path, row_group_size=2)
        first += n
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ok(result) -> dict:
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}


def _ids(paths: list[Path]) -> list[int]:
    ids: list[int] = []
    for p in paths:
        table = pq.read_table(p) if p.suffix == ".parquet" else _read_ipc(p)
        ids += table.column("id").to_pylist()
    return ids


def _read_ipc(path: Path) -> pa.Table:
    with open(path, "rb") as fp:
        head = fp.read(6)
    source = pa.memory_map(str(path))
    return (pa.ipc.open_file(source) if head == b"ARROW1" else pa.ipc.open_stream(source)).read_all()


# --------------------------------------------------------------------------- 1. the resume record

RESUME_CASES = {
    "column": (["--column", "embedding"], ["--column", "other"]),
    "dtype": ([], ["--dtype", "float64"]),
    "normalize": ([], ["--normalize"]),
    "batch-size": ([], ["--batch-size", "3"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_with_another_option_redoes_and_equals_a_fresh_run(runner, make_filter, tmp_path, case):
    """Outputs of ours made with other options are redone, without --force: the user asked for
    these options now, and replacing our own stale output loses nothing they made."""
    filt = make_filter()
    data = _dataset(tmp_path / "data")
    before, after = RESUME_CASES[case]
    base = ["apply", str(filt), str(data)]
    _ok(runner.invoke(app, [*base, "-o", str(tmp_path / "out"), "-q", *before]))
    inputs = Snapshot(data)
    doc = _ok(runner.invoke(app, [*base, "-o", str(tmp_path / "out"), "--resume", "--json", *after]))
    assert doc["skipped"] == [] and len(doc["redone"]) == 3 and doc["files"] == 3
    _ok(runner.invoke(app, [*base, "-o", str(tmp_path / "fresh"), "-q", *after]))
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")
    again = _ok(runner.invoke(app, [*base, "-o", str(tmp_path / "out"), "--resume", "--json", *after]))
    assert len(again["skipped"]) == 3 and again["files"] == 0  # now complete: kept
    inputs.assert_unchanged()


def test_resume_with_another_shard_split_of_one_file_redoes_it(runner, make_filter, tmp_path):
    filt = make_filter()
    src = tmp_path / "v.parquet"
    pq.write_table(_table(20, 1), src, row_group_size=2)  # 10 row groups
    out = tmp_path / "part.parquet"
    _ok(runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "--shard", "0/3", "-q"]))
    doc = _ok(
        runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "--shard", "0/2", "--resume", "--json"])
    )
    assert doc["redone"] == [str(out)]
    fresh = tmp_path / "fresh.parquet"
    _ok(runner.invoke(app, ["apply", str(filt), str(src), "-o", str(fresh), "--shard", "0/2", "-q"]))
    assert out.read_bytes() == fresh.read_bytes()
    assert pq.read_table(out).column("id").to_pylist() == list(range(10))


def test_resume_after_an_input_is_rewritten_redoes_its_output(runner, make_filter, tmp_path):
    filt = make_filter()
    data = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    _ok(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(out), "-q"]))
    pq.write_table(_table(5, 42), data / "p0.parquet", row_group_size=2)  # same rows, new values
    doc = _ok(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(out), "--resume", "--json"]))
    assert doc["redone"] == [str(out / "p0.parquet")] and len(doc["skipped"]) == 2
    _ok(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(tmp_path / "fresh"), "-q"]))
    assert _files(out) == _files(tmp_path / "fresh")


def test_resume_still_refuses_another_filters_outputs(runner, make_filter, tmp_path):
    data = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    _ok(runner.invoke(app, ["apply", str(make_filter()), str(data), "-o", str(out), "-q"]))
    kept = Snapshot(out)
    other = make_filter(seed=5, name="g.safetensors")
    result = runner.invoke(app, ["apply", str(other), str(data), "-o", str(out), "--resume"])
    expect_error(result, match="was not made by this filter")
    kept.assert_unchanged()


# --------------------------------------------------------------------------- 2. inputs and outputs overlap


def test_output_into_the_input_folder_is_refused_even_with_force(runner, make_filter, tmp_path):
    filt = make_filter()
    data = _dataset(tmp_path / "data")
    inputs = Snapshot(data)
    for extra in ([], ["--force"], ["--to", "arrow", "--force"], ["--resume"]):
        result = runner.invoke(app, ["apply", str(filt), str(data), "-o", str(data), *extra])
        line = expect_error(result, match=f"-o {data} ")
        assert "would overwrite the input" in line or "is the input folder" in line
        inputs.assert_unchanged()


def test_output_folder_inside_the_input_folder_is_refused(runner, make_filter, tmp_path):
    filt = make_filter()
    data = _dataset(tmp_path / "data")
    inputs = Snapshot(data)
    result = runner.invoke(app, ["apply", str(filt), str(data), "-o", str(data / "out")])
    line = expect_error(result, match=f"is inside the input folder {data}")
    assert "read back as inputs" in line
    inputs.assert_unchanged()
    assert not (data / "out").exists()
    # the same through a glob that would match the outputs; a glob that would not is fine
    pattern = f"{data}/**/*.parquet"
    line = expect_error(runner.invoke(app, ["apply", str(filt), pattern, "-o", str(data / "out")]))
    assert f"match the input pattern {pattern!r}" in line
    _ok(runner.invoke(app, ["apply", str(filt), f"{data}/*.parquet", "-o", str(data / "out"), "-q"]))
    assert sorted(p.name for p in (data / "out").iterdir()) == ["p0.parquet", "p1.parquet"]
    # a hidden or _-prefixed output folder inside the input is never read back: allowed
    shutil.rmtree(data / "out")  # (it is a folder of outputs that the folder input would now read)
    _ok(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(data / "_filtered"), "-q"]))
    assert _ids(sorted((data / "_filtered").rglob("*.parquet"))) == list(range(16))


def test_output_onto_its_own_single_input_is_refused(runner, make_filter, tmp_path):
    src = tmp_path / "v.parquet"
    pq.write_table(_table(4, 0), src)
    before = src.read_bytes()
    link = tmp_path / "alias.parquet"
    link.symlink_to(src)
    filt = make_filter()
    for out in (src, link):
        result = runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "--force"])
        expect_error(result, match="would overwrite the input")
    assert src.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("shard", [None, "0/2", "1/2"])
def test_two_inputs_for_one_output_are_refused_naming_both(runner, make_filter, tmp_path, shard):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(_table(3, 0), data / "x.parquet")
    with pa.OSFile(str(data / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, _table(3, 1, 3).schema) as w:
        w.write_table(_table(3, 1, 3))
    args = ["apply", str(make_filter()), str(data), "-o", str(tmp_path / "out"), "--to", "parquet"]
    result = runner.invoke(app, args + (["--shard", shard] if shard else []))
    line = expect_error(result)
    assert str(data / "x.arrow") in line and str(data / "x.parquet") in line and "would both be written" in line
    assert not (tmp_path / "out").exists()


def test_a_symlink_loop_under_a_recursive_glob_is_read_once(runner, make_filter, tmp_path):
    data = _dataset(tmp_path / "data")
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)
    inputs = Snapshot(tmp_path / "data")
    filt = make_filter()
    for spec in (f"{data}/**/*.parquet", str(data)):
        out = tmp_path / ("g" if "*" in spec else "f")
        result = runner.invoke(app, ["apply", str(filt), spec, "-o", str(out), "--json"])
        doc = _ok(result)
        assert doc["files"] == 3
        assert "skipped 1 input path(s)" in result.stderr and "loop (a link to" in result.stderr
        assert _ids(sorted(out.rglob("*.parquet"))) == list(range(16))  # each row exactly once
        assert max(len(p.relative_to(out).parts) for p in out.rglob("*")) == 2  # no nested copies
    inputs.assert_unchanged()


def test_a_symlinked_sub_folder_is_followed_once_and_a_second_path_to_it_is_reported(runner, make_filter, tmp_path):
    """Decision: a symlinked sub-folder is part of the dataset (followed); a second path to the same
    real folder or file would read its rows twice, so it is skipped with a warning naming it."""
    data = _dataset(tmp_path / "data", sizes=(2, 3))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pq.write_table(_table(4, 9, 100), elsewhere / "e.parquet")
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "twin").symlink_to(elsewhere, target_is_directory=True)
    result = runner.invoke(app, ["apply", str(make_filter()), str(data), "-o", str(tmp_path / "out"), "--json"])
    doc = _ok(result)
    assert doc["files"] == 3 and doc["rows"] == 9
    assert f"{data / 'twin'} (a link to {data / 'linked'}, read already)" in result.stderr
    assert (tmp_path / "out" / "linked" / "e.parquet").is_file() and not (tmp_path / "out" / "twin").exists()


# --------------------------------------------------------------------------- 3. shards are a partition


def _write(path: Path, table: pa.Table, kind: str) -> None:
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=3)
        return
    opener = pa.ipc.new_file if kind == "arrow-file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "arrow-stream"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_shards_of_every_format_hold_each_row_exactly_once(runner, make_filter, tmp_path, kind, layout):
    filt = make_filter()
    ext = ".parquet" if kind == "parquet" else ".arrow"
    (tmp_path / "in").mkdir()
    if layout == "file":
        src = tmp_path / "in" / f"v{ext}"
        _write(src, _table(17, 0), kind)
    else:
        src = tmp_path / "in" / "data"
        src.mkdir()
        for i, first in enumerate((0, 6, 11)):
            _write(src / f"p{i}{ext}", _table([6, 5, 6][i], i, first), kind)
    inputs = Snapshot(tmp_path / "in")

    def out(name: str) -> Path:
        return tmp_path / "outs" / (f"{name}{ext}" if layout == "file" else name)

    _ok(runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out("whole")), "-q"]))
    whole = [out("whole")] if layout == "file" else sorted(out("whole").rglob(f"*{ext}"))
    assert _ids(whole) == list(range(17))
    for count in (2, 3):
        parts: list[Path] = []
        for i in range(count):
            _ok(runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out(f"s{count}-{i}")), "--shard", f"{i}/{count}", "-q"]))  # fmt: skip
            target = out(f"s{count}-{i}")
            parts += [target] if layout == "file" else sorted(target.rglob(f"*{ext}"))
        if layout == "folder":
            parts.sort(key=lambda p: p.name)
        assert _ids(parts) == list(range(17)), (count, _ids(parts))
        vectors = [np.array(_table_of(p).column("embedding").to_pylist()) for p in parts]
        reference = np.array(pa.concat_tables([_table_of(p) for p in whole]).column("embedding").to_pylist())
        np.testing.assert_allclose(np.concatenate(vectors), reference, rtol=1e-6, atol=1e-6)
    assert not list((tmp_path / "outs").rglob("*.tmp"))
    inputs.assert_unchanged()


def _table_of(path: Path) -> pa.Table:
    return pq.read_table(path) if path.suffix == ".parquet" else _read_ipc(path)


def test_shards_of_a_saved_arrow_stream_differ(runner, make_filter, tmp_path):
    """The reported case: an Arrow IPC stream saved as .arrow, split in two, held every row twice."""
    src = tmp_path / "s.arrow"
    _write(src, _table(10, 0), "arrow-stream")
    ids = []
    filt = make_filter()
    for i in range(2):
        out = tmp_path / f"o{i}.arrow"
        _ok(runner.invoke(app, ["apply", str(filt), str(src), "-o", str(out), "--shard", f"{i}/2", "-q"]))
        ids.append(_ids([out]))
    assert ids[0] and ids[1] and sorted(ids[0] + ids[1]) == list(range(10))
    assert os.path.getsize(src) > 0
