"""A causal LM (a local Hugging Face folder or a GGUF file) -> a folder onnxruntime-genai runs.

The graph is built by onnxruntime-genai's own model builder (``onnxruntime_genai.models.builder``, fp32 by
default): its decoder is what onnxruntime-genai is written for (GroupQueryAttention with the KV cache,
rotary embedding inside the attention node, a tied embedding stored once), so the result loads and
generates there, and it is the peer that onnxpress's own compression is compared with.  The output folder
holds ``genai_config.json``, the tokenizer files, ``model.onnx`` and ``model.onnx.data``.

A GGUF file is first loaded by transformers (``gguf_file=``, weights dequantized to fp32; needs the
``gguf`` and ``accelerate`` packages) and saved as a Hugging Face folder (safetensors + tokenizer) in a
temporary folder; the builder reads that.  The builder runs in a child process, so its memory is returned
when it ends and its output does not mix with ours.  Nothing is fetched from a model hub: transformers and
the builder run with ``HF_HUB_OFFLINE=1``.

The output appears whole or not at all: everything is built in a hidden temporary folder beside the
output and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onnxpress.errors import OnnxpressError, UsageError

GENAI_FILES = ("genai_config.json", "model.onnx", "model.onnx.data")
PRECISIONS = ("fp32", "fp16", "int4", "int8", "bf16")
BUILD_TIMEOUT_S = 3600


@dataclasses.dataclass
class ExportInfo:
    """What an export did: where, how long, and the child process's peak memory."""

    folder: Path
    seconds: float
    load_seconds: float  # GGUF -> HF folder (0 when the input was already an HF folder)
    build_seconds: float
    builder_peak_rss_bytes: int  # the builder child's peak RSS (ru_maxrss of the waited child)
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def offline() -> None:
    """No model hub: transformers and huggingface_hub read local files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def split_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of an HF folder, a .gguf file, or a folder holding one .gguf."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{path}: expected a .gguf file or a Hugging Face model folder")
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise UsageError(f"{path}: several .gguf files ({', '.join(ggufs)}); name the one to use")
    raise UsageError(f"{path}: not a Hugging Face model folder (no config.json) and no .gguf file in it")


def load_causal_lm(source: str | os.PathLike, gguf_file: str | None = None):
    """(torch model in eval mode, tokenizer) from an HF folder or a GGUF file, offline."""
    offline()
    folder, found = split_source(source) if gguf_file is None else (Path(source), gguf_file)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UsageError("loading a causal LM needs transformers: pip install 'onnxpress[models]'") from None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if found:
        kwargs["gguf_file"] = found
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise UsageError(f"{folder}: transformers cannot load a tokenizer: {_one_line(exc)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32", **kwargs)
    except Exception as exc:
        raise UsageError(f"{folder}{'/' + found if found else ''}: transformers cannot load a causal LM: {_one_line(exc)}") from None
    model.eval()
    return model, tokenizer


def save_hf_folder(model: Any, tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Save a loaded model (fp32 safetensors) and its tokenizer as a plain HF folder.

    A GGUF-loaded model carries transformers' gguf quantizer, which refuses ``save_pretrained``; its
    weights are already dequantized fp32 tensors, so the quantizer and its config entry are dropped first.
    """
    folder = Path(folder)
    if getattr(model, "hf_quantizer", None) is not None and getattr(model.config, "quantization_config", None) is not None:
        method = getattr(model.config.quantization_config, "quant_method", None) or dict(model.config.quantization_config).get("quant_method")
        if str(getattr(method, "value", method)) != "gguf":
            raise UsageError(f"cannot re-save a model quantized with {method}; give the unquantized checkpoint")
        model.hf_quantizer = None
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_with_genai(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32", extra_options: dict[str, str] | None = None
) -> tuple[float, int]:
    """Run onnxruntime-genai's builder (child process) from ``hf_dir`` into the empty ``out_dir``;
    returns (seconds, peak RSS bytes of the child)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}' (valid: {', '.join(PRECISIONS)})")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise UsageError("exporting a causal LM needs onnxruntime-genai: pip install onnxruntime-genai") from None
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="onnxpress-genai-cache-") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
               "-p", precision, "-e", "cpu", "-c", cache]
        if extra_options:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            text, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise OnnxpressError(f"onnxruntime-genai's builder did not finish in {BUILD_TIMEOUT_S} s") from None
        seconds = time.perf_counter() - start
        rss = _child_peak_rss()
    if proc.returncode != 0:
        if "is not currently supported" in text:  # an architecture the source scan did not see
            raise UsageError(f"{hf_dir}: onnxruntime-genai's builder does not support this model: {_last_error(text)}")
        raise OnnxpressError(f"onnxruntime-genai's builder failed on {hf_dir}: {_last_error(text)}")
    missing = [f for f in GENAI_FILES if not (out_dir / f).exists()]
    if missing:
        raise OnnxpressError(f"onnxruntime-genai's builder wrote no {', '.join(missing)} in {out_dir}")
    return seconds, rss


def export_causal_lm(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
) -> ExportInfo:
    """An HF folder or a GGUF file -> ``out_dir``, a folder onnxruntime-genai runs; written atomically."""
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: output folder exists and is not empty")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent}: output folder's parent does not exist")
    folder, found = split_source(source) if gguf_file is None else (Path(source), gguf_file)
    if found is None:
        _check_hf_folder(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        load_seconds = 0.0
        hf_dir = folder
        if found is not None:
            t = time.perf_counter()
            model, tokenizer = load_causal_lm(folder, found)
            check_architecture(getattr(model.config, "architectures", None) or [type(model).__name__], folder / found)
            hf_dir = staging / "hf"
            save_hf_folder(model, tokenizer, hf_dir)
            del model, tokenizer
            gc.collect()  # the builder child reads the saved copy; ours would only add to the peak
            load_seconds = time.perf_counter() - t
        built = staging / "onnx"
        build_seconds, rss = build_with_genai(hf_dir, built, precision)
        if out.exists():
            shutil.rmtree(out)
        os.replace(built, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = ExportInfo(out, time.perf_counter() - start, load_seconds, build_seconds, rss, precision)
    return info


def _check_hf_folder(folder: Path) -> None:
    """Everything the builder would otherwise fail on late, or with a traceback, as one line: the config
    (JSON, what transformers makes of it, the architecture), the weights (present, readable headers), the
    tokenizer (present)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder}/config.json: not readable JSON ({_one_line(exc)})") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise UsageError(f"{folder}/config.json: no 'architectures' entry; the builder picks the model class from it")
    offline()
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise UsageError("exporting a causal LM needs transformers: pip install 'onnxpress[models]'") from None
    except Exception as exc:  # noqa: BLE001 - whatever transformers refuses is the user's input
        raise UsageError(f"{folder}: transformers cannot load its config: {_one_line(exc)}") from None
    check_architecture(config["architectures"], folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not (folder / "pytorch_model.bin").exists():
        raise UsageError(f"{folder}: no weights (model.safetensors / pytorch_model.bin)")
    for path in weights:
        _check_safetensors(path)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        raise UsageError(f"{folder}: no tokenizer (tokenizer.json / tokenizer.model); onnxruntime-genai needs one")


def _check_safetensors(path: Path) -> None:
    """The file's header parses (reads the header only, not the tensors)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            handle.keys()
    except ImportError:
        return
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise UsageError(f"{path}: transformers cannot load these weights: {_one_line(exc)}") from None


@functools.lru_cache(maxsize=1)
def builder_architectures() -> frozenset[str]:
    """The architectures onnxruntime-genai's builder dispatches on (read from its source, not imported:
    importing it loads torch); empty when they cannot be found, and then the builder decides."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder") if importlib.util.find_spec("onnxruntime_genai") else None
    if spec is None or not spec.origin:
        return frozenset()
    try:
        text = Path(spec.origin).read_text()
    except OSError:
        return frozenset()
    return frozenset(re.findall(r'config\.architectures\[0\]\s*==\s*"(\w+)"', text))


def check_architecture(architectures: Any, where: Any) -> None:
    """One line when the builder has no exporter for the model's architecture."""
    supported = builder_architectures()
    arch = (list(architectures) or ["none"])[0] if architectures else "none"
    if supported and arch not in supported:
        examples = ", ".join(a for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM") if a in supported)
        raise UsageError(f"{where}: architecture {arch} is not one onnxruntime-genai's builder exports ({len(supported)} are, e.g. {examples})")


def _child_peak_rss() -> int:
    """Largest peak RSS among the child processes waited for so far (the builder, when it is the only or
    largest one; Linux ru_maxrss is in KiB); 0 where unavailable."""
    with contextlib.suppress(ImportError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
    return 0


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Exception" in line]
    return (errors or lines or ["no output"])[-1][:400]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:400]
