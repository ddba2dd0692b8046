"""Outputs that would replace what is not ours (issue 16, kinds 1, 4 and 10, on `embed` and `export`).

- `--force` replaces only what an earlier export made (its `embfilter.json`, or a Dense module's
  weights that record us), never a folder holding the filter or the model being exported, and
  never the current folder; a folder output of `apply` replaces only files embfilter made.
- `embed` into Parquet or JSONL never replaces an input column or field without being told (`--output-column`).
- `embed --resume` without the filter an output was made with redoes it.

Judged on behaviour: exit status, one `Error:` line, no traceback, inputs byte for byte unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embfilter_cli.cli import app
from tests.hostile._util import Snapshot, expect_error


@pytest.fixture(scope="module")
def tiny_filter(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan_filter") / "f.safetensors"
    result = CliRunner().invoke(
        app, ["fit", "--model", str(tiny_llama), "--rank", "3", "--bottom", "2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    return out


def _export(filt: Path, out: str | Path, *args: str) -> list[str]:
    return ["export", str(filt), "--format", "sentence-transformers", "-o", str(out), *args]


# --------------------------------------------------------------------------- 4. export --force


@pytest.mark.parametrize("whole", [True, False])
def test_export_force_never_deletes_the_filter_being_exported(runner, tiny_filter, tiny_llama, tmp_path, whole):
    work = tmp_path / "work"
    work.mkdir()
    filt = Path(shutil.copy(tiny_filter, work / "f.safetensors"))
    (work / "notes.txt").write_text("mine")
    kept = Snapshot(work)
    extra = ["--model", str(tiny_llama)] if whole else ["--dense-only"]
    line = expect_error(runner.invoke(app, _export(filt, work, "--force", *extra)))
    assert f"holds {filt}, which this export reads; --force never deletes inputs" in line
    kept.assert_unchanged()


def test_export_force_never_replaces_the_model_folder_it_wraps(runner, tiny_filter, tiny_llama, tmp_path):
    pytest.importorskip("sentence_transformers")
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    kept = Snapshot(model)
    line = expect_error(runner.invoke(app, _export(tiny_filter, model, "--force", "--model", str(model))))
    assert "is not an earlier export of a sentence-transformers model" in line
    kept.assert_unchanged()
    # even when the model folder looks like an earlier export, it is an input of this one
    (model / "embfilter.json").write_text(json.dumps({"format": "embfilter.sentence-transformers/1"}))
    kept = Snapshot(model)
    line = expect_error(runner.invoke(app, _export(tiny_filter, model, "--force", "--model", str(model))))
    assert f"holds {model}, which this export reads" in line
    kept.assert_unchanged()
    assert not list(tmp_path.glob(".*"))  # no temporary folder beside it


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("target", [".", ".."])
def test_export_into_the_current_folder_is_refused(
    runner, tiny_filter, tiny_llama, tmp_path, monkeypatch, whole, target
):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    extra = ["--model", str(tiny_llama)] if whole else ["--dense-only"]
    for force in ([], ["--force"]):
        line = expect_error(runner.invoke(app, _export(tiny_filter, target, *force, *extra)))
        assert f"-o {target} is the current folder (or holds it)" in line
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]


def test_apply_force_replaces_only_files_embfilter_made_in_a_folder_output(runner, make_filter, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({"id": [0, 1], "embedding": pa.array([[0.5] * 16, [1.0] * 16], pa.list_(pa.float32()))})
    pq.write_table(table, data / "a.parquet")
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table, out / "a.parquet")  # the user's own file, made by nothing of ours
    kept = Snapshot(out)
    filt = make_filter()
    for extra in (["--force"], ["--resume"], []):
        expect_error(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(out), *extra]))
        kept.assert_unchanged()
    line = expect_error(runner.invoke(app, ["apply", str(filt), str(data), "-o", str(out), "--force"]))
    assert "records no filter (embfilter did not make it)" in line
    (out / "a.parquet").unlink()
    other = make_filter(seed=5, name="g.safetensors")
    assert runner.invoke(app, ["apply", str(other), str(data), "-o", str(out), "-q"]).exit_code == 0
    result = runner.invoke(app, ["apply", str(filt), str(data), "-o", str(out), "--force", "-q"])  # ours: replaced
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------- 10. an input column named `embedding`


def _embed(tiny_llama: Path, src: Path, out: Path, *args: str) -> list[str]:
    return ["embed", str(src), "-o", str(out), "--model", str(tiny_llama), "--device", "cpu", *args]


def test_embed_refuses_to_replace_a_text_column_named_embedding(runner, tiny_llama, tmp_path):
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [0, 1], "text": ["a cat", "a dog"], "embedding": ["note 1", "note 2"]}), src)
    kept = Snapshot(tmp_path)
    out = tmp_path / "e.parquet"
    line = expect_error(runner.invoke(app, _embed(tiny_llama, src, out)))
    assert "already has a column 'embedding' (string) that the vectors would replace" in line
    assert "--output-column" in line
    line = expect_error(runner.invoke(app, _embed(tiny_llama, src, out, "--text-column", "embedding")))
    assert "already has a column 'embedding'" in line
    kept.assert_unchanged()
    assert runner.invoke(app, _embed(tiny_llama, src, out, "--output-column", "vec")).exit_code == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "text", "embedding", "vec"]
    assert table.column("embedding").to_pylist() == ["note 1", "note 2"]
    forced = _embed(tiny_llama, src, tmp_path / "r.parquet", "--output-column", "embedding")
    assert runner.invoke(app, forced).exit_code == 0  # named explicitly: replaced on purpose
    replaced = pq.read_table(tmp_path / "r.parquet")
    assert replaced.column_names == ["id", "text", "embedding"]
    assert pa.types.is_fixed_size_list(replaced.schema.field("embedding").type)
    assert pq.read_table(src).column("embedding").to_pylist() == ["note 1", "note 2"]


def test_embed_refuses_an_empty_output_column_name(runner, tiny_llama, tmp_path):
    """An empty name would fall back to `embedding` while counting as chosen: it would replace it unasked."""
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a cat"], "embedding": ["note"]}), src)
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"text": "a cat", "embedding": "note"}\n')
    kept = Snapshot(tmp_path)
    for source, out in ((src, tmp_path / "e.parquet"), (lines, tmp_path / "e.jsonl")):
        expect_error(
            runner.invoke(app, _embed(tiny_llama, source, out, "--output-column", "")), status=2, match="needs a name"
        )
    kept.assert_unchanged()


def test_embed_lines_to_parquet_refuses_a_jsonl_field_named_embedding(runner, tiny_llama, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "a cat", "embedding": "keep me"}\n')
    out = tmp_path / "e.parquet"
    line = expect_error(runner.invoke(app, _embed(tiny_llama, src, out)))
    assert "already has a column 'embedding'" in line and not out.exists()
    usage = runner.invoke(app, _embed(tiny_llama, src, tmp_path / "e.npy", "--output-column", "vec"))
    expect_error(usage, status=2, match=".npy has none")
    # JSONL to JSONL: the same refusal (tests/test_embed.py covers --output-column there).
    line = expect_error(runner.invoke(app, _embed(tiny_llama, src, tmp_path / "e.jsonl")))
    assert "already have a field 'embedding'" in line and not (tmp_path / "e.jsonl").exists()


# --------------------------------------------------------------------------- 1. embed --resume and the filter


def test_embed_resume_without_the_filter_redoes_outputs_made_with_it(runner, tiny_llama, tiny_filter, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"id": [2 * i, 2 * i + 1], "text": [f"text {i}", f"more {i}"]}), data / f"p{i}.parquet")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert runner.invoke(app, _embed(tiny_llama, data, out, "--filter", str(tiny_filter))).exit_code == 0
    result = runner.invoke(app, _embed(tiny_llama, data, out, "--resume", "--json"))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["skipped"] == [] and sorted(doc["redone"]) == [str(out / "p0.parquet"), str(out / "p1.parquet")]
    assert runner.invoke(app, _embed(tiny_llama, data, fresh)).exit_code == 0
    for name in ("p0.parquet", "p1.parquet"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    again = runner.invoke(app, _embed(tiny_llama, data, out, "--resume", "--json"))
    assert json.loads(again.stdout)["files"] == 0  # complete now


# --------------------------------------------------------------------------- 2. embed shares apply's planner


@pytest.mark.parametrize("where", ["same", "inside"])
def test_embed_into_its_own_input_folder_is_refused(runner, tiny_llama, tmp_path, where):
    data = tmp_path / "corpus"
    data.mkdir()
    pq.write_table(pa.table({"id": [0], "text": ["a cat"]}), data / "p.parquet")
    kept = Snapshot(data)
    out = data if where == "same" else data / "out"
    line = expect_error(runner.invoke(app, _embed(tiny_llama, data, out, "--force")))
    assert ("would overwrite the input" if where == "same" else "read back as inputs") in line
    kept.assert_unchanged()
