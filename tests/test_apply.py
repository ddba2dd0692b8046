"""`embfilter apply` and the streaming readers/writers in `embfilter_cli.vectors`.

Every numeric result is compared with a float64 numpy reference x @ Pᵀ; every bad input is checked
for its one-line message, exit status, and that no output (or temp file) was left behind.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from embfilter_cli.cli import app
from embfilter_cli.commands import apply as apply_cmd
from embfilter_cli.filters.artifact import load_artifact
from embfilter_cli.vectors import detect, dtypes, npy_format, registry, stream

D, K = 16, 13  # make_filter's default: d=16, top 2 and bottom 1 removed


@pytest.fixture
def filt(make_filter) -> Path:
    return make_filter()


def _p64(filter_path: Path) -> np.ndarray:
    return load_artifact(filter_path).projection.astype(np.float64)


def _ref(x: np.ndarray, filter_path: Path) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ _p64(filter_path).T


def _x(rows: int = 50, d: int = D, seed: int = 1, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, d)).astype(dtype)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _one_line_error(result, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- .npy


def test_npy_file_to_file_matches_float64_reference_across_batches(runner, filt, tmp_path):
    x = _x(50)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    result = runner.invoke(
        app, ["-v", "apply", str(filt), str(tmp_path / "x.npy"), "-o", str(out), "--batch-size", "7"]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "Filtered 50 vectors 16 → 13 dims (float32)" in result.stderr
    y = np.load(out)
    assert y.dtype == np.float32 and y.shape == (50, K)
    np.testing.assert_allclose(y, _ref(x, filt), rtol=1e-5, atol=1e-5)
    # batching must not change results beyond float32 rounding
    one = tmp_path / "one.npy"
    assert runner.invoke(app, ["-v", "apply", str(filt), str(tmp_path / "x.npy"), "-o", str(one), "-q"]).exit_code == 0
    np.testing.assert_allclose(np.load(one), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "in_dtype, flag, out_dtype, tol",
    [
        (np.float64, None, np.float64, 1e-12),
        (np.float16, None, np.float16, 2e-2),
        (np.float32, "float64", np.float64, 1e-6),  # float32 inputs widened exactly, computed in float64
        (np.float32, "float16", np.float16, 2e-2),
        (np.dtype(">f4"), None, np.float32, 1e-5),  # big-endian file: read correctly, written native
    ],
)
def test_dtypes_default_to_the_input_and_can_be_overridden(runner, filt, tmp_path, in_dtype, flag, out_dtype, tol):
    x = _x(20).astype(in_dtype)
    np.save(tmp_path / "x.npy", x)
    args = ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")] + (
        ["--dtype", flag] if flag else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == out_dtype
    np.testing.assert_allclose(y.astype(np.float64), _ref(x, filt), rtol=tol, atol=tol)


def test_any_rank_filters_the_last_axis_and_fortran_order_works(runner, filt, tmp_path):
    x = _x(12).reshape(3, 4, D)
    np.save(tmp_path / "x3.npy", x)
    np.save(tmp_path / "xf.npy", np.asfortranarray(x[0]))
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "x3.npy"), "-o", str(tmp_path / "y3.npy")]).exit_code
        == 0
    )
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "xf.npy"), "-o", str(tmp_path / "yf.npy")]).exit_code
        == 0
    )
    y3 = np.load(tmp_path / "y3.npy")
    assert y3.shape == (3, 4, K)
    np.testing.assert_allclose(y3, _ref(x.reshape(-1, D), filt).reshape(3, 4, K), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "yf.npy"), _ref(x[0], filt), rtol=1e-5, atol=1e-5)


def test_normalize_gives_unit_vectors_and_keeps_zero_rows_zero(runner, filt, tmp_path):
    x = _x(10)
    x[3] = 0
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(
        app, ["-v", "apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--normalize"]
    )
    assert result.exit_code == 0 and "L2-normalised" in result.stderr
    y = np.load(tmp_path / "y.npy")
    ref = _ref(x, filt)
    norms = np.linalg.norm(ref, axis=1, keepdims=True)
    norms[norms == 0] = 1
    np.testing.assert_allclose(y, ref / norms, rtol=1e-5, atol=1e-6)
    assert np.all(y[3] == 0)
    np.testing.assert_allclose(np.linalg.norm(np.delete(y, 3, axis=0), axis=1), 1, rtol=1e-6)


def test_stdin_npy_is_sniffed_and_stdout_gets_the_same_bytes_as_a_file(runner, filt, tmp_path):
    x = _x(30)
    np.save(tmp_path / "x.npy", x)
    assert (
        runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]).exit_code == 0
    )
    result = runner.invoke(app, ["apply", str(filt), "-"], input=(tmp_path / "x.npy").read_bytes())
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == (tmp_path / "y.npy").read_bytes()


def test_empty_npy_inputs_give_empty_outputs(runner, filt, tmp_path):
    np.save(tmp_path / "e2.npy", np.zeros((0, D), np.float32))
    np.save(tmp_path / "e1.npy", np.array([], dtype=np.float32))
    for name in ("e2", "e1"):
        result = runner.invoke(
            app, ["apply", str(filt), str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / f"{name}.out.npy")]
        )
        assert result.exit_code == 0, result.stderr
        y = np.load(tmp_path / f"{name}.out.npy")
        assert y.shape == (0, K) and y.dtype == np.float32


# --------------------------------------------------------------------------- JSONL


def test_jsonl_keeps_other_fields_and_order_and_skips_blank_lines(runner, filt, tmp_path):
    x = _x(5, dtype=np.float64)
    records = [
        {"id": i, "text": f"tëxt {i} ✓", "embedding": x[i].tolist(), "meta": {"a": [1, None, True]}} for i in range(5)
    ]
    path = _write_jsonl(tmp_path / "x.jsonl", records)
    path.write_text(path.read_text(encoding="utf-8").replace("\n", "\n\n", 1), encoding="utf-8")  # a blank line 2
    result = runner.invoke(app, ["apply", str(filt), str(path)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    ref = _ref(x, filt)
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert list(obj) == ["id", "text", "embedding", "meta"]
        assert obj["id"] == i and obj["text"] == f"tëxt {i} ✓" and obj["meta"] == {"a": [1, None, True]}
        np.testing.assert_allclose(obj["embedding"], ref[i], rtol=1e-12, atol=1e-12)  # JSON numbers are float64
    assert "tëxt" in result.stdout  # non-ASCII passes through unescaped


def test_jsonl_float32_output_round_trips_float32_exactly(runner, filt, tmp_path):
    x = _x(8, dtype=np.float64)
    path = _write_jsonl(tmp_path / "x.jsonl", [{"v": row.tolist()} for row in x])
    result = runner.invoke(app, ["apply", str(filt), str(path), "--field", "v", "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    got = np.array([json.loads(line)["v"] for line in result.stdout.splitlines()])
    expected = _ref(x, filt).astype(np.float32)
    assert np.array_equal(got.astype(np.float32), expected)


@pytest.mark.parametrize("fmt_args", [[], ["--format", "jsonl"]])
def test_jsonl_from_stdin_sniffed_or_named(runner, filt, fmt_args):
    x = _x(3, dtype=np.float64)
    data = "".join(json.dumps({"embedding": r.tolist(), "k": i}) + "\n" for i, r in enumerate(x))
    result = runner.invoke(app, ["apply", str(filt), "-", *fmt_args], input=data)
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["k"] for g in got] == [0, 1, 2]
    np.testing.assert_allclose([g["embedding"] for g in got], _ref(x, filt), rtol=1e-12, atol=1e-12)


def test_empty_jsonl_and_empty_stdin_give_empty_output(runner, filt, tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    result = runner.invoke(app, ["-v", "apply", str(filt), str(tmp_path / "e.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o.jsonl").read_bytes() == b""
    result = runner.invoke(app, ["-v", "apply", str(filt), "-"], input=b"")
    assert result.exit_code == 0 and result.stdout_bytes == b""
    assert "Filtered 0 vectors" in result.stderr


# --------------------------------------------------------------------------- format conversion


@pytest.mark.parametrize("to_file", [True, False])
def test_jsonl_to_npy_with_unknown_row_count(runner, filt, tmp_path, to_file):
    """The header is patched afterwards (file) or the data spooled first (stdout)."""
    x = _x(23, dtype=np.float64)
    path = _write_jsonl(tmp_path / "x.jsonl", [{"embedding": r.tolist()} for r in x])
    if to_file:
        result = runner.invoke(app, ["apply", str(filt), str(path), "-o", str(tmp_path / "y.npy"), "--batch-size", "5"])
        y = np.load(tmp_path / "y.npy")
    else:
        result = runner.invoke(
            app, ["apply", str(filt), str(path), "--to", "npy", "--dtype", "float32", "--batch-size", "5"]
        )
        y = np.load(io.BytesIO(result.stdout_bytes))
    assert result.exit_code == 0, result.stderr
    assert y.shape == (23, K) and y.dtype == (np.float64 if to_file else np.float32)
    np.testing.assert_allclose(y, _ref(x, filt), rtol=1e-6, atol=1e-6)


def test_npy_to_jsonl_by_extension_and_jsonl_to_safetensors(runner, filt, tmp_path):
    x = _x(4)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.jsonl")])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "y.jsonl").read_text().splitlines()]
    assert [list(r) for r in rows] == [["embedding"]] * 4
    np.testing.assert_allclose([r["embedding"] for r in rows], _ref(x, filt), rtol=1e-6, atol=1e-6)
    path = _write_jsonl(
        tmp_path / "x.jsonl", [{"embedding": r.tolist(), "id": i} for i, r in enumerate(x.astype(np.float64))]
    )
    result = runner.invoke(app, ["apply", str(filt), str(path), "--to", "safetensors", "--tensor", "vecs"])
    assert result.exit_code == 0, result.stderr
    (tmp_path / "z.safetensors").write_bytes(result.stdout_bytes)
    with safe_open(str(tmp_path / "z.safetensors"), "numpy") as fh:
        assert list(fh.keys()) == ["vecs"]
        z = fh.get_tensor("vecs")
    assert z.shape == (4, K) and z.dtype == np.float64
    np.testing.assert_allclose(z, _ref(x, filt), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_keeps_other_tensors_and_metadata_and_records_the_filter(runner, filt, tmp_path):
    x = _x(9)
    ids = np.arange(9, dtype=np.int64)
    save_file(
        {"ids": ids, "emb": x, "scale": np.ones(3, np.float32)},
        str(tmp_path / "x.safetensors"),
        metadata={"src": "unit"},
    )
    out = tmp_path / "y.safetensors"
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "x.safetensors"), "-o", str(out), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.stderr
    with safe_open(str(out), "numpy") as fh:
        meta = fh.metadata()
        assert sorted(fh.keys()) == ["emb", "ids", "scale"]
        np.testing.assert_array_equal(fh.get_tensor("ids"), ids)
        np.testing.assert_array_equal(fh.get_tensor("scale"), np.ones(3, np.float32))
        np.testing.assert_allclose(fh.get_tensor("emb"), _ref(x, filt), rtol=1e-5, atol=1e-5)
    art = load_artifact(filt)
    assert meta["src"] == "unit"
    assert meta["embfilter.projection_sha256"] == art.metadata["projection_sha256"]
    assert meta["embfilter.unembedding_sha256"] == art.unembedding_sha256
    # the same through a pipe (tensors must be read strictly in file order)
    result = runner.invoke(
        app, ["apply", str(filt), "-", "--batch-size", "4"], input=(tmp_path / "x.safetensors").read_bytes()
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == out.read_bytes()


def test_safetensors_bfloat16_in_and_out_match_torch_rounding(runner, filt, tmp_path):
    x = torch.from_numpy(_x(6)).to(torch.bfloat16)
    from safetensors.torch import save_file as save_pt

    save_pt({"emb": x}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "y.safetensors"
    result = runner.invoke(app, ["-v", "apply", str(filt), str(tmp_path / "x.safetensors"), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    with safe_open(str(out), "pt") as fh:
        y = fh.get_tensor("emb")
    assert y.dtype == torch.bfloat16
    expected = torch.from_numpy(x.float().numpy() @ load_artifact(filt).projection.T).to(torch.bfloat16)
    assert torch.equal(y, expected)
    # bfloat16 into .npy becomes float32 (numpy has no bfloat16), said on stderr
    result = runner.invoke(
        app, ["-v", "apply", str(filt), str(tmp_path / "x.safetensors"), "-o", str(tmp_path / "y.npy")]
    )
    assert result.exit_code == 0 and "writing float32" in result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _ref(x.float().numpy(), filt), rtol=1e-5, atol=1e-5)


def test_bfloat16_conversions_match_torch():
    special = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, np.inf, -np.inf, 1e-40], np.float32)
    values = np.concatenate([special, np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100])
    bits = dtypes.float32_to_bfloat16(values)
    assert np.array_equal(bits, torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(
        dtypes.bfloat16_to_float32(bits), torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    )
    nan_bits = dtypes.float32_to_bfloat16(np.array([np.nan, np.uint32(0x7F800001).view(np.float32)], np.float32))
    assert np.isnan(dtypes.bfloat16_to_float32(nan_bits)).all()


def test_safetensors_tensor_choice(runner, filt, tmp_path):
    save_file({"a": _x(3), "b": _x(3, seed=2)}, str(tmp_path / "two.safetensors"))
    result = runner.invoke(
        app, ["apply", str(filt), str(tmp_path / "two.safetensors"), "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 1
    _one_line_error(result, "holds several 2-D float tensors (a F32 [3, 16], b F32 [3, 16]); pass --tensor NAME")
    result = runner.invoke(
        app,
        [
            "apply",
            str(filt),
            str(tmp_path / "two.safetensors"),
            "--tensor",
            "zz",
            "-o",
            str(tmp_path / "o.safetensors"),
        ],
    )
    assert result.exit_code == 1
    _one_line_error(result, "has no tensor 'zz'; it holds a, b")
    assert _files(tmp_path) == ["f.safetensors", "two.safetensors"]
    result = runner.invoke(
        app,
        ["apply", str(filt), str(tmp_path / "two.safetensors"), "--tensor", "b", "-o", str(tmp_path / "o.safetensors")],
    )
    assert result.exit_code == 0, result.stderr
    with safe_open(str(tmp_path / "o.safetensors"), "numpy") as fh:
        np.testing.assert_allclose(fh.get_tensor("b"), _ref(_x(3, seed=2), filt), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fh.get_tensor("a"), _x(3))  # the other tensor passes through untouched


# --------------------------------------------------------------------------- errors


def _npy_with_nan(tmp_path: Path) -> Path:
    x = _x(50)
    x[37, 5] = np.nan
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


def test_nan_is_an_error_naming_the_row_and_nothing_is_left_behind(runner, filt, tmp_path):
    path = _npy_with_nan(tmp_path)
    before = _files(tmp_path)
    # batch 8: rows 0..31 were already written to the temporary output when row 37 fails
    result = runner.invoke(app, ["apply", str(filt), str(path), "-o", str(tmp_path / "y.npy"), "--batch-size", "8"])
    assert result.exit_code == 1 and result.stdout == ""
    _one_line_error(result, "x.npy row 37 has nan at position 5; clean the input or pass --allow-nonfinite")
    assert _files(tmp_path) == before


def test_allow_nonfinite_passes_rows_through_with_a_warning(runner, filt, tmp_path):
    path = _npy_with_nan(tmp_path)
    result = runner.invoke(
        app, ["apply", str(filt), str(path), "-o", str(tmp_path / "y.npy"), "--allow-nonfinite", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    assert "1 input vectors held NaN/Inf" in result.stderr
    y = np.load(tmp_path / "y.npy")
    assert np.isnan(y[37]).all() and np.isfinite(np.delete(y, 37, axis=0)).all()


def test_nonfinite_jsonl_names_the_line(runner, filt, tmp_path):
    data = "".join(json.dumps({"embedding": _x(1, dtype=np.float64)[0].tolist()}) + "\n" for _ in range(2))
    data += '{"embedding": [Infinity' + ", 0" * (D - 1) + "]}\n"
    result = runner.invoke(app, ["apply", str(filt), "-"], input=data)
    assert result.exit_code == 1
    _one_line_error(result, "stdin line 3 has inf at position 0")


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            '{"embedding": [1, 2]\n',
            "line 1 is not valid JSON (Expecting ',' delimiter at column 21); fix or remove that line",
        ),
        ('{"id": 1}\n', "line 1 has no field 'embedding' (its fields: id); pass --field NAME"),
        ("[1, 2]\n", "line 1 is a JSON array, not an object"),
        ('{"embedding": "1 2"}\n', "field 'embedding' is a JSON string, expected a list of numbers"),
        (
            '{"embedding": [1, "a"' + ", 0" * (D - 2) + "]}\n",
            'holds "a" at position 1; vectors must be flat lists of numbers',
        ),
        ('{"embedding": [1, null' + ", 0" * (D - 2) + "]}\n", "holds null at position 1"),
        (
            '{"embedding": [' + ", ".join(["1"] * 8) + "]}\n",
            "line 1: field 'embedding' has 8 numbers but earlier lines have 16",
        ),
        (b'{"embedding": "\xff"}\n', "line 1 is not valid UTF-8"),
    ],
)
def test_bad_jsonl_lines_are_named(runner, filt, tmp_path, content, needle):
    good = json.dumps({"embedding": [0.5] * D}) + "\n"
    data = (good * 2).encode() + (content if isinstance(content, bytes) else content.encode())
    (tmp_path / "x.jsonl").write_bytes(data)
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "y.jsonl")])
    assert result.exit_code == 1
    _one_line_error(result, needle.replace("line 1", "line 3"))
    assert _files(tmp_path) == ["f.safetensors", "x.jsonl"]


def test_jsonl_dimension_mismatch_and_ragged_lines(runner, filt):
    result = runner.invoke(app, ["apply", str(filt), "-"], input=json.dumps({"embedding": [0.5] * 8}) + "\n")
    assert result.exit_code == 1
    _one_line_error(
        result,
        "stdin line 1: field 'embedding' has 8 numbers but the filter expects 16 (fitted on test/planted); "
        "use a filter fitted on the model that produced these vectors",
    )
    data = json.dumps({"embedding": [0.5] * D}) + "\n" + json.dumps({"embedding": [0.5] * (D - 1)}) + "\n"
    result = runner.invoke(app, ["apply", str(filt), "-"], input=data)
    assert result.exit_code == 1
    _one_line_error(result, "stdin line 2: field 'embedding' has 15 numbers but earlier lines have 16")


@pytest.mark.parametrize(
    "make, needle",
    [
        (
            lambda p: np.save(p, _x(4, d=8)),
            "holds 8-dimensional vectors but the filter expects 16 (fitted on test/planted); "
            "use a filter fitted on the model that produced these vectors",
        ),
        (lambda p: p.write_bytes(b"hello, not numpy"), "is not a .npy file"),
        (lambda p: np.save(p, np.arange(4 * D).reshape(4, D)), "holds int64 values"),
        (
            lambda p: (np.save(p, _x(40)), p.write_bytes(p.read_bytes()[:-100])),
            "is truncated: its .npy header promises 40×16",
        ),
        (lambda p: np.save(p, np.float32(3)), "holds a single number"),
    ],
)
def test_bad_npy_inputs(runner, filt, tmp_path, make, needle):
    make(tmp_path / "x.npy")
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 1
    _one_line_error(result, needle)
    assert _files(tmp_path) == ["f.safetensors", "x.npy"]


def test_truncated_npy_on_stdin_names_the_rows_read(runner, filt, tmp_path):
    np.save(tmp_path / "x.npy", _x(40))
    data = (tmp_path / "x.npy").read_bytes()[:-100]
    result = runner.invoke(app, ["apply", str(filt), "-", "--batch-size", "16"], input=data)
    assert result.exit_code == 1
    _one_line_error(result, "stdin ended after 38 of the 40 rows that its .npy header promises; the input is truncated")


def test_float16_overflow_is_caught(runner, filt, tmp_path):
    x = np.full((2, D), 60000, np.float16)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 1
    _one_line_error(result, "row 0: a filtered value exceeds float16's range (±65504); pass --dtype float32")


def test_existing_output_needs_force(runner, filt, tmp_path):
    np.save(tmp_path / "x.npy", _x(3))
    (tmp_path / "y.npy").write_bytes(b"keep me")
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 1
    _one_line_error(result, "already exists; pass --force")
    assert (tmp_path / "y.npy").read_bytes() == b"keep me"
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--force"])
    assert result.exit_code == 0 and np.load(tmp_path / "y.npy").shape == (3, K)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{x}", "-o", "{t}/y.npy", "--json", "--to", "jsonl"], "--to jsonl contradicts the output name"),
        (["{x}", "--json"], "--json prints a summary on stdout"),
        (["{x}", "-o", "{t}/y.npy", "--dtype", "bfloat16"], "npy cannot store bfloat16"),
        (["{t}/x.bin"], "cannot tell the format of"),
        (["{t}/nope.npy"], "does not exist"),
    ],
)
def test_usage_errors_exit_2(runner, filt, tmp_path, args, needle):
    np.save(tmp_path / "x.npy", _x(3))
    (tmp_path / "x.bin").write_bytes(b"\x00\x01garbage")
    argv = ["apply", str(filt)] + [a.format(x=tmp_path / "x.npy", t=tmp_path) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "y.npy").exists()


def test_not_a_filter_is_refused_before_reading_input(runner, tmp_path):
    np.save(tmp_path / "x.npy", _x(3))
    (tmp_path / "f.safetensors").write_bytes(b"junk")
    result = runner.invoke(
        app, ["apply", str(tmp_path / "f.safetensors"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]
    )
    assert result.exit_code == 1
    _one_line_error(result, "is not a readable safetensors file")
    assert not (tmp_path / "y.npy").exists()


# --------------------------------------------------------------------------- summary, progress, internals


def test_json_summary(runner, filt, tmp_path):
    np.save(tmp_path / "x.npy", _x(11))
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {
        k: doc[k] for k in ("rows", "input_dim", "output_dim", "input_format", "output_format", "output_dtype")
    } == {
        "rows": 11,
        "input_dim": D,
        "output_dim": K,
        "input_format": "npy",
        "output_format": "npy",
        "output_dtype": "float32",
    }
    assert doc["projection_sha256"] == load_artifact(filt).metadata["projection_sha256"]


def test_progress_bar_goes_to_stderr_when_interactive(runner, filt, tmp_path, monkeypatch):
    import embfilter_cli.console as console

    monkeypatch.setattr(console, "progress_enabled", lambda: True)
    np.save(tmp_path / "x.npy", _x(40))
    result = runner.invoke(app, ["apply", str(filt), str(tmp_path / "x.npy"), "--batch-size", "8"])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(io.BytesIO(result.stdout_bytes)), _ref(_x(40), filt), rtol=1e-5, atol=1e-5)


def test_filter_stream_reports_progress_to_the_total(filt, tmp_path):
    np.save(tmp_path / "x.npy", _x(20))
    calls = []
    with open(tmp_path / "x.npy", "rb") as fp:
        source = registry.open_source(fp, "npy", "x.npy", path=tmp_path / "x.npy", expected_dim=D)
        sink = npy_format.NpySink(io.BytesIO(), seekable=True)
        stats = stream.filter_stream(
            source,
            sink,
            load_artifact(filt).projection,
            batch_rows=6,
            progress=lambda done, total: calls.append((done, total)),
        )
        source.close()
    assert calls == [(6, 20), (12, 20), (18, 20), (20, 20)]
    assert (stats.rows, stats.input_dim, stats.output_dim) == (20, D, K)


@pytest.mark.parametrize(
    "head, fmt",
    [
        (b"\x93NUMPY\x01\x00v\x00{'descr'", "npy"),
        ((88).to_bytes(8, "little") + b'{"emb":{"d', "safetensors"),
        (b'  {"embedding": [1', "jsonl"),
        (b'{"abcd":{"x": 1}', "jsonl"),  # 9th byte '{' but the "length" would be absurd
        (b"\x00\x01garbage", None),
    ],
)
def test_sniff_format(head, fmt):
    assert detect.sniff_format(head) == fmt


def test_cli_choices_mirror_the_core():
    assert apply_cmd.FORMATS == registry.FORMATS
    assert apply_cmd.DTYPE_NAMES == dtypes.DTYPE_NAMES
    assert apply_cmd._EXTENSIONS == registry.EXTENSIONS


def test_npy_header_patch_keeps_alignment():
    for rows in (0, 7, 10**12):
        short = npy_format.npy_header(np.dtype(np.float32), (rows, 3))
        padded = npy_format.npy_header(
            np.dtype(np.float32), (rows, 3), min_len=len(npy_format.npy_header(np.dtype(np.float32), (10**19 - 1, 3)))
        )
        for header in (short, padded):
            assert len(header) % 64 == 0
            fp = io.BytesIO(header)
            assert np.lib.format.read_magic(fp) == (1, 0)
            assert np.lib.format.read_array_header_1_0(fp) == ((rows, 3), False, np.dtype(np.float32))


# --------------------------------------------------------------------------- real processes


ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embfilter_cli", *args],
        input=data,
        capture_output=True,
        cwd=ROOT,
        env=dict(os.environ, EMBFILTER_DEBUG=""),
        timeout=120,
    )


def test_real_pipes_jsonl_and_npy(filt, tmp_path):
    x = _x(12)
    data = "".join(
        json.dumps({"i": i, "embedding": r.tolist()}) + "\n" for i, r in enumerate(x.astype(np.float64))
    ).encode()
    out = _cli(["apply", str(filt), "-", "--format", "jsonl"], data)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.decode().splitlines()]
    np.testing.assert_allclose([g["embedding"] for g in got], _ref(x, filt), rtol=1e-9, atol=1e-9)
    buf = io.BytesIO()
    np.save(buf, x)
    out = _cli(["apply", str(filt), "-", "--batch-size", "5"], buf.getvalue()[:-64])  # truncated in a real pipe
    assert out.returncode == 1 and out.stdout[:6] == b"\x93NUMPY"  # stdout had earlier rows: documented
    assert b"Error: stdin ended after 11 of the 12 rows" in out.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_resident_memory_is_bounded_by_the_batch_not_the_file(filt, tmp_path):
    """A 244 MiB .npy streams through with far less resident memory than its size (mmap + MADV_DONTNEED)."""
    rows = 4_000_000
    path = tmp_path / "big.npy"
    block = _x(500_000)
    with open(path, "wb") as fp:
        fp.write(npy_format.npy_header(np.dtype(np.float32), (rows, D)))
        for _ in range(rows // len(block)):
            fp.write(block.tobytes())
    size_mb = path.stat().st_size / 2**20
    # VmHWM is the peak of the process's own address space. ru_maxrss is not usable here: Linux carries
    # the (large) pytest parent's RSS over fork/exec into the child's ru_maxrss.
    args = ["apply", str(filt), str(path), "-o", str(tmp_path / "out.npy"), "-q", "--batch-size", "65536"]
    code = (
        "import re\nfrom embfilter_cli.cli import app\n"
        f"app.main(args={args!r}, standalone_mode=False)\n"
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.split()[-1]) / 1024
    y = np.load(tmp_path / "out.npy", mmap_mode="r")
    assert y.shape == (rows, K)
    np.testing.assert_allclose(y[-3:], _ref(block[-3:], filt), rtol=1e-5, atol=1e-5)
    assert peak_mb < 0.5 * size_mb, f"peak RSS {peak_mb:.0f} MiB for a {size_mb:.0f} MiB input"


def test_finite_row_check_is_exact_even_when_row_sums_overflow():
    x = np.zeros((5, 4), np.float32)
    x[1, 2] = np.nan
    x[2, :2] = 3e38  # finite values whose sum overflows float32: must not be reported
    x[3, 0], x[3, 1] = np.inf, -np.inf
    x[4, 3] = -np.inf
    assert stream._finite_rows(x).tolist() == [True, False, True, False, False]
