"""The command line's logging: our progress at INFO, third-party chatter only with ``--verbose``.

A tiny dynamo export used to print ~1,190 stderr lines, 979 of them onnx_ir's "Replaced initializer"
at INFO (the CLI set the root logger to INFO), plus torch.onnx's torchvision notices (torch resets
its loggers on import). The demo's own bound is in tests/test_cli_demo.py; here each mechanism, in
a fresh interpreter (logging is process-wide), on the loggers the libraries really use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = """
import logging, sys
from kandinsky_trt.runtime.cli import console
console.configure(verbose=sys.argv[1] == "1")
import torch, onnx_ir, diffusers.utils.logging as dl  # torch re-configures its loggers here
console.quiet_libraries()  # what the export commands do after their imports
logging.getLogger("onnx_ir.passes.common.initializer_deduplication").info("Replaced initializer 'a' with 'b'")
logging.getLogger("onnxscript.rewriter").info("The value 'start' is not 0.")
logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed")
dl.get_logger("diffusers.models.modeling_utils").warning("install accelerate")
logging.getLogger("kandinsky_trt.export.artifacts").info("[1/8] prior")
logging.getLogger("kandinsky_trt.export.artifacts").debug("exported prior -> staging")
if dl.is_progress_bar_enabled():  # diffusers' "Loading pipeline components" bars
    print("Loading pipeline components bar", file=sys.stderr)
"""


def _stderr(verbose: bool) -> list[str]:
    from kandinsky_trt.runtime.cli.console import QUIET_ENVIRONMENT

    # A new user's environment: without the switches an in-process ``main`` of another test has set here.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    done = subprocess.run([sys.executable, "-c", PROGRAM, "1" if verbose else "0"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip().splitlines()


def test_only_our_progress_without_verbose():
    assert _stderr(verbose=False) == ["[1/8] prior"]


@pytest.mark.parametrize("chatter", ["Replaced initializer", "is not 0", "torchvision", "accelerate",
                                     "exported prior -> staging", "Loading pipeline components"])
def test_verbose_shows_everything(chatter, verbose_stderr):
    assert any(chatter in line for line in verbose_stderr)


@pytest.fixture(scope="module")
def verbose_stderr():
    return _stderr(verbose=True)


def test_library_use_keeps_its_own_logging():
    """Outside the command line (``configure`` never called) nothing is lowered: a library user's
    logging configuration is theirs."""
    code = ("import logging; from kandinsky_trt.runtime.cli import console; console.quiet_libraries(); "
            "print(logging.getLogger('torch').level, logging.getLogger('onnx_ir').level)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "0"]


def test_a_tiny_dynamo_export_prints_its_progress_only(tiny_checkpoint, tmp_path):
    """The issue's reproduction: ``kandinsky-trt export`` of a tiny network with the default (dynamo)
    exporter printed hundreds of optimizer lines per graph; now its progress and parity only."""
    from kandinsky_trt.runtime.cli.console import QUIET_ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    argv = [sys.executable, "-m", "kandinsky_trt.runtime.cli.main", "export", "--prior", str(tiny_checkpoint.prior),
            "--decoder", str(tiny_checkpoint.decoder), "--out", str(tmp_path / "a"), "--height", "64", "--width", "64",
            "--networks", "prior", "--verify"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert err[0] == "[1/1] prior" and any("parity: prior" in line for line in err) and len(err) <= 6, err
    assert not [line for line in done.stdout.splitlines() if "[torch.onnx]" in line]
