"""A user's text or token ids as the LLM task's sequences (the past inputs are the tool's business: ``kv``).

Accepted sources, for ``--calibration`` and ``--eval-data`` with ``--task llm`` (or ``llm_task(...)``):
- ``.txt``: UTF-8 text, tokenized whole with the model folder's tokenizer and cut into windows of
  ``max_tokens`` tokens (the standard perplexity protocol: each window is one prefill with an empty past);
  a last partial window is kept when it holds at least half a window. Text shorter than one window is an error.
- ``.json``: a list of token-id lists (each one sequence, cut at ``max_tokens``).
- ``.npz``: an ``input_ids`` array [sequences, tokens] (nothing else: the tool makes the mask, positions and
  empty past).
- a list of token-id lists (the Python API).

At most ``limit`` sequences are used, evenly spaced over the source (said in the source's description), so a
book-length file does not turn calibration into an hour.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.errors import UsageError

LLM_ONLY_SUFFIXES = (".txt", ".json")  # sources no other task reads (an .npz is feeds elsewhere)


@dataclasses.dataclass(frozen=True)
class TokenData:
    """Sequences of token ids and where they came from, in words."""

    sequences: list[list[int]]
    source: str


def windows(ids: Sequence[int], length: int) -> list[list[int]]:
    """``ids`` cut into consecutive windows of ``length``; a last partial window is kept when it holds at
    least half a window (a short tail would be a sequence with almost no context)."""
    if length < 2:
        raise ValueError("a window needs at least 2 tokens")
    out = [list(ids[i : i + length]) for i in range(0, len(ids), length)]
    if out and len(out[-1]) < max(2, length // 2):
        out.pop()
    return out


def spread(sequences: list[list[int]], limit: int) -> list[list[int]]:
    """At most ``limit`` of ``sequences``, evenly spaced (first and last kept), in order."""
    if len(sequences) <= limit:
        return sequences
    picks = np.unique(np.linspace(0, len(sequences) - 1, limit).round().astype(int))
    return [sequences[i] for i in picks]


def read(value: Any, tokenizer: Any, max_tokens: int, what: str, limit: int, vocab: int | None = None) -> TokenData:
    """The sequences of one source (module docstring); one-line ``UsageError`` for anything unusable."""
    if isinstance(value, (list, tuple)):
        sequences, source = [list(map(int, s))[:max_tokens] for s in value], f"{len(value)} token-id sequences given"
    else:
        path = Path(os.fspath(value))
        if not path.is_file():
            raise UsageError(f"{path}: {what} data not found")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            sequences, source = _from_text(path, tokenizer, max_tokens, what)
        elif suffix == ".json":
            sequences, source = _from_json(path, max_tokens, what)
        elif suffix == ".npz":
            sequences, source = _from_npz(path, max_tokens, what)
        else:
            raise UsageError(f"{path}: {what} data for --task llm must be text (.txt) or token ids (.json, .npz with input_ids)")
    _check(sequences, what, source, vocab)
    picked = spread(sequences, limit)
    if len(picked) < len(sequences):
        source += f"; {len(picked)} of its {len(sequences)} sequences used, evenly spaced"
    return TokenData(picked, source)


def _from_text(path: Path, tokenizer: Any, max_tokens: int, what: str) -> tuple[list[list[int]], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: {what} text is not UTF-8") from None
    ids = list(tokenizer(text, verbose=False)["input_ids"]) if text.strip() else []  # verbose: no "longer than the maximum" warning: we cut windows
    sequences = windows(ids, max_tokens)
    if not sequences:
        raise UsageError(f"{path}: {what} text gives {len(ids)} tokens, shorter than one sequence of {max_tokens} tokens (at least {max_tokens // 2} needed): give more text")
    return sequences, f"{path} ({len(ids)} tokens in {len(sequences)} windows of up to {max_tokens})"


def _from_json(path: Path, max_tokens: int, what: str) -> tuple[list[list[int]], str]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: {what} token ids are not readable JSON ({type(exc).__name__})") from None
    if not isinstance(value, list) or not value or not all(isinstance(s, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in value):
        raise UsageError(f"{path}: {what} token ids must be a JSON list of lists of integers")
    return [s[:max_tokens] for s in value], f"{path} ({len(value)} token-id sequences)"


def _from_npz(path: Path, max_tokens: int, what: str) -> tuple[list[list[int]], str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    ids = arrays.get("input_ids")
    if set(arrays) != {"input_ids"} or ids is None or ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise UsageError(f"{path}: {what} data for --task llm is token ids: an .npz with one integer array 'input_ids' [sequences, tokens] "
                         f"(found {', '.join(f'{k} {v.dtype}{list(v.shape)}' for k, v in arrays.items()) or 'nothing'}); the tool fills the mask and the empty past")
    return [list(map(int, row[:max_tokens])) for row in ids], f"{path} ({ids.shape[0]} token-id sequences)"


def _check(sequences: list[list[int]], what: str, source: str, vocab: int | None) -> None:
    if not sequences:
        raise UsageError(f"{source}: no {what} sequences")
    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise UsageError(f"{source}: {what} sequence {short[0]} has {len(sequences[short[0]])} token(s); perplexity needs at least 2")
    flat = np.fromiter((t for s in sequences for t in s), np.int64)
    if flat.min() < 0 or (vocab is not None and flat.max() >= vocab):
        bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
        raise UsageError(f"{source}: {what} token id {bad} is outside the vocabulary (0..{vocab - 1 if vocab else '?'})")
