"""What the command line shows: this project's progress and results, not third-party chatter.

Without ``--verbose`` only ``kandinsky_trt``'s own loggers speak at INFO; every other library is
held at WARNING, and the advisories that torch, diffusers, transformers, onnxscript and the
Hugging Face hub print on every run (``install accelerate``, weight-loading bars, "Replaced
initializer ..." per graph, torchvision notices) are turned off: their environment switches are
set for this process unless the user set them, and the loggers that libraries configure
themselves when imported are lowered again once the export layer imports them
(:func:`quiet_libraries`). With ``--verbose`` everything is shown, ours at DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

OWN_LOGGER = "kandinsky_trt"
# Switches the libraries read when they are imported; a value the user set wins.
QUIET_ENVIRONMENT = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# Loggers that configure their own level (or handler) at import: lowered after the import.
LIBRARY_LOGGERS = ("torch", "torch.onnx", "onnxscript", "onnx_ir", "diffusers", "transformers", "huggingface_hub")

_state = {"verbose": False, "configured": False}


def configure(verbose: bool) -> None:
    """Set up logging for one command-line run (``main`` calls it once, before any command)."""
    _state.update(verbose=verbose, configured=True)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger(OWN_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Library deprecation and advisory warnings; our own modules' warnings still show.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|diffusers|onnx\w*)\b")
    quiet_libraries()


def quiet_libraries() -> None:
    """Hold the third-party loggers at ERROR (after an import that reset them); no-op with --verbose
    or outside the command line (a library user's logging is theirs)."""
    if _state["verbose"] or not _state["configured"]:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging = sys.modules.get("diffusers.utils.logging")
    if diffusers_logging is not None:  # its "Loading pipeline components" bars heed no environment switch
        diffusers_logging.disable_progress_bar()


def is_verbose() -> bool:
    return _state["verbose"]
