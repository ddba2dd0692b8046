"""Other libraries' log lines on our stderr: none unless -v.

A script reads our stderr, and there it must find only our own `Warning:` lines and the one
`Error:` line (see `console.info_enabled`). Libraries write there by two roads: Python logging
without a handler of their own, which ends in logging's last-resort handler (sentence-transformers'
"Default prompt name is set to …" line), and C++ loggers (onnxruntime's coloured
"[E:onnxruntime:…]" line when it refuses a model, which we report as our `Error:` line anyway).

`set_verbose(False)`, what every CLI run does without `-v`, raises logging's last-resort handler
above CRITICAL and onnxruntime's process-wide severity to fatal; `ort_severity` is the level for
each onnxruntime session. Library (API) use never calls it, so a caller's logging stays theirs.

Not handled: libraries that install their own stream handler (transformers: `model.quiet`
silences it around loads; Ray: `engines.ray_engine`).
"""

from __future__ import annotations

import logging
import sys

ORT_ERROR, ORT_FATAL = 3, 4
_state = {"verbose": True}  # until a CLI run says otherwise, nothing is silenced


def set_verbose(verbose: bool) -> None:
    """Let other libraries' log lines through (`-v`) or keep them off stderr."""
    _state["verbose"] = verbose
    if logging.lastResort is not None:
        logging.lastResort.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
    ort = sys.modules.get("onnxruntime")
    if ort is not None:  # already imported: later imports read `ort_severity` themselves
        ort.set_default_logger_severity(ort_severity())


def ort_severity() -> int:
    """onnxruntime's log severity: errors with -v, only fatal ones otherwise (its errors become ours)."""
    return ORT_ERROR if _state["verbose"] else ORT_FATAL
