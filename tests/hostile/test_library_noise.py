"""Other libraries' log lines stay off stderr unless -v (issue 16, kind 9, the noise half).

Two roads, one switch (`library_logs`, set by every CLI run): Python logging without a handler
(sentence-transformers' "Default prompt name is set to …" warning) and onnxruntime's C++ logger
(its coloured "[E:onnxruntime:…]" line when a graph fails while running, which we report as our
own `Error:` line). The onnxruntime case reads file descriptor 2 (capfd), where the C++ logger writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT_LINE = "Default prompt name is set to 'query'."


def _out_of_range_gather(path: Path) -> Path:
    """A graph that loads fine and fails when run with an index beyond its table."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    node = helper.make_node("Gather", ["E", "ids"], ["out"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", TP.INT64, ["b"])],
        [helper.make_tensor_value_info("out", TP.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.zeros((3, 4), np.float32), "E")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), str(path))
    return path


@pytest.mark.parametrize("verbose", [False, True])
def test_onnxruntime_error_lines_only_with_verbose(tmp_path, capfd, verbose):
    from embfilter_cli.console import set_verbose
    from embfilter_cli.export.onnx_check import _session

    graph = _out_of_range_gather(tmp_path / "g.onnx")
    try:
        set_verbose(verbose)
        session = _session(graph)
        with pytest.raises(Exception, match="indices element out of data bounds"):
            session.run(None, {"ids": np.array([7], np.int64)})
        err = capfd.readouterr().err
    finally:
        set_verbose(False)
    assert ("[E:onnxruntime" in err) is verbose, err


SCRIPT = """
import logging, sys
import embfilter_cli.commands.models as models_module
from embfilter_cli.cli import main

original = models_module.models.callback

def noisy(*args, **kwargs):
    # What sentence-transformers does when it loads a model with a default prompt: a warning on a
    # logger without a handler of its own (it ends in logging's last resort, i.e. stderr).
    logging.getLogger("sentence_transformers.base.model").warning({line!r})
    return original(*args, **kwargs)

models_module.models.callback = noisy
sys.argv = ["embfilter", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("flags", "shown"), [([], False), (["-v"], True)])
def test_python_library_warnings_only_with_verbose(tmp_path, flags, shown):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMBFILTER_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(line=PROMPT_LINE), *flags, "models", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (PROMPT_LINE in done.stderr) is shown, done.stderr
    if not shown:
        assert done.stderr == ""
