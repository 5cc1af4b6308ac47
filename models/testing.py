"""pytest fixtures for the real models, for any test folder: ``from onnxpress.models.testing import *``
in a conftest.py (or import the names you need).

Each fixture builds (or loads from the cache) its fp32 ONNX model once per test session and returns its
path; with pytest-xdist, workers share the on-disk cache and a file lock makes the build happen once.
Building: digits-mlp ~10 s, digits-cnn ~30 s, minilm ~30 s, lm ~30-70 s (first run only; then cached).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits_mlp_path() -> Path:
    from onnxpress.models import digits

    return digits.build("mlp")


@pytest.fixture(scope="session")
def digits_cnn_path() -> Path:
    from onnxpress.models import digits

    return digits.build("cnn")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from onnxpress.models import minilm

    return minilm.build()


@pytest.fixture(scope="session")
def lm_path() -> Path:
    from onnxpress.models import lm

    return lm.build()


__all__ = ["digits_cnn_path", "digits_mlp_path", "lm_path", "minilm_path"]
