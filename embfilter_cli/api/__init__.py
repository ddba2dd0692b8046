"""The Python library: `fit`, `load`, `Filter`, `Encoder` (also importable from the package root).

The CLI's commands are these calls plus option parsing and printing: `embfilter fit` is `fit` and
`Filter.save`, `center` is `Filter.center`, `export` calls the functions behind `Filter.to_onnx` and
friends, `embed` is `Encoder.encode`. Nothing here prints: pass `Hooks` to see log lines and progress.
"""

from embfilter_cli.api.encoder import Encoder
from embfilter_cli.api.filter import Filter, load
from embfilter_cli.api.fitting import fit
from embfilter_cli.api.hooks import Hooks

__all__ = ["Encoder", "Filter", "Hooks", "fit", "load"]
