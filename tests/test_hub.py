"""`embfilter fit --model org/name`: only the head shard is downloaded, against a local fake Hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so every run
here is a fresh `embfilter` subprocess with those variables set; the fake Hub runs in this process
and records every request it receives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub, fake_commit
from tests.tiny_models import make_llama

TOKEN = "hf_test_token_123"
# Run the CLI exactly as the console script does; NO_SLEEP also turns huggingface_hub's retry
# back-off (about 23 s of sleeps before it gives up on an unreachable host) into no wait.
_CLI = "import sys{patch}; from embfilter_cli.cli import main; sys.argv[0] = 'embfilter'; main()"
NO_SLEEP = "; import time; time.sleep = lambda seconds: None"


def _safetensors_sha(folder: Path, tensor: str) -> tuple[str, str]:
    """(shard file name, SHA-256 of the tensor's stored bytes), read independently of embfilter."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if tensor in handle.keys():
                data = handle.get_tensor(tensor).contiguous().view(-1).numpy().tobytes()
                return file.name, hashlib.sha256(data).hexdigest()
    raise AssertionError(f"{tensor} not in {folder}")


def _index(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Untied and tied sharded Llamas, an unsharded copy of the untied one, and one whose head shard is gone."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hub_models")
    tiny = make_llama(root / "tiny", shard_size="20KB")
    tied = make_llama(root / "tied", tie=True, shard_size="20KB")
    tiny_map, tied_map = _index(tiny), _index(tied)
    # The point of the tests: W_U sits in one shard among several, and not the first.
    assert len(set(tiny_map.values())) >= 3 and tiny_map["lm_head.weight"] != sorted(tiny_map.values())[0]
    assert len(set(tied_map.values())) >= 3 and "lm_head.weight" not in tied_map

    single = root / "single"  # the same tensors as one model.safetensors, no index (an older revision)
    single.mkdir()
    tensors: dict = {}
    for shard in sorted(set(tiny_map.values())):
        tensors.update(load_file(str(tiny / shard)))
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, single / name)

    head_shard = tiny_map["lm_head.weight"]
    broken = root / "broken"
    shutil.copytree(tiny, broken, ignore=lambda _dir, names: [n for n in names if n == head_shard])
    return {"tiny": tiny, "tied": tied, "single": single, "broken": broken}


@pytest.fixture(scope="module")
def hub(models) -> FakeHub:
    with FakeHub() as server:
        tiny = server.add_repo("org/tiny", models["tiny"])
        tiny.add_revision("v1", models["single"])
        server.add_repo("org/tied", models["tied"])
        server.add_repo("org/gated", models["tiny"], token=TOKEN)
        server.add_repo("org/broken", models["broken"])
        yield server


def _dead_endpoint() -> str:
    """A localhost URL nothing listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_cli(
    args: list[str],
    cwd: Path,
    *,
    endpoint: str,
    hf_home: Path,
    offline: bool = False,
    token: str | None = None,
    no_sleep: bool = False,
) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "EMBFILTER_DEBUG")
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0")
    if token is not None:
        env["HF_TOKEN"] = token
    code = _CLI.format(patch=NO_SLEEP if no_sleep else "")
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _fit_args(repo: str, out: str = "out.safetensors", *extra: str) -> list[str]:
    return ["fit", "--model", repo, "--rank", "2", "-o", out, "--json", *extra]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def _weights_requested(hub: FakeHub) -> set[str]:
    return {name for name in hub.files_requested() if name.endswith((".safetensors", ".bin"))}


def _nothing_written(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.iterdir() if p.name != "hf_home") == []


# --------------------------------------------------------------------------- success paths


def test_fetches_only_the_head_shard_then_works_offline_from_the_cache(hub, models, tmp_path, runner):
    from embfilter_cli.cli import app
    from embfilter_cli.filters.artifact import load_artifact

    hf_home = tmp_path / "hf_home"
    hub.clear_log()
    proc = run_cli(_fit_args("org/tiny"), tmp_path, endpoint=hub.url, hf_home=hf_home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert "%|" not in proc.stderr and "Error" not in proc.stderr  # no download bars when stderr is not a terminal

    # (a) config, tokenizer files, the index and exactly one weights file: the shard holding lm_head.weight.
    head_shard, head_sha = _safetensors_sha(models["tiny"], "lm_head.weight")
    assert _index(models["tiny"])["lm_head.weight"] == head_shard
    fetched = hub.files_requested("GET")
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
    assert _weights_requested(hub) == {head_shard}
    assert [r.filename for r in hub.requested("GET")].count(head_shard) == 1
    # absent optional tokenizer files were asked about (HEAD) but never failed the run
    assert "vocab.json" in hub.files_requested("HEAD") and "vocab.json" not in fetched
    commit = fake_commit("org/tiny", "main")
    assert all(r.revision in ("main", commit) for r in hub.requested() if r.filename)
    assert any(r.revision == commit for r in hub.requested() if r.filename == head_shard)  # pinned to the commit

    # (b) the same W_U bytes as a fit on the local folder, and as an independent hash of the tensor.
    art = load_artifact(tmp_path / "out.safetensors")
    assert summary["unembedding_sha256"] == art.metadata["unembedding_sha256"] == head_sha
    assert art.metadata["model_source"] == "org/tiny" and art.metadata["model_revision"] == commit
    local = runner.invoke(
        app, ["fit", "--model", str(models["tiny"]), "--rank", "2", "-o", str(tmp_path / "local.safetensors"), "--json"]
    )
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["unembedding_sha256"] == head_sha
    local_art = load_artifact(tmp_path / "local.safetensors")
    assert (art.projection == local_art.projection).all()
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / commit
    assert (snapshot / head_shard).exists() and not (snapshot / sorted(_index(models["tiny"]).values())[0]).exists()

    # (c) HF_HUB_OFFLINE=1: served from the cache without a single request.
    hub.clear_log()
    offline = run_cli(
        _fit_args("org/tiny", "offline.safetensors"), tmp_path, endpoint=hub.url, hf_home=hf_home, offline=True
    )
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["unembedding_sha256"] == head_sha
    assert hub.requested() == []

    # Online with a warm cache: one HEAD to resolve "main", everything else known for that commit.
    warm = run_cli(_fit_args("org/tiny", "warm.safetensors"), tmp_path, endpoint=hub.url, hf_home=hf_home)
    assert warm.returncode == 0, warm.stderr
    assert [(r.method, r.filename) for r in hub.requested() if r.filename] == [("HEAD", "config.json")]


def test_tied_model_fetches_the_input_embedding_shard(hub, models, tmp_path):
    hub.clear_log()
    proc = run_cli(_fit_args("org/tied"), tmp_path, endpoint=hub.url, hf_home=tmp_path / "hf_home")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    shard, sha = _safetensors_sha(models["tied"], "model.embed_tokens.weight")
    assert summary["tensor_name"] == "model.embed_tokens.weight" and summary["unembedding_sha256"] == sha
    assert _weights_requested(hub) == {shard}


def test_revision_is_passed_through_and_recorded(hub, models, tmp_path):
    # org/tiny@v1 is the same model as one unsharded model.safetensors: the whole (only) weights file.
    hub.clear_log()
    proc = run_cli(
        _fit_args("org/tiny", "out.safetensors", "--revision", "v1"),
        tmp_path,
        endpoint=hub.url,
        hf_home=tmp_path / "hf_home",
    )
    assert proc.returncode == 0, proc.stderr
    commit = fake_commit("org/tiny", "v1")
    assert ("HEAD", "/org/tiny/resolve/v1/config.json") in [(r.method, r.path) for r in hub.requested()]
    assert {r.revision for r in hub.requested() if r.filename} == {"v1", commit}
    assert _weights_requested(hub) == {"model.safetensors"}
    from embfilter_cli.filters.artifact import load_artifact

    art = load_artifact(tmp_path / "out.safetensors")
    assert art.metadata["model_revision"] == commit
    assert art.metadata["unembedding_sha256"] == _safetensors_sha(models["tiny"], "lm_head.weight")[1]


def test_gated_repo_uses_the_token_from_the_environment(hub, tmp_path):
    hub.clear_log()
    proc = run_cli(_fit_args("org/gated"), tmp_path, endpoint=hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert {r.headers.get("authorization") for r in hub.requested() if r.filename} == {f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- errors: one line, nothing written


@pytest.mark.parametrize(
    ("repo", "token", "extra", "expected"),
    [
        ("org/missing", None, [], ["Hub repo org/missing was not found (HTTP 404)", "embfilter models", "HF_TOKEN"]),
        ("org/gated", None, [], ["org/gated is gated (HTTP 401)", "accept its licence", "set HF_TOKEN"]),
        ("org/gated", "hf_wrong", [], ["org/gated is gated (HTTP 403)", "set HF_TOKEN"]),
        ("org/tiny", None, ["--revision", "nope"], ["revision 'nope' does not exist in org/tiny", "--revision"]),
    ],
    ids=["repo-404", "gated-no-token", "gated-wrong-token", "revision-404"],
)
def test_hub_refusals_are_one_line_errors(hub, tmp_path, repo, token, extra, expected):
    hub.clear_log()
    proc = run_cli(
        _fit_args(repo, "out.safetensors", *extra),
        tmp_path,
        endpoint=hub.url,
        hf_home=tmp_path / "hf_home",
        token=token,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    line = _one_line_error(proc)
    for fragment in expected:
        assert fragment in line, line
    assert hub.files_requested() == {"config.json"}  # it stopped at the first refusal
    _nothing_written(tmp_path)


def test_offline_with_an_empty_cache_says_how_to_fix_it(hub, tmp_path):
    hub.clear_log()
    proc = run_cli(_fit_args("org/tiny"), tmp_path, endpoint=hub.url, hf_home=tmp_path / "hf_home", offline=True)
    assert proc.returncode == 1 and proc.stdout == ""
    line = _one_line_error(proc)
    assert "org/tiny (revision main) is not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line and "run once online" in line and "local path" in line
    assert hub.requested() == []
    _nothing_written(tmp_path)


def test_unreachable_hub_says_check_the_connection(tmp_path):
    proc = run_cli(
        _fit_args("org/tiny"), tmp_path, endpoint=_dead_endpoint(), hf_home=tmp_path / "hf_home", no_sleep=True
    )
    assert proc.returncode == 1 and proc.stdout == ""
    # huggingface_hub logs each retry (they explain the wait); the error itself is one final line.
    *retries, line = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and not any("Error:" in r for r in retries)
    assert all("Retry" in r or "thrown while requesting" in r for r in retries), retries
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:" in line
    assert "check the connection" in line and "HF_HUB_OFFLINE=1" in line and "local path" in line
    _nothing_written(tmp_path)


def test_index_naming_a_missing_shard_is_an_error(hub, models, tmp_path):
    hub.clear_log()
    proc = run_cli(_fit_args("org/broken"), tmp_path, endpoint=hub.url, hf_home=tmp_path / "hf_home")
    assert proc.returncode == 1 and proc.stdout == ""
    line = _one_line_error(proc)
    head_shard = _index(models["tiny"])["lm_head.weight"]
    assert f"maps lm_head.weight to {head_shard}, but the repo has no such file" in line
    assert "try another --revision" in line
    assert _weights_requested(hub) == {head_shard}
    _nothing_written(tmp_path)


def test_impossible_band_fails_before_any_weights_are_downloaded(hub, tmp_path):
    hub.clear_log()
    proc = run_cli(
        ["fit", "--model", "org/tiny", "--rank", "40", "-o", "out.safetensors"],
        tmp_path,
        endpoint=hub.url,
        hf_home=tmp_path / "hf_home",
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "40" in proc.stderr and "32" in proc.stderr  # names the numbers: R=40 vs hidden size 32
    assert hub.files_requested() == {"config.json"}
    _nothing_written(tmp_path)


def test_config_hidden_size_reads_common_layouts():
    from embfilter_cli.model.hub import config_hidden_size

    assert config_hidden_size({"hidden_size": 576}) == 576
    assert config_hidden_size({"n_embd": 768}) == 768  # GPT-2
    assert config_hidden_size({"text_config": {"hidden_size": 2304}}) == 2304  # multimodal wrappers
    assert config_hidden_size({"hidden_size": True}) is None and config_hidden_size({}) is None


# --------------------------------------------------------------------------- repo contents (in-process, no HTTP)


@pytest.fixture
def fake_snapshot(tmp_path, monkeypatch):
    """A snapshot folder served by a stub of the download layer: a file exists iff it is in the folder."""
    from embfilter_cli.model import hub as hub_module

    snapshot = tmp_path / "snapshots" / fake_commit("org/x", "main")
    snapshot.mkdir(parents=True)

    def download(self, filename, revision, missing):
        path = snapshot / filename
        if path.exists():
            return path
        if missing is None:
            return None
        raise missing()

    monkeypatch.setattr(hub_module._Fetcher, "download", download)
    monkeypatch.setattr(
        hub_module._Fetcher, "optional", lambda self, filename, commit: download(self, filename, commit, None)
    )
    return snapshot


def _write(folder: Path, name: str, data: object) -> None:
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "Hub repo org/x has no config.json at revision main; embfilter reads Transformers-format"),
        ({"config.json": "{oops"}, "config.json of org/x is not valid JSON"),
        (
            {"config.json": {}},
            "has none of model.safetensors.index.json, pytorch_model.bin.index.json, model.safetensors",
        ),
        ({"config.json": {}, "model.safetensors.index.json": {"metadata": {}}}, "has no weight_map"),
        (
            {
                "config.json": {},
                "model.safetensors.index.json": {"weight_map": {"lm_head.weight": "../../x.safetensors"}},
            },
            "names '../../x.safetensors', a path outside the model folder",
        ),
        (
            {"config.json": {}, "model.safetensors.index.json": {"weight_map": {"model.layers.0.w": "a.safetensors"}}},
            "cannot tell which tensor of org/x (model.safetensors.index.json) is the unembedding",
        ),
    ],
    ids=["no-config", "bad-config", "no-weights", "no-weight-map", "escaping-shard", "no-head-tensor"],
)
def test_repo_content_errors_name_the_file_and_the_fix(fake_snapshot, files, expected):
    from embfilter_cli.errors import EmbfilterError
    from embfilter_cli.model.hub import fetch_head_files

    for name, data in files.items():
        _write(fake_snapshot, name, data)
    with pytest.raises(EmbfilterError) as info:
        fetch_head_files("org/x")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unsharded_bin_checkpoint_is_the_fallback(fake_snapshot):
    from embfilter_cli.model.hub import fetch_head_files

    _write(fake_snapshot, "config.json", {"hidden_size": 8})
    (fake_snapshot / "pytorch_model.bin").write_bytes(b"stub")
    seen: list[dict] = []
    loc = fetch_head_files("org/x", spec="alias-x", check_config=seen.append)
    assert loc.kind == "hf_folder" and loc.path == fake_snapshot and loc.source == "org/x" and loc.spec == "alias-x"
    assert loc.revision == fake_snapshot.name and loc.files == {"head_shard": fake_snapshot / "pytorch_model.bin"}
    assert seen == [{"hidden_size": 8}]


def test_invalid_hub_id_is_a_one_line_error(runner, tmp_path, monkeypatch):
    from embfilter_cli.cli import app

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fit", "--model", "org/x..y", "-o", "out.safetensors"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: 'org/x..y' is not a valid Hub id") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
