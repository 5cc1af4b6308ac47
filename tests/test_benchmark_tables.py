"""benchmarks/run_all.py reads every committed result table: each benchmark's headline is found (a table whose
format drifted would silently lose its headline in RESULTS.md), and the quick run skips the LLM benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402


@pytest.mark.parametrize("name", [n for n in run_all.BENCHMARKS if (BENCH / "results" / f"{n}.md").exists()])
def test_every_committed_table_has_its_headline(name):
    text = (BENCH / "results" / f"{name}.md").read_text()
    line = run_all.headline(name, text)
    assert not line.startswith("(no headline"), name
    assert any(ch.isdigit() for ch in line)


def test_the_quick_run_skips_the_llm_benchmarks():
    assert all(run_all.BENCHMARKS[n][2] is None for n in ("llm_int4", "llm_budget", "llm_scale"))
    assert all(args is not None for n, (_, _, args) in run_all.BENCHMARKS.items() if not n.startswith("llm"))
