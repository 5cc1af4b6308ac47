"""Input data: load user feeds (.npz, folders of ONNX test-data ``input_*.pb``) and generate feeds
from a model's input signature.

One format serves validation inputs (``--inputs``) and calibration data (``--calibration``): a ``.npz``
whose keys are the model's input names.  For calibration the arrays carry a leading sample axis.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxpress.errors import UsageError, ValidationError

Feed = dict[str, np.ndarray]

# Generated inputs are capped: a model that claims huge shapes must not make us allocate unbounded memory.
MAX_GENERATED_ELEMENTS = 1 << 26
DEFAULT_DIM = 4


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # str: symbolic dim, None: unknown dim


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype
        if dtype is None or value.type is None or not isinstance(value.type, ir.TensorType):
            raise ValidationError(f"input '{value.name}' is not a tensor; supply inputs with --inputs")
        try:
            np_dtype = dtype.numpy()
        except TypeError:  # UNDEFINED, or a type numpy cannot hold
            raise ValidationError(f"input '{value.name}' has data type {dtype.name}, which has no array type; supply inputs with --inputs") from None
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(np_dtype), shape))
    return specs


def _gather_index_bounds(model: ir.Model) -> dict[str, int]:
    """Graph inputs used as Gather indices into a constant table -> the table's size along the axis."""
    bounds: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in ("Gather", "GatherElements") or len(node.inputs) < 2:
            continue
        data, indices = node.inputs[0], node.inputs[1]
        if indices is None or data is None or not indices.is_graph_input():
            continue
        axis = node.attributes.get_int("axis", 0)
        if data.shape is not None and len(data.shape) > 0:
            dim = data.shape[axis if axis >= 0 else len(data.shape) + axis]
            if isinstance(dim, int):
                bounds[indices.name] = min(bounds.get(indices.name, dim), dim)
    return bounds


def generate_inputs(model: ir.Model, dims: dict[str, int] | None = None, seed: int = 0, default_dim: int = DEFAULT_DIM) -> Feed:
    """Random inputs that are valid for the model: indices inside embedding tables, masks all ones."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    bounds = _gather_index_bounds(model)
    feeds: Feed = {}
    for spec in input_specs(model):
        if spec.shape is None:
            raise ValidationError(f"input '{spec.name}' has no shape; supply inputs with --inputs FILE.npz")
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(int(dims[dim]))
            else:
                shape.append(default_dim)
        count = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if count > MAX_GENERATED_ELEMENTS:
            raise ValidationError(
                f"input '{spec.name}' would have shape {tuple(shape)} ({count} elements, cap {MAX_GENERATED_ELEMENTS}); "
                "set smaller dims with --dim NAME=VALUE or supply --inputs"
            )
        # np.asarray: for a scalar input numpy returns a numpy scalar, which onnxruntime refuses
        feeds[spec.name] = np.asarray(_random_array(spec, tuple(shape), rng, bounds.get(spec.name)), dtype=spec.dtype if spec.dtype.kind not in "USO" else object)
    return feeds


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, index_bound: int | None) -> np.ndarray:
    dt = spec.dtype
    is_mask = "mask" in spec.name.lower()
    if dt == np.bool_:
        return np.ones(shape, dtype=bool) if is_mask else rng.random(shape) < 0.5
    if np.issubdtype(dt, np.integer):
        if is_mask:
            return np.ones(shape, dtype=dt)
        high = index_bound if index_bound is not None else 4
        low = 0 if np.issubdtype(dt, np.unsignedinteger) or index_bound is not None else 0
        return rng.integers(low, max(high, 1), size=shape).astype(dt)
    if np.issubdtype(dt, np.floating) or dt.kind == "V":  # V: ml_dtypes such as bfloat16
        return rng.standard_normal(shape).astype(np.float32).astype(dt)
    if np.issubdtype(dt, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if dt.kind in ("U", "S", "O"):
        return np.array(rng.choice(["a", "bc", "def"], size=shape), dtype=object)
    raise ValidationError(f"cannot generate data of type {dt} for input '{spec.name}'; supply --inputs")


def _pb_index(path: str) -> int:
    match = re.search(r"_(\d+)\.pb$", path)
    return int(match.group(1)) if match else 0


def load_tensor_pb(path: str | os.PathLike) -> tuple[str, object]:
    """Read one ONNX test-data file (a TensorProto, or a Sequence/Optional proto)."""
    data = Path(path).read_bytes()
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
        return tensor.name, numpy_helper.to_array(tensor)
    except Exception:
        pass
    for proto_cls in (onnx.SequenceProto, onnx.OptionalProto):
        proto = proto_cls()
        try:
            proto.ParseFromString(data)
        except Exception:
            continue
        if isinstance(proto, onnx.SequenceProto):
            return proto.name, numpy_helper.to_list(proto)
        return proto.name, numpy_helper.to_optional(proto)
    raise UsageError(f"{path}: not a TensorProto test-data file")


def load_pb_folder(folder: str | os.PathLike, prefix: str, names: list[str]) -> dict[str, object]:
    files = sorted(glob.glob(os.path.join(folder, f"{prefix}_*.pb")), key=_pb_index)
    out: dict[str, object] = {}
    for i, path in enumerate(files):
        name, array = load_tensor_pb(path)
        if i < len(names):
            name = names[i]  # positional, as the ONNX test runner does
        elif not name:
            name = f"{prefix}_{i}"
        out[name] = array
    return out


def load_feeds(path: str | os.PathLike, model: ir.Model) -> Feed:
    """Validation inputs: an .npz keyed by input name, or a folder of input_*.pb."""
    p = Path(path)
    names = [s.name for s in input_specs(model)]
    if p.is_dir():
        feeds = load_pb_folder(p, "input", names)
        if not feeds:
            raise UsageError(f"{p}: folder holds no input_*.pb files")
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as npz:
            feeds = {k: npz[k] for k in npz.files}
    elif p.exists():
        raise UsageError(f"{p}: inputs must be an .npz file or a folder of input_*.pb")
    else:
        raise UsageError(f"{p}: no such file")
    check_feeds(feeds, model, where=str(p))
    return feeds  # type: ignore[return-value]


def check_feeds(feeds: dict[str, object], model: ir.Model, where: str, sample_axis: bool = False) -> None:
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in feeds]
    unknown = [n for n in feeds if n not in specs]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise UsageError(f"{where}: inputs do not match the model ({'; '.join(parts)}; model inputs: {', '.join(specs)})")
    for name, spec in specs.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray) or spec.shape is None:
            continue
        rank = len(spec.shape) + (1 if sample_axis else 0)
        if array.ndim != rank and not (sample_axis and array.ndim == rank - 1):
            raise UsageError(f"{where}: input '{name}' has rank {array.ndim}, the model expects {len(spec.shape)}")
        if array.dtype != spec.dtype and not (array.dtype.kind == spec.dtype.kind == "f"):
            raise UsageError(f"{where}: input '{name}' has dtype {array.dtype}, the model expects {spec.dtype}")
