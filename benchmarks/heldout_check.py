"""Held-out check of MiniLM pipelines on sentences no search, calibration or evaluation has seen.

The budget search verifies its result on the task's 250 evaluation sentences, the same ones the benchmark
reports, and ``embedding_split`` keeps the embedding rows of the calibration text at 4 bits: both could fit
their data. This script harvests up to 400 new sentences from the docstrings of other standard-library modules
(the same filter as ``onnxpress.models.harvest_sentences``; sentences in either data file are dropped),
builds each pipeline with the benchmarks' 512 calibration sentences and reports the embedding cosine against
fp32 on them, next to the evaluation set's.

    .venv/bin/python benchmarks/heldout_check.py "strip-metadata,qdq(mode=int4,embedding_split=true)" [PIPELINE ...]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qdq_bench import ours, size_mb  # noqa: E402

from onnxpress.models import harvest_sentences, minilm  # noqa: E402
from onnxpress.passes import quant_math as qm  # noqa: E402

OTHER_MODULES = [  # standard-library modules not in harvest_sentences.MODULES
    "codecs", "doctest", "sqlite3/__init__", "zipimport", "xml/dom/minidom", "pydoc", "ssl", "tkinter/__init__", "pstats", "profile",
    "sysconfig", "trace", "concurrent/futures/_base", "asyncio/streams", "asyncio/base_events", "email/utils", "http/server",
    "xmlrpc/client", "importlib/__init__", "ast", "code", "cmd", "codeop", "compileall", "filecmp", "hashlib", "io", "linecache",
    "modulefinder", "operator", "plistlib", "py_compile", "quopri", "runpy", "signal", "site", "stat", "symtable", "tabnanny", "token",
    "tracemalloc", "zipapp", "asyncio/queues", "asyncio/locks", "asyncio/subprocess", "email/headerregistry", "email/policy",
    "unittest/mock", "urllib/robotparser", "xml/etree/ElementTree",
]


def heldout_sentences(limit: int = 400) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    data = Path(minilm.__file__).parent / "data"
    known = {s.lower() for f in ("minilm_calibration.txt", "minilm_eval.txt") for s in (data / f).read_text(encoding="utf-8").splitlines()}
    out: list[str] = []
    for name in OTHER_MODULES:
        path = lib / f"{name}.py"
        if not path.exists():
            continue
        for doc in harvest_sentences._docstrings(path):
            for sentence in harvest_sentences.sentences_of(doc):
                if sentence.lower() not in known:
                    known.add(sentence.lower())
                    out.append(sentence)
    return out[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--calibration-sentences", type=int, default=512)
    args = parser.parse_args()
    sentences = heldout_sentences()
    feeds = minilm._feeds(sentences, 32)
    src = Path(minilm.build())
    ref = minilm.embed(str(src), feeds)
    cal = minilm.calibration_feeds(args.calibration_sentences)
    tokens = np.concatenate([f["input_ids"][f["attention_mask"] > 0] for f in feeds])
    used = qm.used_rows([f["input_ids"] for f in cal], 30522)
    print(f"{len(sentences)} held-out sentences; {np.isin(tokens, used).mean():.1%} of their tokens occur in the calibration text")
    print("| pipeline | MB | held-out mean cos | held-out min cos | held-out NN | evaluation-set mean cos |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="heldout-") as tmp:
        for text in args.pipelines:
            out = ours(text, src, cal, Path(tmp) / "model.onnx")
            held = minilm.compare_embeddings(minilm.embed(str(out), feeds), ref)
            evaluation = minilm.evaluate(str(out))
            print(f"| `{text}` | {size_mb(out):.3f} | {held['mean_cos']:.5f} | {held['min_cos']:.4f} | {held['nn_agreement']:.1%} | {evaluation['mean_cos']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
