"""English prose for the LLM task: 20 calibration and 40 evaluation paragraphs that never overlap, 20 selection
paragraphs the budget search compares configurations on (``select_texts``), and 40 confirmation paragraphs
(``confirm_texts``) that no choice was made on.

There is no dataset download; the paragraphs are the prose paragraphs of the Python standard library's
docstrings (read with ``ast``, nothing imported), harvested once by ``python -m onnxpress.models.llm_text``
and committed as ``data/llm_calibration.txt`` and ``data/llm_eval.txt`` (one paragraph per line), so the
figures do not depend on the Python version that runs them. A paragraph is kept when it reads as prose:
40-160 words, starts with a capital, ends with a full stop, and has no code markers (``>>>``, ``=``,
braces, underscores, dotted names, URLs). Duplicates (same 8-word run) are dropped before the seeded split,
so no calibration paragraph shares a sentence with an evaluation paragraph.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from onnxpress.models import common

CALIBRATION_FILE = "llm_calibration.txt"
EVAL_FILE = "llm_eval.txt"
# 40 more paragraphs that no choice in onnxpress was ever made on: a recipe picked while looking at the
# evaluation paragraphs (e.g. a GPTQ dampening) is confirmed here
CONFIRM_FILE = "llm_confirm.txt"
# 20 paragraphs the budget search compares configurations on: text the passes did not calibrate on (GPTQ/AWQ fit
# the calibration paragraphs, whose perplexity increase under-states the held-out one ~3x on SmolLM2)
SELECT_FILE = "llm_select.txt"
N_CALIBRATION = 20
N_EVAL = 40
N_CONFIRM = 40
N_SELECT = 20
SHINGLE = 8  # words: two paragraphs sharing a run this long count as overlapping

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}
_CODE = re.compile(r"[_=<>{}\[\]`|\\#@*$~^]|\(\)|\.\.\.|>>>|\w\.\w|https?:|[A-Z]{4,}|\d{3,}")


def calibration_texts() -> list[str]:
    return common.read_lines(CALIBRATION_FILE)


def eval_texts() -> list[str]:
    return common.read_lines(EVAL_FILE)


def confirm_texts() -> list[str]:
    return common.read_lines(CONFIRM_FILE)


def select_texts() -> list[str]:
    return common.read_lines(SELECT_FILE)


def token_ids(tokenizer, texts: Sequence[str], max_tokens: int = 256) -> list[list[int]]:
    """Token ids per paragraph as the tokenizer makes them by default (its own special tokens, if any), cut
    at ``max_tokens``."""
    return [list(tokenizer(text)["input_ids"])[:max_tokens] for text in texts]


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(0, len(words) - n + 1))}


# -- harvesting (run by hand; the output is committed) --------------------------------------------------------
def paragraphs_of(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", "-", "*", ":")) for line in lines[1:] if line.strip()):
            continue  # indented blocks, bullet lists and field lists are not prose
        flat = " ".join(para.split())
        words = flat.split()
        if not 40 <= len(words) <= 160 or not flat[0].isupper() or not flat.endswith("."):
            continue
        if _CODE.search(flat) or sum(c.isalpha() or c in " ,.;:'-()" for c in flat) / len(flat) < 0.97:
            continue
        out.append(flat)
    return out


def harvest(lib: Path | None = None) -> list[str]:
    lib = lib or Path(sysconfig.get_paths()["stdlib"])
    seen: set[tuple[str, ...]] = set()
    result = []
    for path in sorted(lib.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(lib).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in paragraphs_of(ast.get_docstring(node) or ""):
                    keys = shingles(para)
                    if keys & seen:
                        continue
                    seen |= keys
                    result.append(para)
    return result


def main() -> None:  # pragma: no cover - run by hand
    paras = harvest()
    random.Random(0).shuffle(paras)
    if len(paras) < N_CALIBRATION + N_EVAL + N_CONFIRM + N_SELECT:
        raise SystemExit(f"only {len(paras)} prose paragraphs found")
    head = "# {} paragraphs (onnxpress.models.llm_text): Python 3.11 standard-library docstring prose, seeded split\n"
    end = N_CALIBRATION + N_EVAL
    parts = ((CALIBRATION_FILE, "LLM calibration", paras[:N_CALIBRATION]), (EVAL_FILE, "LLM evaluation", paras[N_CALIBRATION:end]),
             (CONFIRM_FILE, "LLM confirmation", paras[end : end + N_CONFIRM]),
             (SELECT_FILE, "LLM selection", paras[end + N_CONFIRM : end + N_CONFIRM + N_SELECT]))
    for name, what, part in parts:
        (common.DATA_DIR / name).write_text(head.format(what) + "\n".join(part) + "\n", encoding="utf-8")
    print(f"{len(paras)} paragraphs harvested; wrote {N_CALIBRATION} + {N_EVAL} + {N_CONFIRM} + {N_SELECT}")


if __name__ == "__main__":  # pragma: no cover
    main()
