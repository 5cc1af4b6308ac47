"""Load and save models on onnx-ir, safely.

- Loading checks every external-data reference before any tensor is read: a location that is absolute,
  escapes the model's folder (``..`` or a symlink), is missing, or is shorter than the tensor it claims is
  refused with one clear line.  Tensors stay lazy (onnx-ir memory-maps external data), so a 3 GB model
  is not copied into memory on load.
- ``graph.sparse_initializer`` is densified on load, because onnx-ir drops it on a round trip; the sparse
  form is re-created only by the ``sparsify`` pass at the very end of a pipeline.
- Saving is atomic: the model goes to a temporary file in the target folder and is moved into place with
  ``os.replace``; on any failure no partial output is left.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

from onnxpress.errors import ModelLoadError, UsageError

# Above this many initializer bytes a model is saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_AUTO_BYTES = 1536 * 1024 * 1024
# Tensors smaller than this stay inside the .onnx file when external data is used.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def _all_tensor_protos(proto: onnx.ModelProto):
    return external_data_helper._get_all_tensors(proto)  # walks initializers, attributes and subgraphs


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_external_data(proto: onnx.ModelProto, model_dir: str | os.PathLike) -> None:
    """Refuse external-data references that are unsafe or broken. Reads no tensor data."""
    root = os.path.realpath(model_dir)
    for tensor in _all_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        where = f"tensor '{tensor.name}'"
        if not location:
            raise ModelLoadError(f"{where} is stored externally but names no location")
        if os.path.isabs(location) or location.startswith(("\\", "/")) or ":" in location[:3]:
            raise ModelLoadError(f"{where}: external data location '{location}' is absolute; only paths inside the model's folder are allowed")
        target = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, target]) != root:
            raise ModelLoadError(f"{where}: external data location '{location}' escapes the model's folder")
        if not os.path.isfile(target):
            raise ModelLoadError(f"{where}: external data file '{location}' is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{where}: external data offset/length are not integers") from None
        size = os.path.getsize(target)
        if offset < 0 or (length is not None and length < 0):
            raise ModelLoadError(f"{where}: negative external data offset or length")
        end = offset + (length if length is not None else 0)
        if offset > size or end > size:
            raise ModelLoadError(f"{where}: external data runs past the end of '{location}' ({end} > {size} bytes)")


def densify_sparse_initializers(proto: onnx.ModelProto) -> int:
    """Turn ``graph.sparse_initializer`` entries into dense initializers in place; returns how many."""
    from onnx import numpy_helper

    graph = proto.graph
    count = 0
    for sparse in list(graph.sparse_initializer):
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(dims, dtype=values.dtype)
        if indices.ndim == 2:  # [NNZ, rank] coordinates
            dense[tuple(indices.T)] = values
        else:  # linearized indices
            dense.reshape(-1)[indices] = values
        graph.initializer.append(numpy_helper.from_array(dense, name=sparse.values.name))
        count += 1
    del graph.sparse_initializer[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                if any(len(g.sparse_initializer) for g in subgraphs):
                    raise ModelLoadError(f"node '{node.name}' has a subgraph with sparse initializers, which onnxpress does not support")
    return count


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read a ModelProto without external data, with one clear error for every kind of bad file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an .onnx file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph or no ir_version)")
    return proto


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """ModelProto -> ir.Model, densifying sparse initializers and resolving external data against base_dir."""
    if len(proto.graph.sparse_initializer):
        densify_sparse_initializers(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model graph: {_first_line(exc)}") from None
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model as an ``ir.Model``; external data stays lazy (memory-mapped on first use)."""
    proto = load_proto(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    check_external_data(proto, base_dir)
    return model_from_proto(proto, base_dir)


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def check_writable_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False) -> Path:
    """Refuse an output that would overwrite an input (unless force) or lives in a folder we cannot write."""
    out = Path(path)
    for src in inputs:
        if src and Path(src).exists() and out.exists() and os.path.samefile(src, out) and not force:
            raise UsageError(f"{out}: output is the input file; choose another path or pass --force")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{folder}: output folder is not writable")
    return out


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Save atomically. ``external_data=None`` chooses: external when the model is large or came with it.

    External data goes to one file ``<name>.data`` beside the output.  The .onnx file itself is written to a
    temporary file in the same folder and renamed into place, so a reader never sees a partial model.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > EXTERNAL_DATA_AUTO_BYTES
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if external_data:
            # onnx-ir writes the data file to a temporary file and replaces it atomically itself.
            ir.save(model, tmp_name, external_data=f"{out.name}.data", size_threshold_bytes=size_threshold_bytes)
        else:
            ir.save(model, tmp_name)
        os.chmod(tmp_name, _umask_mode())  # mkstemp creates 0600; a model file is an ordinary file
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return out


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write a file atomically (temp file in the same folder, then os.replace)."""
    out = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp_name, _umask_mode())
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return out
