"""The root of the project's exceptions, so the CLI can tell user errors from bugs.

Every error a user can cause (bad arguments, missing or mismatched artifacts) derives from
:class:`KandinskyTrtError`; the CLI prints its message without a traceback.
"""


class KandinskyTrtError(Exception):
    """Base class: the message names the argument, what was expected and what was found."""


USER_ERRORS = (KandinskyTrtError,)
