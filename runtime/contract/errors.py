"""The root of the project's exceptions, so the CLI can tell user errors from bugs.

Every error a user can cause (bad arguments, missing or mismatched artifacts) derives from
:class:`KandinskyTrtError`; the CLI prints its message without a traceback and exits 2.
"""

from __future__ import annotations


class KandinskyTrtError(Exception):
    """Base class: the message names the argument, what was expected and what was found."""


class PipelineInputError(KandinskyTrtError, ValueError):
    """A pipeline argument that does not fit the artifacts or diffusers' conventions."""


class NonFiniteOutputError(KandinskyTrtError, ValueError):
    """A stage (a network or a denoising loop) produced NaN or Inf; the message names the stage."""


USER_ERRORS = (KandinskyTrtError,)


def require_finite(array, stage: str, rows: str = "row(s)", cause: str = ""):
    """``array`` unchanged if every value is finite, else :class:`NonFiniteOutputError` naming ``stage``.

    One ``isfinite`` pass per stage boundary (never per step): inputs are validated before any
    network runs, so a non-finite value here was made inside ``stage`` (fp16 overflow, or an
    extreme but finite guidance scale). (numpy is imported here: the manifest and spec modules,
    which import this one, stay standard-library only.)
    """
    import numpy as np

    finite = np.isfinite(array)
    if finite.all():
        return array
    bad = sorted({int(i) for i in np.nonzero(~finite)[0]})
    cause = cause or f"overflow inside {stage}: fp16 range or an extreme guidance_scale?"
    raise NonFiniteOutputError(
        f"{stage}: expected finite output, found {int((~finite).sum())} NaN/Inf values in {rows} {bad} ({cause})")
