"""Every writer on a full disk and in a read-only folder (issue 8): ONNX (standalone, appended,
external data), sentence-transformers (Dense folder, whole model), plots, embed in every output
format, eval's outputs and cache, and center.

Each refusal is one `Error:` line naming the user's path (never a hidden `*.tmp` name), exit 1, and
leaves the folder as it was: no temporary file, no partial output, no folder it created.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embfilter_cli.cli import app
from tests.hostile._util import Snapshot, expect_error, fill_disk

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply.", "A dog ran."]


def _no_temp_name(line: str) -> None:
    assert ".tmp" not in line, line


def _full_disk_line(line: str, out: Path) -> None:
    assert str(out) in line, line
    assert "disk is full" in line and "free space or choose another" in line, line
    _no_temp_name(line)


@pytest.fixture(scope="module")
def fitted(tiny_llama, tmp_path_factory) -> Path:
    """A filter fitted on the tiny Llama (the whole-model sentence-transformers export needs its model)."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("fitted") / "f.safetensors"
    result = CliRunner().invoke(app, ["fit", "-q", "-m", str(tiny_llama), "--rank", "2", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def _host(path: Path, external: str | None = None) -> Path:
    from tests.test_export_onnx import gather_host

    return gather_host(path, d=16, external=external)


# --------------------------------------------------------------------------- export


def _export_args(
    case: str, art: Path, fitted: Path, tiny_llama: Path, tmp_path: Path, folder: Path
) -> tuple[list[str], Path]:
    if case == "onnx":
        out = folder / "f.onnx"
        return ["export", "-q", str(art), "--onnx", "-o", str(out)], out
    if case == "onnx-external":
        out = folder / "f.onnx"
        return ["export", "-q", str(art), "--onnx", "--external-data", "-o", str(out)], out
    if case == "onnx-append":
        out = folder / "m.onnx"
        host = _host(tmp_path / "host" / "model.onnx")
        return ["export", "-q", str(art), "--onnx", "--append-to", str(host), "-o", str(out)], out
    if case == "st-dense":
        out = folder / "a" / "dense"
        return ["export", "-q", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out)], out
    if case == "st-model":
        out = folder / "a" / "st"
        args = ["export", "-q", str(fitted), "--format", "sentence-transformers", "-m", str(tiny_llama), "-o", str(out)]
        return args, out
    raise AssertionError(case)


EXPORTS = ["onnx", "onnx-external", "onnx-append", "st-dense", "st-model"]


@pytest.mark.parametrize("case", EXPORTS)
def test_export_on_a_full_disk(runner, art, fitted, tiny_llama, tmp_path, full_dir, case):
    args, out = _export_args(case, art, fitted, tiny_llama, tmp_path, full_dir)
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    line = expect_error(runner.invoke(app, args))
    _full_disk_line(line, out)
    before.assert_unchanged()
    assert sorted(p.name for p in full_dir.iterdir()) == ["filler", "keep.txt"]  # no folder left either


@pytest.mark.parametrize("case", EXPORTS)
def test_export_into_a_read_only_folder(runner, art, fitted, tiny_llama, tmp_path, ro_dir, case):
    args, out = _export_args(case, art, fitted, tiny_llama, tmp_path, ro_dir)
    before = Snapshot(ro_dir)
    line = expect_error(runner.invoke(app, args), match="not writable")
    assert str(out) in line, line
    before.assert_unchanged()


def test_append_next_to_an_external_data_host_on_a_full_disk(runner, art, full_dir):
    """The host keeps its weights in a data file; the filter gets its own (--external-data): both sides fail clean."""
    host = _host(full_dir / "model.onnx", external="model.onnx.weights")
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    out = full_dir / "model.filtered.onnx"
    args = ["export", "-q", str(art), "--onnx", "--append-to", str(host), "--external-data", "-o", str(out)]
    _full_disk_line(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()


def test_append_next_to_a_host_in_a_read_only_folder(runner, art, ro_dir_with):
    folder = ro_dir_with(lambda f: _host(f / "model.onnx", external="model.onnx.weights"))
    before = Snapshot(folder)
    out = folder / "model.filtered.onnx"
    args = ["export", "-q", str(art), "--onnx", "--append-to", str(folder / "model.onnx"), "-o", str(out)]
    expect_error(runner.invoke(app, args), match="not writable")
    before.assert_unchanged()


def test_st_export_with_force_over_a_read_only_folder_leaves_it(runner, art, ro_dir_with):
    args = ["export", "-q", str(art), "--format", "sentence-transformers", "--dense-only", "--force", "-o"]

    def old_export(folder: Path) -> None:  # an earlier export: the only folder --force may replace
        assert runner.invoke(app, [*args, str(folder / "dense")]).exit_code == 0

    folder = ro_dir_with(old_export)
    before = Snapshot(folder)
    out = folder / "dense"
    args.append(str(out))
    line = expect_error(runner.invoke(app, args), match="not writable")
    assert str(out) in line
    before.assert_unchanged()


# --------------------------------------------------------------------------- inspect --plot, center


def _center_args(art: Path, tmp_path: Path, out: Path) -> list[str]:
    np.save(tmp_path / "bg.npy", np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))
    return ["center", "-q", str(art), str(tmp_path / "bg.npy"), "-o", str(out)]


@pytest.mark.parametrize("case", ["plot", "center"])
def test_plot_and_center_on_a_full_disk(runner, art, tmp_path, full_dir, case):
    out = full_dir / ("s.png" if case == "plot" else "c.safetensors")
    args = (
        ["inspect", "spectrum", "-q", "--filter", str(art), "--plot", str(out)]
        if case == "plot"
        else _center_args(art, tmp_path, out)
    )
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    _full_disk_line(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()


@pytest.mark.parametrize("case", ["plot", "center"])
def test_plot_and_center_into_a_read_only_folder(runner, art, tmp_path, ro_dir, case):
    out = ro_dir / ("s.png" if case == "plot" else "c.safetensors")
    args = (
        ["inspect", "spectrum", "-q", "--filter", str(art), "--plot", str(out)]
        if case == "plot"
        else _center_args(art, tmp_path, out)
    )
    before = Snapshot(ro_dir)
    expect_error(runner.invoke(app, args), match="not writable")
    before.assert_unchanged()


# --------------------------------------------------------------------------- embed


def _embed_input(tmp_path: Path, case: str) -> str:
    if case == "parquet-folder":
        (tmp_path / "corpus").mkdir()
        pq.write_table(pa.table({"text": TEXTS}), tmp_path / "corpus" / "a.parquet")
        return str(tmp_path / "corpus")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return str(tmp_path / "texts.txt")


EMBED_OUTPUTS = {"npy": "e.npy", "jsonl": "e.jsonl", "parquet": "e.parquet", "parquet-folder": "emb/"}


@pytest.mark.parametrize("case", list(EMBED_OUTPUTS))
def test_embed_on_a_full_disk(runner, tiny_llama, tmp_path, full_dir, case):
    source = _embed_input(tmp_path, case)
    out = f"{full_dir}/{EMBED_OUTPUTS[case]}"
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    result = runner.invoke(app, ["embed", "-q", source, "-m", str(tiny_llama), "--device", "cpu", "-o", out])
    line = expect_error(result)
    assert str(full_dir) in line and "disk is full" in line, line
    _no_temp_name(line)
    before.assert_unchanged()
    assert sorted(p.name for p in full_dir.iterdir()) == ["filler", "keep.txt"]


@pytest.mark.parametrize("case", list(EMBED_OUTPUTS))
def test_embed_into_a_read_only_folder_fails_before_the_model(runner, tmp_path, ro_dir, monkeypatch, case):
    """The model named here does not exist: reaching it would give another error than `not writable`."""
    import embfilter_cli.text.embedding as embedding

    monkeypatch.setattr(embedding, "load_encoder_at", lambda *a, **k: pytest.fail("the model was loaded"))
    source = _embed_input(tmp_path, case)
    before = Snapshot(ro_dir)
    args = ["embed", "-q", source, "-m", str(tmp_path / "no-such-model"), "-o", f"{ro_dir}/{EMBED_OUTPUTS[case]}"]
    expect_error(runner.invoke(app, args), match="not writable")
    before.assert_unchanged()


# --------------------------------------------------------------------------- eval


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.tsv"
    rows = [(TEXTS[0], TEXTS[1], 0.2), (TEXTS[1], TEXTS[2], 0.5), (TEXTS[0], TEXTS[2], 0.9), (TEXTS[2], "Rain.", 0.1)]
    path.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    return path


def _eval(tiny_llama: Path, pairs: Path, *extra: str) -> list[str]:
    return ["eval", "-q", "-m", str(tiny_llama), "--device", "cpu", "--data", str(pairs), "--no-background", *extra]


@pytest.mark.parametrize("option", ["--plot", "--save-best"])
def test_eval_outputs_on_a_full_disk(runner, tiny_llama, pairs, tmp_path, full_dir, option):
    out = full_dir / ("h.png" if option == "--plot" else "best.safetensors")
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    args = _eval(tiny_llama, pairs, "--sweep-top", "0,2", "--sweep-bottom", "0,2", option, str(out))
    _full_disk_line(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()


@pytest.mark.parametrize("option", ["--plot", "--save-best"])
def test_eval_outputs_into_a_read_only_folder_fail_before_the_model(runner, pairs, tmp_path, ro_dir, option):
    out = ro_dir / ("h.png" if option == "--plot" else "best.safetensors")
    before = Snapshot(ro_dir)
    args = _eval(tmp_path / "no-such-model", pairs, "--sweep-top", "0,2", "--sweep-bottom", "0,2", option, str(out))
    expect_error(runner.invoke(app, args), match="not writable")
    before.assert_unchanged()


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_eval_with_an_unwritable_cache_warns_once_and_scores(runner, tiny_llama, pairs, tmp_path, request, disk):
    cache = request.getfixturevalue("full_dir" if disk == "full" else "ro_dir")
    if disk == "full":
        fill_disk(cache)
    before = Snapshot(cache)
    result = runner.invoke(app, [*_eval(tiny_llama, pairs, "--ratio", "2", "--json"), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "cache" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning:") and str(cache) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    _no_temp_name(lines[0])
    assert '"spearman"' in result.stdout
    before.assert_unchanged()


# --------------------------------------------------------------------------- failed exports remove the folders they made


def _fail_with_temp_name(monkeypatch, module, name: str) -> None:
    """Make `module.name` (a check run on the temporary output) fail with a message naming what it was given."""
    from embfilter_cli.errors import ExportError

    def broken(path, *args, **kwargs):
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: damaged at {path}; nothing was written")

    monkeypatch.setattr(module, name, broken)


def _assert_names_the_output(line: str, out: Path) -> None:
    assert f"cannot load {out.name}: damaged at {out};" in line, line
    _no_temp_name(line)


def test_failed_standalone_onnx_with_external_data_removes_its_folders(runner, art, tmp_path, monkeypatch):
    from embfilter_cli.export import onnx_export

    (tmp_path / "existing").mkdir()
    before = Snapshot(tmp_path)
    _fail_with_temp_name(monkeypatch, onnx_export, "check_standalone")
    out = tmp_path / "existing" / "new" / "deeper" / "f.onnx"
    line = expect_error(runner.invoke(app, ["export", "-q", str(art), "--onnx", "--external-data", "-o", str(out)]))
    _assert_names_the_output(line, out)
    before.assert_unchanged()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["existing"]
    assert list((tmp_path / "existing").iterdir()) == []  # the folder that was there stays


def test_failed_append_removes_linked_host_data_and_its_folders(runner, art, tmp_path, monkeypatch):
    from embfilter_cli.export import onnx_export

    host = _host(tmp_path / "hub" / "model.onnx", external="weights/model.data")
    before = Snapshot(tmp_path)
    _fail_with_temp_name(monkeypatch, onnx_export, "check_or_blame_host")
    out = tmp_path / "deploy" / "model.filtered.onnx"  # links hub/weights/model.data into deploy/weights/
    args = ["export", "-q", str(art), "--onnx", "--append-to", str(host), "--external-data", "-o", str(out)]
    _assert_names_the_output(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()
    assert not (tmp_path / "deploy").exists()


def test_failed_dense_export_removes_its_folders_and_names_the_output(runner, art, tmp_path, monkeypatch):
    from embfilter_cli.export import formats

    (tmp_path / "model").mkdir()
    before = Snapshot(tmp_path)
    _fail_with_temp_name(monkeypatch, formats, "_check_st")
    out = tmp_path / "model" / "a" / "2_Dense"
    args = ["export", "-q", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out)]
    _assert_names_the_output(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()
    assert list((tmp_path / "model").iterdir()) == []


def test_failed_whole_model_export_removes_its_folders_and_names_the_output(
    runner, fitted, tiny_llama, tmp_path, monkeypatch
):
    from embfilter_cli.export import st_model

    (tmp_path / "models").mkdir()
    before = Snapshot(tmp_path)
    _fail_with_temp_name(monkeypatch, st_model, "_check")
    out = tmp_path / "models" / "a" / "st"
    args = ["export", "-q", str(fitted), "--format", "sentence-transformers", "-m", str(tiny_llama), "-o", str(out)]
    _assert_names_the_output(expect_error(runner.invoke(app, args)), out)
    before.assert_unchanged()
    assert list((tmp_path / "models").iterdir()) == []


def test_a_failed_check_after_force_keeps_the_previous_export(runner, art, tmp_path, monkeypatch):
    from embfilter_cli.export import formats

    out = tmp_path / "dense"
    args = ["export", "-q", str(art), "--format", "sentence-transformers", "--dense-only", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = Snapshot(tmp_path)
    _fail_with_temp_name(monkeypatch, formats, "_check_st")
    _assert_names_the_output(expect_error(runner.invoke(app, [*args, "--force"])), out)
    before.assert_unchanged()


# --------------------------------------------------------------------------- a GGUF model's cached conversion


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_an_unwritable_cache_loads_the_gguf_directly(tmp_path, monkeypatch, request, disk):
    """The conversion cache is an optimisation: when it cannot be written the GGUF is loaded itself (like --no-cache)."""
    from embfilter_cli.model import gguf_convert
    from embfilter_cli.model.locate import resolve_model
    from embfilter_cli.text.embedding import model_target

    def convert(gguf: Path, out: Path) -> None:  # writes weights, as transformers' save_pretrained would
        (out / "model.safetensors").write_bytes(b"\0" * 65536)

    monkeypatch.setattr(gguf_convert, "convert_with_transformers", convert)
    cache = request.getfixturevalue("full_dir" if disk == "full" else "ro_dir")
    if disk == "full":
        fill_disk(cache)
    before = Snapshot(cache)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(np.random.default_rng(0).bytes(4096))
    notes: list[str] = []
    target, kwargs = model_target(resolve_model(str(gguf)), cache_dir=cache, notify=notes.append)
    assert (target, kwargs) == (str(tmp_path), {"gguf_file": "m.gguf"})
    # (a full disk is found while converting, after the "Converting m.gguf once" note)
    assert notes[-1].startswith("Cannot convert m.gguf into the cache") and str(cache) in notes[-1], notes
    assert len(notes) == (2 if disk == "full" else 1), notes
    _no_temp_name(notes[-1])
    before.assert_unchanged()


def test_embed_with_an_unwritable_cache_is_not_a_traceback(runner, tmp_path, tiny_llama, ro_dir, monkeypatch):
    from embfilter_cli.model import gguf_convert
    from tests.test_gguf_convert import FakeConverter

    monkeypatch.setattr(gguf_convert, "convert_with_transformers", FakeConverter(tiny_llama))
    monkeypatch.setenv("EMBFILTER_CACHE", str(ro_dir))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(np.random.default_rng(0).bytes(4096))  # not a model: the direct load fails, proving it ran
    (tmp_path / "t.txt").write_text("a text\n")
    result = runner.invoke(
        app, ["embed", "-q", str(tmp_path / "t.txt"), "-m", str(gguf), "-o", str(tmp_path / "e.npy")]
    )
    expect_error(result, match="transformers could not load")
    assert not (tmp_path / "e.npy").exists()


# --------------------------------------------------------------------------- --force over an earlier output, disk full


@pytest.mark.parametrize("case", ["onnx-external", "st-dense", "center", "embed"])
def test_force_over_an_earlier_output_on_a_full_disk_keeps_it(runner, art, tiny_llama, tmp_path, full_dir, case):
    args = {
        "onnx-external": ["export", "-q", str(art), "--onnx", "--external-data", "-o", str(full_dir / "f.onnx")],
        "st-dense": [
            "export",
            "-q",
            str(art),
            "--format",
            "sentence-transformers",
            "--dense-only",
            "-o",
            f"{full_dir}/d",
        ],
        "center": _center_args(art, tmp_path, full_dir / "c.safetensors"),
        "embed": ["embed", "-q", _embed_input(tmp_path, "npy"), "-m", str(tiny_llama), "-o", str(full_dir / "e.jsonl")],
    }[case]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    fill_disk(full_dir)
    before = Snapshot(full_dir)
    assert len(before.files) >= 3, before.files  # keep.txt, filler and the earlier output
    out = Path(args[-1])
    _full_disk_line(expect_error(runner.invoke(app, [*args, "--force"])), out)
    before.assert_unchanged()


# --------------------------------------------------------------------------- apply into a folder of tables


def _vector_tables(folder: Path) -> Path:
    folder.mkdir()
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    for name, rows in (("a.parquet", x[:20]), ("b.parquet", x[20:])):
        pq.write_table(pa.table({"embedding": pa.array(list(rows), pa.list_(pa.float32()))}), folder / name)
    return folder


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_apply_into_a_folder_of_tables(runner, art, tmp_path, request, disk):
    folder = request.getfixturevalue("full_dir" if disk == "full" else "ro_dir")
    if disk == "full":
        fill_disk(folder)
    before = Snapshot(folder)
    out = folder / "filtered"
    line = expect_error(
        runner.invoke(app, ["apply", "-q", str(art), str(_vector_tables(tmp_path / "in")), "-o", str(out)])
    )
    assert str(out) in line and ("disk is full" in line if disk == "full" else "not writable" in line), line
    _no_temp_name(line)
    before.assert_unchanged()
