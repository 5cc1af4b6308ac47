"""The data of one run: what lossy passes and the budget search may fit to (calibration) and what every
verdict is computed on (evaluation). They are different sets.

- ``evaluation`` given (``--inputs`` / ``evaluation=``): it is the evaluation set; all of ``calibration`` is fit data.
- only ``calibration`` given: it is split by sample, deterministically (seeded permutation): ``holdout``
  (default 25%, at least 8 samples) is held out for evaluation and never reaches a pass. Which samples went
  where is in the report.
- a built-in task and no data: the task's own calibration and evaluation sets (disjoint by construction).
- nothing: generated random inputs, the last resort; every report says so next to the verdict.

A *sample* is one row of a batch when the arrays' leading axis is the model's batch axis (an ``.npz`` whose
arrays have the model inputs' rank), or one whole feed (arrays one rank higher, ``input_*.pb`` sets, a list
of feeds given to the API).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress import data as data_mod
from onnxpress.errors import UsageError

Feed = dict[str, np.ndarray]

DEFAULT_HOLDOUT = 0.25
MIN_HOLDOUT_SAMPLES = 8
MIN_SIDE = 2
BATCH_SIZE = 8


@dataclasses.dataclass
class Samples:
    """Samples as feeds; ``batchable``: each feed is one batch row and same-shaped neighbours may be stacked."""

    feeds: list[Feed]
    batchable: bool
    source: str

    def __len__(self) -> int:
        return len(self.feeds)

    def subset(self, indices: Sequence[int]) -> Samples:
        return Samples([self.feeds[i] for i in indices], self.batchable, self.source)

    def batches(self, batch_size: int = BATCH_SIZE) -> list[Feed]:
        """Feeds for onnxruntime: consecutive same-shaped rows stacked into batches of ``batch_size``."""
        if not self.batchable:
            return list(self.feeds)
        out: list[Feed] = []
        group: list[Feed] = []

        def flush() -> None:
            if group:
                out.append({k: np.concatenate([g[k] for g in group], axis=0) if np.ndim(group[0][k]) else group[0][k] for k in group[0]})
                group.clear()

        for feed in self.feeds:
            if group and (len(group) >= batch_size or _shapes(group[0]) != _shapes(feed)):
                flush()
            group.append(feed)
        flush()
        return out


def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    return {k: np.shape(v) for k, v in feed.items()}


@dataclasses.dataclass
class RunData:
    """Calibration (fit) and evaluation (verdict) data of one run, and where each came from."""

    calibration: list[Feed] | None
    evaluation: list[Feed] | None  # None: generate inputs at validation time (``dims``)
    evaluation_source: str
    calibration_source: str = ""
    generated: bool = False
    split: dict[str, Any] | None = None  # seed, fraction, the sample indices on each side

    def describe(self) -> str:
        return self.evaluation_source

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration_source or None,
            "calibration_feeds": len(self.calibration) if self.calibration is not None else 0,
            "evaluation": self.evaluation_source,
            "evaluation_feeds": len(self.evaluation) if self.evaluation is not None else 0,
            "generated": self.generated,
            "split": self.split,
        }


def holdout_count(n: int, holdout: float | int | None) -> int:
    """How many of ``n`` samples to hold out: a fraction (default 25%, at least 8) or a count.

    Raises UsageError when either side would keep fewer than 2 samples."""
    if holdout is None:
        count = max(math.ceil(DEFAULT_HOLDOUT * n), MIN_HOLDOUT_SAMPLES)
        count = min(count, n - MIN_SIDE)
    elif isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise UsageError(f"--holdout {holdout}: a fraction must be between 0 and 1 (or give a sample count)")
        count = math.ceil(holdout * n)
    else:
        count = int(holdout)
    if count < MIN_SIDE or n - count < MIN_SIDE:
        raise UsageError(
            f"calibration data has {n} sample(s): holding out {count} leaves fewer than {MIN_SIDE} on one side; "
            "give more calibration samples or separate evaluation data (--inputs)"
        )
    return count


def parse_holdout(text: str | float | int | None) -> float | int | None:
    """``--holdout`` text: ``0.25`` (a fraction) or ``16`` (a sample count)."""
    if text is None or isinstance(text, (int, float)):
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--holdout expects a fraction (0.25) or a sample count (16), got '{text}'") from None
    if value == 0:  # no hold-out (the old behaviour, as --help says): prepare() labels the verdict as on fitted data
        return 0
    if value.is_integer() and value >= 1:
        return int(value)
    if not 0.0 < value < 1.0:
        raise UsageError(f"--holdout {text}: a fraction must be between 0 and 1 (or give a sample count)")
    return value


def split_indices(n: int, holdout: float | int | None, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, held-out) sample indices, each sorted: a seeded permutation, so the same data splits the same way."""
    count = holdout_count(n, holdout)
    order = np.random.default_rng(seed).permutation(n)
    held = sorted(int(i) for i in order[:count])
    fit = sorted(int(i) for i in order[count:])
    return fit, held


def load_samples(value: Any, model: ir.Model, what: str) -> Samples:
    """Samples from a path (.npz with a leading sample axis, folder of .npz or input_*.pb sets), a list of
    feeds (each one sample), or a dict of arrays with a leading sample axis."""
    if isinstance(value, Samples):
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(f, dict) for f in value):
            raise UsageError(f"{what}: expected a non-empty list of feeds (dicts of input name -> array)")
        for f in value:
            data_mod.check_feeds(f, model, where=what)
        return Samples(list(value), False, f"{len(value)} feeds given")
    if isinstance(value, dict):
        return _from_arrays(value, model, what, what)
    path = Path(os.fspath(value))
    if not path.exists():
        raise UsageError(f"{path}: {what} data not found")
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        if npz:
            feeds: list[Feed] = []
            batchable = True
            for f in npz:
                part = load_samples(f, model, what)
                feeds.extend(part.feeds)
                batchable = batchable and part.batchable
            return Samples(feeds, batchable, str(path))
        sets = sorted(d for d in path.iterdir() if d.is_dir() and list(d.glob("input_*.pb")))
        if list(path.glob("input_*.pb")):
            sets = [path]
        if not sets:
            raise UsageError(f"{path}: folder holds no .npz files and no input_*.pb test-data sets")
        return Samples([data_mod.load_feeds(d, model) for d in sets], False, str(path))  # type: ignore[misc]
    if path.suffix != ".npz":
        raise UsageError(f"{path}: {what} data must be an .npz file or a folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UsageError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    return _from_arrays(arrays, model, str(path), what)


def load_calibration(path: str | os.PathLike, model: ir.Model, batch_size: int = BATCH_SIZE) -> list[Feed]:
    """All of a calibration file or folder as onnxruntime feeds (batches of ``batch_size`` rows; no hold-out)."""
    return load_samples(path, model, "calibration").batches(batch_size)


def _from_arrays(arrays: dict[str, np.ndarray], model: ir.Model, source: str, what: str) -> Samples:
    data_mod.check_feeds(arrays, model, where=source, sample_axis=True)
    # a 0-d array (e.g. an audio model's sample rate) has no sample axis: every sample shares it
    shared = {k: v for k, v in arrays.items() if np.ndim(v) == 0}
    arrays = {k: v for k, v in arrays.items() if k not in shared}
    if not arrays:
        raise UsageError(f"{source}: {what} data has no array with a sample axis")
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise UsageError(f"{source}: arrays disagree on the number of samples: {sorted(counts)}")
    (n,) = counts
    if n == 0:
        raise UsageError(f"{source}: {what} data holds no samples")
    specs = {s.name: s for s in data_mod.input_specs(model)}
    per_sample = any(spec.shape is not None and arrays[name].ndim == len(spec.shape) + 1 for name, spec in specs.items())
    if per_sample:
        return Samples([{**{k: v[i] for k, v in arrays.items()}, **shared} for i in range(n)], False, source)
    return Samples([{**{k: v[i : i + 1] for k, v in arrays.items()}, **shared} for i in range(n)], True, source)


def prepare(
    model: ir.Model,
    *,
    calibration: Any = None,
    evaluation: Any = None,
    holdout: float | int | None = None,
    task: Any = None,
    seed: int = 0,
) -> RunData:
    """Decide the run's calibration and evaluation data (the rules are in the module docstring).

    ``task``: an object with ``calibration_feeds()`` / ``evaluation_feeds()`` (a built-in task module) used
    when the user gives no data of that kind."""
    calib = load_samples(calibration, model, "calibration") if calibration is not None else None
    if evaluation is not None:
        ev = load_samples(evaluation, model, "evaluation")
        return RunData(
            calibration=calib.batches() if calib is not None else None,
            evaluation=ev.batches(),
            evaluation_source=f"evaluation data ({ev.source}, {len(ev)} samples)",
            calibration_source=f"{calib.source}, {len(calib)} samples" if calib is not None else "",
        )
    if calib is not None:
        if holdout == 0:
            feeds = calib.batches()
            return RunData(feeds, feeds, f"the calibration data itself ({calib.source}, {len(calib)} samples; "
                           "--holdout 0: the verdict is on data the passes fitted to)", f"{calib.source}, {len(calib)} samples")
        fit, held = split_indices(len(calib), holdout, seed)
        return RunData(
            calibration=calib.subset(fit).batches(),
            evaluation=calib.subset(held).batches(),
            evaluation_source=f"held-out part of the calibration data ({len(held)} of {len(calib)} samples of {calib.source}, seed {seed}; no pass saw them)",
            calibration_source=f"{len(fit)} of {len(calib)} samples of {calib.source}",
            split={"seed": seed, "samples": len(calib), "calibration_indices": fit, "evaluation_indices": held},
        )
    if task is not None and hasattr(task, "evaluation_feeds"):
        return RunData(
            calibration=list(task.calibration_feeds()) if hasattr(task, "calibration_feeds") else None,
            evaluation=list(task.evaluation_feeds()),
            evaluation_source=getattr(task, "evaluation_source", "") or f"the task's evaluation data ({getattr(task, '__name__', 'task')})",
            calibration_source=getattr(task, "calibration_source", "") or f"the task's calibration data ({getattr(task, '__name__', 'task')})",
        )
    return RunData(None, None, "generated random inputs (no real data given: the last resort)", generated=True)
