"""Harvest English sentences from the docstrings of a fixed list of Python standard-library modules.

Run once to (re)create the docstring part of ``data/minilm_eval.txt`` and ``data/minilm_calibration.txt``:
``python -m onnxpress.models.harvest_sentences``.  The output is committed, so the data do not depend on
the Python version that runs the tests.  Docstrings are read with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from pathlib import Path

MODULES = [
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email/message",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html/parser", "http/client", "http/cookiejar", "imaplib", "inspect", "ipaddress",
    "json/decoder", "json/encoder", "locale", "logging/__init__", "logging/handlers", "mailbox", "mimetypes",
    "multiprocessing/pool", "netrc", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "queue", "random", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle", "typing", "unittest/case",
    "urllib/parse", "urllib/request", "uuid", "warnings", "wave", "weakref", "webbrowser", "zipfile",
]

_BAD = re.compile(r"[_=<>{}\[\]`|\\#@*$]|\(\)|\.\.\.|>>>|\w\.\w|https?:|[A-Z]{4,}")


def _docstrings(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def sentences_of(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sent.split()
            if not 7 <= len(words) <= 32 or not sent[0].isupper() or not sent.endswith("."):
                continue
            if _BAD.search(sent) or sum(c.isalpha() or c == " " for c in sent) / len(sent) < 0.93:
                continue
            out.append(sent)
    return out


def harvest(lib: Path | None = None) -> list[str]:
    lib = lib or Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    result = []
    for name in MODULES:
        path = lib / f"{name}.py"
        if not path.exists():
            continue
        for doc in _docstrings(path):
            for sent in sentences_of(doc):
                key = sent.lower()
                if key not in seen:
                    seen.add(key)
                    result.append(sent)
    return result


def main() -> None:  # pragma: no cover - run by hand
    sents = harvest()
    rng = random.Random(0)
    rng.shuffle(sents)
    print(f"{len(sents)} sentences")
    for s in sents:
        print(s)


if __name__ == "__main__":  # pragma: no cover
    main()
