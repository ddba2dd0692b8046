"""Do serving engines give an exported filter's vectors unchanged? fastembed, infinity-emb, LangChain.

These engines pin older libraries than embfilter's (infinity-emb 0.0.78: numpy<2 and
sentence-transformers<4; fastembed and langchain-huggingface: huggingface_hub<2), so they run in
their own virtual environment and this script has two halves:

    # 1. with embfilter's environment: fit a filter on a tiny Llama, export it, save the reference
    PYTHONPATH=. .venv/bin/python bench/serve_engines.py prepare /tmp/serve
    # 2. with the engines' environment (python -m venv serve-venv; serve-venv/bin/pip install torch==2.13.0
    #    'infinity-emb[server,torch]' fastembed langchain-huggingface)
    serve-venv/bin/python bench/serve_engines.py check /tmp/serve
    # LangChain with sentence-transformers 6 (langchain-huggingface wants huggingface_hub<2, so install it
    # and its own dependencies --no-deps into a side folder instead of embfilter's environment):
    PYTHONPATH=.:lc-site .venv/bin/python bench/serve_engines.py check /tmp/serve langchain

`prepare` writes, under the folder: the tiny Llama (`llama/`), its ONNX export with the filter
appended (`onnx/model.onnx` + tokenizer files, for fastembed's custom-model registration and
infinity-emb's optimum engine), a whole sentence-transformers model with the prompt 'Query: '
(`st/`, for infinity-emb's torch engine and LangChain), and the references `reference.npy`
(`embfilter embed --filter F` on TEXTS) and `reference-recipe.npy` (the same with `--recipe RECIPE`). `check` runs each engine on localhost and prints, per
engine, the largest |Δ| against the reference, or the exact error that stopped it. Results are in
bench/RESULTS.md and the README's ecosystem table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import numpy as np

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Stocks fell.", "the recipe needs two eggs and flour"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
RECIPE = "Query: {text}"  # the sentence-transformers model carries it as its prompts
TOL = 1e-5  # of max |reference|: float32 arithmetic in another runtime


def prepare(folder: Path) -> None:
    """Fit, export (appended ONNX and a sentence-transformers model) and embed the reference."""
    import embfilter_cli as ef
    from tests.test_export_onnx import _export_tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    host = _export_tiny_llama(folder)  # folder/llama (checkpoint) and folder/llama.onnx (last_hidden_state)
    llama = folder / "llama"
    f = ef.fit(str(llama), rank=3, bottom=2)
    f.save(folder / "f.safetensors", force=True)
    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    f.append_to_onnx(host, onnx_dir / "model.onnx", force=True)  # per-token filtered last_hidden_state
    for name in TOKENIZER_FILES:
        if (llama / name).exists():
            shutil.copy(llama / name, onnx_dir / name)
    # fastembed needs the context length in tokenizer_config.json (transformers' tokenizers often leave a
    # huge sentinel there); take it from the model's config.
    config = json.loads((llama / "config.json").read_text())
    tok_config_path = onnx_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    if not 0 < int(tok_config.get("model_max_length", 0)) <= config["max_position_embeddings"]:
        tok_config["model_max_length"] = config["max_position_embeddings"]
    # transformers 5 saves tokenizer_class "TokenizersBackend", which the transformers 4 that
    # infinity-emb pins does not know; the fast tokenizer class reads the same tokenizer.json.
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2))
    f.to_sentence_transformers(folder / "st", recipe=RECIPE, force=True)
    reference = ef.Encoder(str(llama), filter=f).encode(TEXTS)
    np.save(folder / "reference.npy", reference)
    np.save(folder / "reference-recipe.npy", ef.Encoder(str(llama), filter=f, recipe=RECIPE).encode(TEXTS))
    print(f"prepared {folder}: reference {reference.shape}")


def _compare(name: str, got: np.ndarray, reference: np.ndarray, normalized: bool = False) -> dict[str, object]:
    """|got − reference| against TOL; `normalized`: the engine L2-normalises, so compare with the unit reference."""
    if normalized:
        reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    err = float(np.abs(np.asarray(got, dtype=np.float64) - reference).max())
    ok = err <= TOL * float(np.abs(reference).max())
    result = {"engine": name, "ok": ok, "max_abs_diff": err, "shape": list(np.shape(got))}
    return result | ({"compared_with": "the L2-normalised reference"} if normalized else {})


def _fastembed(folder: Path, reference: np.ndarray) -> dict[str, object]:
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = "embfilter/tiny-llama-filtered"
    TextEmbedding.add_custom_model(
        model=name,
        pooling=PoolingType.MEAN,  # the appended graph filters every token; mean pooling commutes with P
        normalization=False,
        sources=ModelSource(hf=name),  # never fetched: specific_model_path below
        dim=reference.shape[1],
        model_file="model.onnx",
    )
    model = TextEmbedding(model_name=name, specific_model_path=str(folder / "onnx"))
    return _compare("fastembed (custom ONNX model, appended graph)", np.stack(list(model.embed(TEXTS))), reference)


def _infinity_torch(folder: Path, reference: np.ndarray) -> dict[str, object]:
    """infinity-emb's torch engine on the whole sentence-transformers model (its default prompt applies)."""
    reference = np.load(folder / "reference-recipe.npy").astype(np.float64)
    return _infinity(folder, reference, folder / "st", ["--engine", "torch"], "torch engine, st/")


def _infinity_onnx(folder: Path, reference: np.ndarray) -> dict[str, object]:
    """infinity-emb's optimum (onnxruntime) engine on the appended ONNX graph, mean-pooled by infinity."""
    args = ["--engine", "optimum", "--pooling-method", "mean", "--onnx-disable-optimize"]
    # infinity-emb 0.0.78 hands optimum 2 the ONNX file's absolute path, which optimum refuses for a
    # local folder ("Could not find any ONNX files with target file name /…/model.onnx"); started in
    # the folder with --model-id . the path is relative and loads.
    return _infinity(folder, reference, Path("."), args, "optimum engine, appended ONNX", cwd=folder / "onnx")


def _infinity(
    folder: Path, reference: np.ndarray, model: Path, args: list[str], what: str, cwd: Path | None = None
) -> dict[str, object]:
    port = 7997
    cmd = [
        str(Path(sys.executable).parent / "infinity_emb"),
        "v2",
        "--model-id",
        str(model),
        *args,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    log = (folder / "infinity.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                tail = (folder / "infinity.log").read_text().strip().splitlines()
                errors = [line for line in tail if "Error" in line]
                raise RuntimeError(f"infinity_emb exited ({server.returncode}): {(errors or tail)[-1]}")
            try:
                body = json.dumps({"model": str(model), "input": TEXTS}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/embeddings", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    data = json.loads(response.read())
                got = np.array([row["embedding"] for row in sorted(data["data"], key=lambda r: r["index"])])
                # infinity-emb always L2-normalises (OpenAI's convention); cosines are what it serves
                return _compare(f"infinity-emb ({what}; OpenAI /embeddings)", got, reference, normalized=True)
            except OSError:
                time.sleep(2)
        raise RuntimeError("infinity_emb did not answer within 180 s")
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _langchain(folder: Path, reference: np.ndarray) -> dict[str, object]:
    """embed_documents and embed_query of HuggingFaceEmbeddings on st/ against `embed --recipe`."""
    from langchain_huggingface import HuggingFaceEmbeddings

    reference = np.load(folder / "reference-recipe.npy").astype(np.float64)
    embeddings = HuggingFaceEmbeddings(model_name=str(folder / "st"), model_kwargs={"device": "cpu"})
    got = np.array([*embeddings.embed_documents(TEXTS[:-1]), embeddings.embed_query(TEXTS[-1])])
    return _compare("LangChain HuggingFaceEmbeddings (embed_documents, embed_query)", got, reference)


def check(folder: Path, engines: list[str]) -> None:
    """Run the named engines (default: all) against the reference; one JSON line per engine."""
    reference = np.load(folder / "reference.npy").astype(np.float64)
    for run in RUNS:
        if engines and run.__name__.strip("_") not in engines:
            continue
        try:
            result = run(folder, reference)
        except Exception as exc:
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            result = {"engine": run.__name__.strip("_"), "ok": False, "error": last}
        print(json.dumps(result))


RUNS = (_fastembed, _infinity_onnx, _infinity_torch, _langchain)

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("prepare", "check"):
        sys.exit(
            "usage: serve_engines.py prepare FOLDER | check FOLDER [fastembed infinity_onnx infinity_torch langchain]"
        )
    if sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
    else:
        check(Path(sys.argv[2]), sys.argv[3:])
