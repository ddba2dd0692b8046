"""Finding and reading ONLY W_U from every supported layout."""

import hashlib
import json

import numpy as np
import pytest
import torch

from embfilter_cli.errors import BadTensorError, ModelNotFoundError, UnembeddingNotFoundError
from embfilter_cli.model.locate import resolve_model
from embfilter_cli.model.unembedding import choose_unembedding, read_unembedding, tokenizer_vocab_size
from tests.tiny_models import make_gguf, make_gpt2, make_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_sharded):
    root = tmp_path_factory.mktemp("models")
    return {
        "sharded": tiny_llama_sharded,
        "tied": make_llama(root / "tied", tie=True),
        "gpt2": make_gpt2(root / "gpt2"),
        "bf16": make_llama(root / "bf16", dtype=torch.bfloat16),
    }


def _reference(folder, name):
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise AssertionError(name)


def test_sharded_untied_reads_lm_head_and_drops_padding_rows(models):
    folder = models["sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    u = read_unembedding(resolve_model(str(folder)))
    ref = _reference(folder, "lm_head.weight")
    assert u.tensor_name == "lm_head.weight" and not u.tied
    assert u.stored_rows == 320 and u.tokenizer_vocab == 300 and u.matrix.shape == (300, 32)
    torch.testing.assert_close(u.matrix, ref[:300])
    assert u.sha256 == hashlib.sha256(ref.numpy().tobytes()).hexdigest()  # exact stored bytes, padding included
    kept = read_unembedding(resolve_model(str(folder)), drop_padding_rows=False)
    assert kept.matrix.shape == (320, 32) and kept.sha256 == u.sha256


def test_tied_llama_and_gpt2_use_the_input_table(models):
    u = read_unembedding(resolve_model(str(models["tied"])))
    assert u.tensor_name == "model.embed_tokens.weight" and u.tied
    g = read_unembedding(resolve_model(str(models["gpt2"])))
    assert g.tensor_name == "transformer.wte.weight" and g.tied
    torch.testing.assert_close(g.matrix, _reference(models["gpt2"], "transformer.wte.weight"))


def test_bf16_is_memory_mapped_not_converted(models):
    u = read_unembedding(resolve_model(str(models["bf16"])))
    assert u.matrix.dtype == torch.bfloat16 and u.stored_dtype == "BF16"
    torch.testing.assert_close(u.matrix, _reference(models["bf16"], "lm_head.weight"))


def test_single_safetensors_file_and_tensor_override(models):
    file = models["tied"] / "model.safetensors"
    u = read_unembedding(resolve_model(str(file)))
    assert u.tensor_name == "model.embed_tokens.weight"
    o = read_unembedding(resolve_model(str(file)), tensor_name="model.layers.0.mlp.down_proj.weight")
    assert o.matrix.shape == (32, 64)
    with pytest.raises(UnembeddingNotFoundError, match="--tensor 'nope' is not in"):
        read_unembedding(resolve_model(str(file)), tensor_name="nope")


class Payload:
    """Any non-tensor class: unpickling it would run arbitrary code paths."""


def test_pytorch_bin_goes_through_weights_only(tmp_path, models):
    from safetensors.torch import load_file

    state = load_file(str(models["tied"] / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    u = read_unembedding(resolve_model(str(tmp_path)))
    torch.testing.assert_close(u.matrix, state["model.embed_tokens.weight"])
    # A pickle with arbitrary objects is refused, not executed.
    evil = tmp_path / "evil.bin"
    torch.save({"lm_head.weight": torch.zeros(2, 2), "x": Payload()}, evil)
    with pytest.raises(ModelNotFoundError, match="weights_only=True"):
        read_unembedding(resolve_model(str(evil)))


def test_gguf_quantized_tied_and_f16_head(tmp_path):
    path, expected = make_gguf(tmp_path / "q.gguf", rows=64, hidden=32, tokens=60)
    u = read_unembedding(resolve_model(str(path)))
    assert u.tensor_name == "token_embd.weight" and u.stored_dtype == "Q8_0" and u.tied
    assert u.matrix.shape == (60, 32)  # 4 rows past the token list dropped
    np.testing.assert_array_equal(u.matrix.numpy(), expected[:60])
    path2, expected2 = make_gguf(tmp_path / "f.gguf", head="f16")
    u2 = read_unembedding(resolve_model(str(path2)))
    assert u2.tensor_name == "output.weight" and u2.stored_dtype == "F16" and not u2.tied
    np.testing.assert_array_equal(u2.matrix.numpy(), expected2)


def test_f32_gguf_head_is_shared_with_the_file_and_torch_does_not_warn(tmp_path):
    """An F32 GGUF head is mapped read-only, not copied; torch's "not writable" UserWarning must not
    reach the user's stderr (issue 8), and a writable array still goes straight through. torch warns only
    once per process, so tests/hostile/test_clean_stderr.py checks the same in fresh processes."""
    import warnings

    from embfilter_cli.model.unembedding import readonly_tensor

    path, expected = make_gguf(tmp_path / "f32.gguf", head="f32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = read_unembedding(resolve_model(str(path)))
    assert u.stored_dtype == "F32"
    np.testing.assert_array_equal(u.matrix.numpy(), expected)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert readonly_tensor(mapped).data_ptr() == mapped.ctypes.data  # shared with the mapping, no copy
    writable = np.zeros(3, np.float32)
    assert readonly_tensor(writable).data_ptr() == writable.ctypes.data


def test_choose_unembedding_rules():
    assert choose_unembedding(["a", "lm_head.weight", "model.embed_tokens.weight"], {}, None, "x") == (
        "lm_head.weight",
        False,
    )
    assert (
        choose_unembedding(["language_model.lm_head.weight", "b"], {}, None, "x")[0] == "language_model.lm_head.weight"
    )
    with pytest.raises(UnembeddingNotFoundError, match="tie_word_embeddings=false"):
        choose_unembedding(["model.embed_tokens.weight"], {"tie_word_embeddings": False}, None, "x")
    with pytest.raises(UnembeddingNotFoundError, match="tensors there include a, b"):
        choose_unembedding(["a", "b"], {}, None, "x")


def test_nonfinite_and_bad_shapes(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(10, 4)
    save_file({"lm_head.weight": w.reshape(2, 5, 4)}, str(tmp_path / "three_d.safetensors"))
    with pytest.raises(BadTensorError, match=r"shape \[2, 5, 4\]"):
        read_unembedding(resolve_model(str(tmp_path / "three_d.safetensors")))
    save_file({"lm_head.weight": w.to(torch.int8)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(BadTensorError, match="stored as I8"):
        read_unembedding(resolve_model(str(tmp_path / "int.safetensors")))


def test_truncated_and_garbled_files(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "m.safetensors"
    save_file({"lm_head.weight": torch.randn(64, 8)}, str(good))
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(BadTensorError, match="truncated"):
        read_unembedding(resolve_model(str(tmp_path / "cut.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelNotFoundError, match="corrupt safetensors header"):
        read_unembedding(resolve_model(str(tmp_path / "junk.safetensors")))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelNotFoundError, match="not a readable GGUF file"):
        read_unembedding(resolve_model(str(tmp_path / "bad.gguf")))


def test_tokenizer_vocab_size_counts_added_tokens(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 5, "content": "<x>"}]})
    )
    assert tokenizer_vocab_size(tmp_path) == 6


def test_fast_gguf_header_walk_matches_gguf_reader(tmp_path):
    from embfilter_cli.model.unembedding import _read_gguf_with_reader

    for head in ("quantized", "f16", "f32"):
        path, _ = make_gguf(tmp_path / f"{head}.gguf", rows=64, hidden=32, tokens=60, head=head)
        fast = read_unembedding(resolve_model(str(path)), drop_padding_rows=False)
        slow = _read_gguf_with_reader(path, None)
        assert (fast.tensor_name, fast.sha256, fast.stored_rows, fast.tokenizer_vocab, fast.stored_dtype) == (
            slow.tensor_name,
            slow.sha256,
            slow.stored_rows,
            slow.tokenizer_vocab,
            slow.stored_dtype,
        )
        torch.testing.assert_close(fast.matrix, slow.matrix, rtol=0, atol=0)


def test_truncated_gguf_tensor_is_reported(tmp_path):
    path, _ = make_gguf(tmp_path / "t.gguf", rows=64, hidden=32)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BadTensorError, match="runs past the end of the file"):
        read_unembedding(resolve_model(str(path)))
