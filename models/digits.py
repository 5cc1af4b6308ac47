"""Digits classifiers: an MLP and a small CNN trained on scikit-learn's bundled 8x8 digits (seeded).

Data: ``sklearn.datasets.load_digits`` (1797 images, 10 classes), pixels scaled to [0, 1], a stratified
75/25 split with a fixed seed: 1347 training images, 450 held-out images.  Calibration feeds come from
the training split, evaluation feeds are the held-out split.

Models (input ``input``: float32 [batch, 64] for the MLP, [batch, 1, 8, 8] for the CNN; output ``logits``
[batch, 10]; dynamic batch):

- ``mlp``: Linear 64-256-256-10 with ReLU.
- ``cnn``: three 3x3 convolutions (32, 64, 64 channels) with BatchNorm and ReLU, a 2x2 max-pool after the
  second, then Linear 1024-128-10.

Task metric: top-1 accuracy on the held-out split; ``accuracy_drop`` is the fp32 model's accuracy minus
the candidate's, ``agreement`` the share of images whose predicted class equals the fp32 model's.

Run as a script to build both and print their scores: ``python -m onnxpress.models digits``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.models import common

VERSION = 1
KINDS = ("mlp", "cnn")
SEED = 0
EPOCHS = {"mlp": 40, "cnn": 20}
BATCH = 64
INPUT = "input"
OUTPUT = "logits"
FP32_MIN_ACCURACY = 0.95


@functools.lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown digits model kind '{kind}' (valid: {', '.join(KINDS)})")
    return kind


def _shape(kind: str, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 64) if kind == "mlp" else x.reshape(len(x), 1, 8, 8)


def make_module(kind: str):
    """A freshly initialised (untrained) module of the given kind."""
    import torch
    from torch import nn

    _check_kind(kind)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input name
            return self.head(self.features(input))

    return DigitsCNN()


def _train(kind: str) -> tuple[Any, dict]:
    import torch

    common.seed_everything(SEED)
    x_train, y_train, _, _ = _split()
    module = make_module(kind)
    x = torch.from_numpy(_shape(kind, x_train))
    y = torch.from_numpy(y_train)
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3, weight_decay=1e-4)
    epochs = EPOCHS[kind]
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    module.train()
    with common.Timer() as timer, common.torch_threads(1):  # tiny layers: one thread beats two on a busy machine
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), BATCH):
                idx = order[i : i + BATCH]
                loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    module.eval()
    return module, {"train_seconds": round(timer.seconds, 2), "epochs": epochs, "final_loss": float(loss.detach())}


def module(kind: str = "mlp", cache_dir: str | os.PathLike | None = None):
    """The trained torch module (trained once, then loaded from the cached checkpoint)."""
    import torch

    _check_kind(kind)
    path = common.cache_dir(cache_dir) / f"digits-{kind}-v{VERSION}.pt"

    def build(p: Path) -> None:
        trained, info = _train(kind)
        common.atomic_write(p, lambda tmp: torch.save({"state_dict": trained.state_dict(), "info": info}, tmp))

    common.cached(path, build)
    net = make_module(kind)
    net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return net.eval()


def example_inputs(kind: str = "mlp", batch: int = 4):
    import torch

    _, _, x_test, _ = _split()
    return (torch.from_numpy(_shape(kind, x_test[:batch]).copy()),)


def build(kind: str = "mlp", cache_dir: str | os.PathLike | None = None) -> Path:
    """The fp32 ONNX model of the trained classifier (cached); ``<name>.json`` beside it holds its figures."""
    _check_kind(kind)
    path = common.cache_dir(cache_dir) / f"digits-{kind}-v{VERSION}.onnx"

    def build_onnx(p: Path) -> None:
        from onnxpress.export import export

        with common.Timer() as total:
            net = module(kind, cache_dir)
            with common.Timer() as t_export:
                model = export(net, example_inputs(kind), input_names=[INPUT], output_names=[OUTPUT], dynamic_axes_by_name={INPUT: {0: "batch"}})
        accuracy = _accuracy(model, kind)
        checkpoint = p.with_suffix(".pt")
        import torch

        train_info = torch.load(checkpoint, weights_only=True)["info"]
        info = {
            "model": f"digits-{kind}",
            "parameters": common.parameter_count(net),
            "accuracy": accuracy,
            "export_seconds": round(t_export.seconds, 2),
            "build_seconds": round(total.seconds, 2),
            **train_info,
            **common.versions(),
        }
        common.save_json(info, p.with_suffix(".json"))
        common.save_onnx(model, p)

    return common.cached(path, build_onnx)


def calibration_feeds(kind: str = "mlp", n: int = 64, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """``n`` training images (disjoint from evaluation) in batches, seeded order."""
    x_train, _, _, _ = _split()
    order = np.random.default_rng(SEED).permutation(len(x_train))[:n]
    return common.batches({INPUT: _shape(_check_kind(kind), x_train[order])}, batch_size)


def evaluation_feeds(kind: str = "mlp", batch_size: int = 150) -> list[dict[str, np.ndarray]]:
    """The 450 held-out images, in order, in batches."""
    _, _, x_test, _ = _split()
    return common.batches({INPUT: _shape(_check_kind(kind), x_test)}, batch_size)


def evaluation_labels() -> np.ndarray:
    return _split()[3]


def predict(model_or_path: Any, kind: str | None = None) -> np.ndarray:
    """Predicted classes of the held-out images."""
    kind = kind or infer_kind(model_or_path)
    logits = np.concatenate(common.run_feeds(model_or_path, evaluation_feeds(kind), OUTPUT))
    return logits.argmax(axis=-1)


def _accuracy(model_or_path: Any, kind: str) -> float:
    return float(np.mean(predict(model_or_path, kind) == evaluation_labels()))


def infer_kind(model_or_path: Any) -> str:
    """``mlp`` for a rank-2 input, ``cnn`` for a rank-4 input."""
    session = common.session_for(model_or_path)
    rank = len(session.get_inputs()[0].shape)
    return {2: "mlp", 4: "cnn"}.get(rank) or _raise_kind(rank)


def _raise_kind(rank: int) -> str:
    raise ValueError(f"not a digits model: input rank {rank} (expected 2 for mlp or 4 for cnn)")


def evaluate(model_or_path: Any, kind: str | None = None, reference: Any = None) -> dict[str, float]:
    """Top-1 accuracy on the held-out split; drop and agreement against ``reference`` (default: the fp32 build)."""
    kind = kind or infer_kind(model_or_path)
    labels = evaluation_labels()
    pred = predict(model_or_path, kind)
    ref_pred = predict(build(kind) if reference is None else reference, kind)
    accuracy = float(np.mean(pred == labels))
    ref_accuracy = float(np.mean(ref_pred == labels))
    return {
        "accuracy": accuracy,
        "accuracy_drop": ref_accuracy - accuracy,
        "agreement": float(np.mean(pred == ref_pred)),
        "reference_accuracy": ref_accuracy,
        "samples": int(len(labels)),
    }


def main() -> None:  # pragma: no cover - a script entry point
    for kind in KINDS:
        path = build(kind)
        info = common.build_info(path)
        print(f"digits-{kind}: {path} {path.stat().st_size / 1e6:.3f} MB, {info['parameters']:,} params, "
              f"accuracy {info['accuracy']:.4f}, train {info['train_seconds']} s, export {info['export_seconds']} s")

