"""Errors the CLI turns into one line on stderr and a non-zero exit (no traceback without --debug)."""


class PipelineError(Exception):
    """Base class: the message is the whole story a user needs."""

    exit_code = 1


class UserError(PipelineError):
    """Bad input: a missing file, an unknown model or target, a bad flag value."""

    exit_code = 2


class UnsupportedModelError(PipelineError):
    """The model uses something the importer cannot convert (the message names the node)."""

    exit_code = 3


class VerificationError(PipelineError):
    """The compiled module disagrees with the reference runtime; nothing is exported."""

    exit_code = 4
