"""An onnxruntime-genai folder in, an onnxruntime-genai folder out.

onnxruntime-genai runs a folder, not a file: ``genai_config.json`` names the decoder file, the tokenizer files
sit beside it, the weights are in external data. When ``optimize``'s input is a model that the
``genai_config.json`` beside it names, and ``-o OUT/NAME.onnx`` is in another folder, the output is the whole
folder ``OUT``: the optimized model (``NAME.onnx`` and its external data), ``genai_config.json`` with that
model's file name changed to ``NAME.onnx`` where it differs, and every other file of the input folder except
its models (tokenizer, chat template, generation config; the other models the config names, such as a vision
encoder, with their external data).

``OUT`` must be new (its parent exists), empty, or an earlier output of onnxpress (a genai folder whose
models carry onnxpress's metadata), which is replaced whole; a folder holding anything else is refused, so
nothing of a user's is overwritten. An output in the input's own folder stays a single model file (the
folder's ``genai_config.json`` still names the original).

Atomic: everything is written into a hidden staging folder beside ``OUT`` (``.OUT.*.tmp``), then committed.
A new ``OUT`` is one rename. An existing ``OUT`` has its old files moved aside (``genai_config.json`` first,
so it stops being a genai folder at once) and the new ones moved in (``genai_config.json`` last, so it is
one only when complete); a failure moves everything back. The input folder is only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from onnxpress.errors import UsageError

CONFIG = "genai_config.json"
WRITTEN_BY_KEY = "onnxpress.pipeline"  # onnxpress.pipeline.stamp_metadata's key: a model onnxpress wrote


@dataclasses.dataclass(frozen=True)
class FolderOutput:
    """Where a genai folder output goes: ``folder / output_name``, from ``source / model_name``."""

    source: Path  # the input's folder
    model_name: str  # the input model's file name, as genai_config.json names it
    folder: Path
    output_name: str

    @property
    def output(self) -> Path:
        return self.folder / self.output_name


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable genai_config.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a genai_config.json (not a JSON object)")
    return config


def filename_entries(config: Any) -> Iterator[dict[str, Any]]:
    """Every object of the config with a string ``filename`` (decoder, vision, embedding, pipeline stages)."""
    if isinstance(config, dict):
        if isinstance(config.get("filename"), str):
            yield config
        for value in config.values():
            yield from filename_entries(value)
    elif isinstance(config, list):
        for value in config:
            yield from filename_entries(value)


def plan_output(model: str | os.PathLike, output: str | os.PathLike) -> FolderOutput | None:
    """A ``FolderOutput`` when ``model`` is a model of a genai folder and ``output`` is in another folder;
    None for a plain file output. Refuses (``UsageError``) an output folder that cannot take the result."""
    source = Path(model)
    config_path = source.parent / CONFIG
    if not source.is_file() or not config_path.is_file():
        return None
    if source.name not in {entry["filename"] for entry in filename_entries(read_config(config_path))}:
        return None  # a model beside the folder's own: the config is not about it
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and os.path.samefile(folder, source.parent):
        return None
    _check_target(folder, out.name)
    return FolderOutput(source.parent, source.name, folder, out.name)


def _check_target(folder: Path, name: str) -> None:
    hint = f"give a new or empty folder (-o NEWDIR/{name})"
    if not folder.exists():
        parent = folder.parent
        if not parent.is_dir():
            raise UsageError(f"{parent}: does not exist (the output folder {folder.name} is created inside it)")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"{parent}: not writable (the output folder {folder.name} is created inside it)")
        return
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    if not os.access(folder, os.W_OK) or not os.access(folder.parent, os.W_OK):
        raise UsageError(f"{folder}: not writable (it and its parent must be: the output is staged beside it)")
    if any(folder.iterdir()) and not written_by_onnxpress(folder):
        raise UsageError(f"{folder}: the input is an onnxruntime-genai folder, so the output is a whole folder, and "
                         f"{folder} holds other files; {hint}")


def written_by_onnxpress(folder: Path) -> bool:
    """A genai folder whose every named model exists and carries onnxpress's metadata (an earlier output)."""
    if not (folder / CONFIG).is_file():
        return False
    try:
        names = [entry["filename"] for entry in filename_entries(json.loads((folder / CONFIG).read_text()))]
        protos = [onnx.load(str(folder / n), load_external_data=False) for n in names]
    except Exception:  # noqa: BLE001 - unreadable config or model: not ours to replace
        return False
    return bool(protos) and all(any(p.key == WRITTEN_BY_KEY for p in proto.metadata_props) for proto in protos)


def external_files(model_path: Path) -> set[str]:
    """The external-data locations (relative to the model's folder) of a model's initializers."""
    proto = onnx.load(str(model_path), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if info.get("location"):
                locations.add(info["location"])
    return locations


def companion_files(source: Path, model_name: str, config: dict[str, Any]) -> list[str]:
    """The input folder's files the output folder needs, besides the optimized model and the config: every
    file that is not a model or a model's external data, plus the other models the config names with theirs."""
    from onnxpress import io

    models = [p for p in source.iterdir() if p.is_file() and p.suffix == ".onnx"]
    skip = {p.name for p in models} | {CONFIG}
    for path in models:
        skip |= external_files(path)
    files = [p.name for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in skip]
    for name in sorted({entry["filename"] for entry in filename_entries(config)} - {model_name}):
        if not (source / name).is_file():
            raise UsageError(f"{source / CONFIG}: names {name}, which is not in {source}")
        io.check_external_data(onnx.load(str(source / name), load_external_data=False), source)
        files += [name, *sorted(external_files(source / name))]
    return sorted(files)


def write_folder(plan: FolderOutput, model: Any, external_data: bool | None = None) -> list[str]:
    """Save ``model`` and the input folder's other files as the genai folder ``plan.folder``, atomically;
    returns the file names written besides the model and its external data."""
    from onnxpress import io

    config = read_config(plan.source / CONFIG)
    companions = companion_files(plan.source, plan.model_name, config)
    for entry in filename_entries(config):
        if entry["filename"] == plan.model_name:
            entry["filename"] = plan.output_name
    parent = plan.folder.parent if str(plan.folder.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.folder.name}.", suffix=".tmp", dir=parent))
    try:
        io.save(model, staging / plan.output_name, external_data=external_data)
        for name in companions:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plan.source / name, staging / name)  # content only: the input's files stay its own
        (staging / CONFIG).write_text(json.dumps(config, indent=4) + "\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make the new folder private
        _commit(staging, plan.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [CONFIG, *companions]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _commit(staging: Path, folder: Path) -> None:
    """Move the staged folder into place (see the module docstring)."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    parent = folder.parent if str(folder.parent) else Path(".")
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", suffix=".tmp", dir=parent))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for path in sorted(folder.iterdir(), key=lambda p: p.name != CONFIG):  # the config first
            os.replace(path, trash / path.name)
            moved_old.append(path.name)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG):  # the config last
            os.replace(path, folder / path.name)
            moved_new.append(path.name)
    except BaseException:
        for name in reversed(moved_new):
            os.replace(folder / name, staging / name)
        for name in moved_old:
            os.replace(trash / name, folder / name)
        with contextlib.suppress(OSError):
            trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


def genai_generate(folder: str | os.PathLike, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation of ``new_tokens`` tokens after ``prompt`` (token ids) by onnxruntime-genai from
    ``folder``: the check that an output folder is one onnxruntime-genai runs."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(os.fspath(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
