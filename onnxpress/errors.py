"""Errors that onnxpress reports to users as one line, with an exit code."""

from __future__ import annotations


class OnnxpressError(Exception):
    """A failure the user can act on. The CLI prints ``str(error)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class UsageError(OnnxpressError):
    """The user asked for something invalid (unknown pass, bad option, bad path): exit code 2."""

    exit_code = 2


class ModelLoadError(OnnxpressError):
    """The input model cannot be read safely."""


class PassFailedError(OnnxpressError):
    """A pass raised; the message names the pass and the passes that ran before it."""


class ValidationError(OnnxpressError):
    """Validation could not run (no inputs can be made, a provider is missing)."""
