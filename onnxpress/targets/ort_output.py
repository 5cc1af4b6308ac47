"""Keeping onnxruntime's own output off the user's terminal, and its errors to one line.

onnxruntime's C++ logger writes to file descriptor 2 and its Python tools print to stdout and log at INFO;
the CUDA probe reads what the logger said (the reason a provider did not start), the mobile tools discard it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what native code (onnxruntime's C++ logger) writes to file descriptor 2; the yielded list
    holds the text once the block has ended."""
    captured: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as buf:
        saved = os.dup(2)
        os.dup2(buf.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            captured.append(buf.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def quiet_ort_tools() -> Iterator[None]:
    """The converter prints to stdout and logs at INFO; keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "ort_format_model")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` for the block (onnxruntime's converter reads its optimization level there)."""
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def one_line(exc: BaseException) -> str:
    """An onnxruntime error as one short line, without its status prefix and temporary paths."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:\s*", "", text)
    return text[:400] or type(exc).__name__
