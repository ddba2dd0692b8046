"""embfilter: spectral filters from an LLM's unembedding matrix for better text embeddings.

The library is four names, importable from here:

    >>> import embfilter_cli
    >>> sorted(embfilter_cli.__all__)
    ['Encoder', 'Filter', 'Hooks', '__version__', 'fit', 'load']

They are loaded on first use (module `__getattr__`): `embfilter --help` and shell completion import
this package and must not pull in torch or transformers, so nothing heavy is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports on first use
    from embfilter_cli.api import Encoder, Filter, Hooks, fit, load

_LAZY = frozenset({"Encoder", "Filter", "Hooks", "fit", "load"})

__all__ = ["Encoder", "Filter", "Hooks", "__version__", "fit", "load"]


def __getattr__(name: str) -> Any:
    """Import the library's public names on first access (PEP 562)."""
    if name in _LAZY:
        from embfilter_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'embfilter_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *_LAZY})
