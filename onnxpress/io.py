"""Load and save models on onnx-ir, safely.

- Loading checks every external-data reference before any tensor is read: a location that is absolute,
  escapes the model's folder (``..`` or a symlink), is missing, or is shorter than the tensor it claims is
  refused with one clear line.  Tensors stay lazy (onnx-ir memory-maps external data), so a 3 GB model
  is not copied into memory on load.
- ``graph.sparse_initializer`` is densified on load, because onnx-ir drops it on a round trip; ``save``
  writes the sparse form of the initializers the ``sparsify`` pass planned (``onnxpress.sparse_storage``).
- Saving is atomic: the model goes to a temporary file in the target folder and is moved into place with
  ``os.replace``; on any failure no partial output is left.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress import sparse_storage
from onnxpress.errors import ModelLoadError, UsageError

# Above this many initializer bytes a model is saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_AUTO_BYTES = 1536 * 1024 * 1024
# Tensors smaller than this stay inside the .onnx file when external data is used.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def _all_tensor_protos(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers, sparse tensors (values and indices), attribute tensors,
    in the main graph, every subgraph and every function. Subgraphs are found by presence, not by the
    attribute's declared type, so a type that lies cannot hide one."""

    def sparse(s: onnx.SparseTensorProto):
        yield s.values
        yield s.indices

    def nodes(node_list):
        for node in node_list:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from sparse(attr.sparse_tensor)
                for s in attr.sparse_tensors:
                    yield from sparse(s)
                if attr.HasField("g"):
                    yield from graph(attr.g)
                for g in attr.graphs:
                    yield from graph(g)

    def graph(g: onnx.GraphProto):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield from sparse(s)
        yield from nodes(g.node)

    yield from graph(proto.graph)
    for function in proto.functions:
        yield from nodes(function.node)


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
        if not os.path.exists(target):
            raise ModelLoadError(f"{where}: external data file '{location}' is missing")
        if not os.path.isfile(target):  # a folder, FIFO or device: reading it could block or never end
            raise ModelLoadError(f"{where}: external data location '{location}' is not a regular file")
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


def check_tensors(proto: onnx.ModelProto) -> None:
    """Refuse tensors whose stored data does not match their type and shape (before anything reads them).

    A tensor claiming shape [2^40] with 16 bytes of data, a negative dimension, an undefined data type, or
    raw data shorter or longer than its shape needs is one clear error here instead of a failure deep
    inside a pass or onnxruntime. Only lengths are compared; no data is decoded.
    """
    for tensor in _all_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against its file by check_external_data
        where = f"tensor '{tensor.name}'" if tensor.name else "an unnamed tensor"
        if tensor.data_type not in onnx.TensorProto.DataType.values():
            raise ModelLoadError(f"{where} has an unknown data type ({tensor.data_type})")
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{where} has a negative dimension {list(tensor.dims)}")
        if tensor.HasField("raw_data") and tensor.data_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            count = 1
            for d in tensor.dims:
                count *= d
            need = (count * ir.DataType(tensor.data_type).bitwidth + 7) // 8
            if len(tensor.raw_data) != need:
                raise ModelLoadError(f"{where}: raw data holds {len(tensor.raw_data)} bytes, its shape {list(tensor.dims)} and type need {need}")
            if any(len(getattr(tensor, f)) for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")):
                raise ModelLoadError(f"{where} is malformed: it holds both raw data and typed data")
            continue  # fully checked; onnx's checker would only copy the data (the whole model, per load)
        try:
            onnx.checker.check_tensor(tensor)
        except Exception as exc:  # onnx.checker.ValidationError: undefined type, too few values, ...
            raise ModelLoadError(f"{where} is malformed: {_first_line(exc)}") from None


def densify_sparse_initializers(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> int:
    """Turn ``graph.sparse_initializer`` entries into dense initializers in place; returns how many.

    External data of the sparse values/indices is read relative to ``base_dir`` (the model's folder).
    """
    from onnx import numpy_helper

    graph = proto.graph
    count = 0
    base = os.fspath(base_dir) if base_dir is not None else ""
    for sparse in list(graph.sparse_initializer):
        values = numpy_helper.to_array(sparse.values, base_dir=base)
        indices = numpy_helper.to_array(sparse.indices, base_dir=base).astype(np.int64)
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
        densify_sparse_initializers(proto, base_dir)
    with _capture_warnings("onnx_ir") as warnings:
        try:
            model = ir.serde.deserialize_model(proto)
            # What onnx-ir reads but cannot write back (names that are not UTF-8, attributes of type
            # UNDEFINED) would fail in the first pass with an obscure error: refuse it here.
            ir.to_proto(model)
        except Exception as exc:
            cause = _root_cause(exc)
            raise ModelLoadError(f"cannot read the model graph: {type(cause).__name__}: {_first_line(cause)}") from None
    for message in warnings:  # onnx-ir reads an invalid graph with a warning; refuse it with one line instead
        if "cannot be found in any scope" in message or "is not produced by any node" in message:
            raise ModelLoadError(f"invalid model graph: {message.split('. ')[0]}")
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _root_cause(exc: BaseException) -> BaseException:
    """onnx-ir wraps the real error in 'Error calling _deserialize_graph with: g'; the cause says what is wrong."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


@contextlib.contextmanager
def _capture_warnings(logger_name: str):
    """Collect a library logger's warnings instead of letting them reach stderr (the CLI prints one line)."""
    import logging

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(" ".join(record.getMessage().split()))

    logger = logging.getLogger(logger_name)
    handler = _Collect(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model as an ``ir.Model``; external data stays lazy (memory-mapped on first use)."""
    proto = load_proto(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    check_external_data(proto, base_dir)
    check_tensors(proto)
    return model_from_proto(proto, base_dir)


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of every initializer in the model and its subgraphs, external ones included."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None)


def release_external_tensors(model: ir.Model) -> int:
    """Unmap the external tensors that were read (they map again lazily on next use); returns how many.

    A read external tensor keeps its memory map, and every page it touched counts in the process's RSS
    until the map closes: after a pass that reads every weight (dedup hashes them all) the whole model would
    stay resident through the next passes. A tensor whose array is still held elsewhere stays mapped until
    that array is dropped.
    """
    released = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None:
                with contextlib.suppress(BufferError):  # an array over the map is still alive
                    tensor.release()
                    released += 1
    return released


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of the model or its subgraphs is an external (lazily mapped) tensor."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values())


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

    External data goes to one file ``<name>.data`` beside the output.  Everything is written under a hidden
    temporary name in the same folder (``.<name>.*.tmp``) and renamed into place at the end, so a reader
    never sees a partial model, and a failure (exception, Ctrl-C) leaves the old output and no temporary.
    With external data the two files are staged in a temporary folder; the old ``.onnx`` is removed before
    the new ``.data`` replaces the old one, so a kill between the renames leaves no output rather than the
    old model beside the new weights.  A SIGKILL can leave a ``.<name>.*.tmp`` file or folder behind.
    """
    stored = sparse_storage.stored_initializers(model)  # sparsify's plan, re-checked on the tensors as they are
    if stored:
        with sparse_storage.detached(model, stored):
            return _save_sparse(model, Path(path), stored, external_data, size_threshold_bytes)
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > EXTERNAL_DATA_AUTO_BYTES
    if external_data:
        return _save_with_external_data(model, out, folder, size_threshold_bytes)
    # ir.save keeps an external tensor's reference as it is: a single-file output would then point at the
    # input's data file, relative to the output's folder. Read such tensors in for the save, then put back.
    external = [v for g in model.graphs() for v in g.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    originals = [v.const_value for v in external]
    try:
        for value, tensor in zip(external, ir.external_data.convert_tensors_from_external(originals)):
            value.const_value = tensor
        return atomic_write(out, lambda tmp: ir.save(model, tmp))
    finally:
        for value, tensor in zip(external, originals):
            value.const_value = tensor


def _save_with_external_data(model: ir.Model, out: Path, folder: Path, size_threshold_bytes: int) -> Path:
    import shutil

    data_name = f"{out.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    try:
        staged = staging / out.name
        ir.save(model, staged, external_data=data_name, size_threshold_bytes=size_threshold_bytes)
        _commit_staged(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _commit_staged(staging: Path, out: Path) -> None:
    """Move ``staging/<name>`` (and ``<name>.data`` if staged) into place. The old .onnx must never meet the
    new .data: it is removed first (a kill in between leaves no output)."""
    folder = out.parent if str(out.parent) else Path(".")
    data_name = f"{out.name}.data"
    if (staging / data_name).exists():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        os.replace(staging / data_name, folder / data_name)
    os.replace(staging / out.name, out)


def _save_sparse(model: ir.Model, out: Path, stored: list[sparse_storage.Stored], external_data: bool | None,
                 size_threshold_bytes: int) -> Path:
    """``save`` of a model whose ``stored`` initializers are detached (``sparse_storage.detached``): the rest is
    saved as usual into a staging folder, the sparse tensors are added to the staged .onnx (inline, also with
    external data: they are the small part), then everything moves into place as one commit."""
    import shutil

    folder = out.parent if str(out.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    try:
        staged = save(model, staging / out.name, external_data=external_data, size_threshold_bytes=size_threshold_bytes)
        proto = sparse_storage.add_sparse_initializers(onnx.load(str(staged), load_external_data=False), stored)
        if proto.ByteSize() >= 2**31 - 1:
            raise UsageError(f"{out}: the model with its sparse initializers is over 2 GB, more than one protobuf holds")
        staged.write_bytes(proto.SerializeToString())
        _commit_staged(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a hidden temporary file ``.<name>.*.tmp`` beside ``path``, then rename it into
    place: a reader never sees a partial file, and a failure (exception, Ctrl-C) leaves no temporary and the
    old file as it was. The file gets the usual permissions (mkstemp's are 0600)."""
    out = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.chmod(tmp_name, _umask_mode())
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return out


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write a file atomically (``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder for cached builds and results (created on first use): ``override``, else ``$ONNXPRESS_CACHE``,
    else ``<repo>/.cache/onnxpress`` when onnxpress runs from a source checkout (git-ignored, ``make clean``
    removes it), else ``~/.cache/onnxpress``."""
    if override is not None:
        folder = Path(override)
    elif os.environ.get("ONNXPRESS_CACHE"):
        folder = Path(os.environ["ONNXPRESS_CACHE"])
    else:
        repo = Path(__file__).resolve().parent.parent
        if (repo / "pyproject.toml").is_file() and (repo / "onnxpress").is_dir():
            folder = repo / ".cache" / "onnxpress"
        else:
            folder = Path.home() / ".cache" / "onnxpress"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- size on disk ------------------------------------------------------------------------------------
def model_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Bytes the model takes on disk: the serialized proto plus its external data. For an ``ir.Model``, what
    ``onnxpress.save`` writes: initializers planned by ``sparsify`` count as their sparse form."""
    if isinstance(model, ir.Model):
        return _ir_model_bytes(model)
    return _proto_bytes(model)


def _proto_bytes(proto: onnx.ModelProto, skip_location: str | None = None) -> int:
    external = 0
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if info.get("location") != skip_location:
                external += int(info.get("length", 0) or 0)
    return proto.ByteSize() + external


_STAND_IN = "onnxpress-size-stand-in"


def _length_delimited(size: int) -> int:
    """Bytes of a length-delimited protobuf field of ``size`` bytes with a one-byte tag."""
    return 1 + _varint_len(size) + size


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def _ir_model_bytes(model: ir.Model) -> int:
    """``model_bytes`` without serializing the whole model: serializing it would copy every in-memory tensor
    (a 3 GB model quantized to int8: 0.75 GB) just to measure it. Large in-memory initializers are replaced by
    external-data stand-ins for the measurement; each one's exact serialized size is added back, one tensor at
    a time. The initializers a save stores sparse (``onnxpress.sparse_storage``) are left out of the graph
    for the measurement and their SparseTensorProto sizes added."""
    stored = sparse_storage.stored_initializers(model)
    with sparse_storage.detached(model, stored):
        return _measured_bytes(model, sum(_length_delimited(s.proto.ByteSize()) for s in stored))


def _measured_bytes(model: ir.Model, extra_graph_bytes: int) -> int:
    """Serialized size of ``model`` whose graph message will carry ``extra_graph_bytes`` more (sparse tensors)."""
    big = [
        v for v in model.graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 1 << 20
    ]
    originals = [v.const_value for v in big]
    correction = extra_graph_bytes
    try:
        for value, tensor in zip(big, originals):
            stand_in = ir.ExternalTensor(_STAND_IN, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name)
            real = ir.serde.serialize_tensor(tensor).ByteSize()
            stub = ir.serde.serialize_tensor(stand_in).ByteSize()
            correction += _length_delimited(real) - _length_delimited(stub)
            value.const_value = stand_in
        proto = ir.to_proto(model)
    finally:
        for value, tensor in zip(big, originals):
            value.const_value = tensor
    # The graph message grew by ``correction``: its length prefix inside the model may grow by a byte or two.
    graph_stub = proto.graph.ByteSize()
    correction += _varint_len(graph_stub + correction) - _varint_len(graph_stub)
    return _proto_bytes(proto, skip_location=_STAND_IN) + correction
