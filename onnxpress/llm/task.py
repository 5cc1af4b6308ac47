"""The LLM task for any causal-LM ONNX decoder with a KV cache: perplexity on held-out token ids and
greedy-generation agreement with a reference model.

- ``perplexity``: each sequence is one prefill with an empty past (``kv.prefill_feeds``); the mean negative
  log-likelihood of every next token (positions 1..n-1) over all sequences, exponentiated.
- ``greedy``: a prefill of the prompt, then single-token decode steps that feed ``present`` back
  (``kv.decode_feeds``): the first ``new_tokens`` argmax tokens.
- ``greedy_agreement``: per prompt, the length of the common prefix of the model's and the reference's
  greedy tokens divided by ``new_tokens`` (after the first difference the two continue different texts,
  so later matches mean nothing), averaged over prompts; 1.0 = identical generations.

Models may be ``ir.Model``s, paths, or anything with ``run(names, feeds)`` and ``get_inputs()`` (an
onnxruntime session, or the budget's ``OverrideSession``), so a search can score a configuration without
writing a model. The reference's figures can be computed once (``reference_figures``) and passed instead
of the reference model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpress.errors import UsageError
from onnxpress.llm import kv

KEYS = ("perplexity", "reference_perplexity", "ppl_increase_rel", "greedy_agreement")


@dataclasses.dataclass(frozen=True)
class LLMData:
    """Held-out token ids: ``sequences`` for perplexity, ``prompts`` for greedy generation."""

    sequences: tuple[tuple[int, ...], ...]
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: int = 16

    @classmethod
    def from_ids(cls, sequences: Sequence[Sequence[int]], prompt_tokens: int = 16, new_tokens: int = 16, n_prompts: int | None = None) -> LLMData:
        """Perplexity on every sequence; greedy prompts = the first ``prompt_tokens`` of each (or of the first ``n_prompts``)."""
        seqs = tuple(tuple(int(t) for t in s) for s in sequences)
        short = [i for i, s in enumerate(seqs) if len(s) < 2]
        if not seqs or short:
            raise UsageError(f"perplexity needs sequences of at least 2 tokens (sequence {short[0] if short else 0} is shorter)")
        prompts = tuple(s[:prompt_tokens] for s in seqs[: n_prompts if n_prompts is not None else len(seqs)])
        return cls(seqs, prompts, new_tokens)


@dataclasses.dataclass(frozen=True)
class ReferenceFigures:
    """A reference model's results on an ``LLMData``: computed once, compared with many candidates."""

    perplexity: float
    greedy: tuple[tuple[int, ...], ...]


def _session(model: Any) -> Any:
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return model
    from onnxpress import runtime

    return runtime.make_session(model)


def _spec(session: Any, model: Any) -> kv.KVSpec:
    """The KV layout: from the model when we have it, else from a session-like object's input/output list."""
    import onnx_ir as ir

    if isinstance(model, ir.Model) or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return kv.kv_spec(model)
    return kv.spec_from_session(session)


def nll(model: Any, sequences: Sequence[Sequence[int]], spec: kv.KVSpec | None = None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens)."""
    session = _session(model)
    spec = spec or _spec(session, model)
    total, count = 0.0, 0
    for seq in sequences:
        ids = np.asarray(seq, np.int64)
        logits = kv.run_step(session, spec, kv.prefill_feeds(spec, ids))[spec.logits][0, :-1]
        total += float((_logsumexp(logits) - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return total, count


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, in float64, without a float64 copy of the [seq, vocab] logits: the budget
    search scores ~100 configurations on 40 paragraphs x 49152 logits each, and the earlier float64
    log-softmax of the whole matrix was 170 s of a SmolLM2 budget run (11% of its perplexity time); this is
    ~4x faster (0.58 -> 0.15 s per 128 x 49152 matrix on the shared machine)."""
    peak = logits.max(axis=-1, keepdims=True)
    work = np.subtract(logits, peak, dtype=np.float32)
    np.exp(work, out=work)
    return np.log(work.sum(axis=-1, dtype=np.float64)) + peak[:, 0]


def perplexity(model: Any, sequences: Sequence[Sequence[int]], spec: kv.KVSpec | None = None) -> float:
    total, count = nll(model, sequences, spec)
    return float(np.exp(total / count))


def greedy(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int, spec: kv.KVSpec | None = None) -> list[list[int]]:
    """The first ``new_tokens`` greedy tokens after each prompt (prefill + decode steps with the KV cache)."""
    session = _session(model)
    spec = spec or _spec(session, model)
    result = []
    for prompt in prompts:
        out = kv.run_step(session, spec, kv.prefill_feeds(spec, np.asarray(prompt, np.int64)))
        tokens: list[int] = []
        while True:
            token = int(np.argmax(out[spec.logits][0, -1]))
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
            out = kv.run_step(session, spec, kv.decode_feeds(spec, np.array([[token]]), out))
        result.append(tokens)
    return result


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Mean share of the reference's greedy tokens matched before the first difference."""
    if len(tokens) != len(reference) or not reference:
        raise ValueError("agreement needs one generation per reference generation")
    shares = []
    for a, b in zip(tokens, reference):
        same = 0
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
        shares.append(same / len(b))
    return float(np.mean(shares))


def reference_figures(reference: Any, data: LLMData, spec: kv.KVSpec | None = None) -> ReferenceFigures:
    session = _session(reference)
    spec = spec or _spec(session, reference)
    return ReferenceFigures(perplexity(session, data.sequences, spec), tuple(tuple(g) for g in greedy(session, data.prompts, data.new_tokens, spec)))


def evaluate(model: Any, reference: Any, data: LLMData, spec: kv.KVSpec | None = None) -> dict[str, float]:
    """``perplexity``, ``reference_perplexity``, ``ppl_increase_rel`` (ppl / reference ppl - 1) and
    ``greedy_agreement`` of ``model`` against ``reference`` (a model, a session or ``ReferenceFigures``).

    ``spec`` (``kv.kv_spec(model)``) is needed only when ``model`` is a session of a graph whose head size
    is a symbolic dim; a compressed model keeps its inputs, so the original's spec serves every candidate."""
    ref = reference if isinstance(reference, ReferenceFigures) else reference_figures(reference, data, spec)
    session = _session(model)
    spec = spec or _spec(session, model)
    ppl = perplexity(session, data.sequences, spec)
    tokens = greedy(session, data.prompts, data.new_tokens, spec) if data.prompts else []
    return {
        "perplexity": ppl,
        "reference_perplexity": ref.perplexity,
        "ppl_increase_rel": ppl / ref.perplexity - 1.0,
        "greedy_agreement": agreement(tokens, ref.greedy) if data.prompts else 1.0,
    }
