"""A generated corpus of hostile and broken ONNX inputs for the CLI's error contract.

Each ``Case`` writes its input into a fresh folder and states what onnxpress must do with it: the exact exit
code of ``optimize`` (1 or 2 for inputs that must be refused, 0 for inputs that are in fact valid, whose
output must then validate), the words the one-line error must contain, and the exit codes of ``inspect``
and ``validate`` where those commands are run too.  ``tests/reliability/test_hostile.py`` runs every case
and checks the rest of the contract (one line, no traceback, no output, input unchanged, nothing created
outside the output folder).

Folder layout of a case (``root`` is a fresh temporary folder)::

    root/in/        the input model (``model.onnx``) and any data files it references
    root/out/       the output folder (``out.onnx``)
    root/outside.bin, root/secret/secret.bin   files a hostile model points at from outside its folder
    root/work/      the working directory; root/tmp/ the TMPDIR of the run

Usable as a script: ``python tests/reliability/hostile_corpus.py FOLDER`` writes every case's input to
``FOLDER/<case>/in`` (for running other tools over the same corpus).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
MODEL = "model.onnx"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]  # writes the input into the folder it is given; returns the model path
    optimize: int  # exact exit code of `onnxpress optimize` (0: the input is valid, the output must validate)
    message: str = ""  # words the one-line error must contain (case-insensitive)
    inspect: int | None = None  # exit code of `onnxpress inspect --json`; None: not run
    validate: int | None = None  # exit code of `onnxpress validate IN IN`; None: not run
    isolate: bool = False  # run in a subprocess (crash isolation, recursion limits)
    note: str = ""  # why this outcome is the right one


# ---------------------------------------------------------------------------------------------- builders


def _weights(shape=(4, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def mlp_proto(opset: int = OPSET, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    """x[N,4] -> MatMul w -> Add b -> Relu -> y[N,4]: the valid model every mutation starts from."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
            helper.make_node("Relu", ["hb"], ["y"], name="relu"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(_weights(), "w"), numpy_helper.from_array(_weights((4,), 1), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def if_proto() -> onnx.ModelProto:
    """A model with a subgraph: y = If(x_sum > 0, then: x*w, else: x+w) — a second mutation seed."""
    w = numpy_helper.from_array(_weights((2, 2), 2), "w")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 2])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 2])])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "ifg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [w, numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _write(folder: Path, proto_or_bytes, name: str = MODEL) -> Path:
    path = folder / name
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    path.write_bytes(data)
    return path


def _model(nodes, inputs, outputs, inits=(), opset: int = OPSET, ir_version: int = IR_VERSION, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version, **kw)


def _vi(name, dtype=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape) if shape is not None else None)


def _raw_bytes(seed: int, size: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return _write(folder, random.Random(seed).randbytes(size))

    return build


def _truncated(fraction: float | None = None, keep: int | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        data = mlp_proto().SerializeToString()
        cut = keep if keep is not None else int(len(data) * fraction)
        return _write(folder, data[:cut])

    return build


def _bytes_file(data: bytes) -> Callable[[Path], Path]:
    return lambda folder: _write(folder, data)


def _torch_pt(folder: Path) -> Path:
    """What ``torch.save(state_dict, 'model.onnx')`` writes: a zip archive (written without importing torch)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01K\x01s.")
        zf.writestr("archive/version", b"3\n")
        zf.writestr("archive/data/0", _weights().tobytes())
    return _write(folder, buf.getvalue())


def _plain_zip(folder: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MODEL, mlp_proto().SerializeToString())  # a zipped model is still not a model
    return _write(folder, buf.getvalue())


def _png(folder: Path) -> Path:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return _write(folder, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + chunk(b"IEND", b""))


def _npz(folder: Path) -> Path:
    buf = io.BytesIO()
    np.savez(buf, x=_weights())
    return _write(folder, buf.getvalue())


def _safetensors(folder: Path) -> Path:
    header = b'{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}'
    return _write(folder, struct.pack("<Q", len(header)) + header + _weights().tobytes())


def _onnx_text(folder: Path) -> Path:
    return _write(folder, onnx.printer.to_text(mlp_proto()).encode())


def _tensor_proto(folder: Path) -> Path:
    """A valid protobuf of the wrong message type: a TensorProto where a ModelProto is expected."""
    return _write(folder, numpy_helper.from_array(_weights((64, 64)), "w"))


def _model_is_folder(folder: Path) -> Path:
    (folder / MODEL).mkdir()
    return folder / MODEL


def _model_missing(folder: Path) -> Path:
    return folder / MODEL


def _model_dangling_symlink(folder: Path) -> Path:
    os.symlink(folder / "nowhere.onnx", folder / MODEL)
    return folder / MODEL


def _model_is_fifo(folder: Path) -> Path:
    """Reading a FIFO blocks until a writer comes: it must be refused, not read."""
    os.mkfifo(folder / MODEL)
    return folder / MODEL


def _model_is_dev_zero(folder: Path) -> Path:
    """A symlink to /dev/zero: reading it never ends."""
    os.symlink("/dev/zero", folder / MODEL)
    return folder / MODEL


def _no_graph(folder: Path) -> Path:
    return _write(folder, onnx.ModelProto(ir_version=IR_VERSION, opset_import=[helper.make_opsetid("", OPSET)]))


def _ir_version_zero(folder: Path) -> Path:
    proto = mlp_proto()
    proto.ir_version = 0
    return _write(folder, proto)


def _ir_version_future(folder: Path) -> Path:
    proto = mlp_proto()
    proto.ir_version = 99
    return _write(folder, proto)


def _no_opset_import(folder: Path) -> Path:
    proto = mlp_proto()
    del proto.opset_import[:]
    return _write(folder, proto)


def _cycle(folder: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Identity", ["a"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _self_loop(folder: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "a"], ["a"]), helper.make_node("Identity", ["a"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _undefined_input(folder: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _undefined_output(folder: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _duplicate_node_outputs(folder: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _duplicate_graph_outputs(folder: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y"), _vi("y")]))


def _duplicate_inputs(folder: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x"), _vi("x")], [_vi("y")]))


def _output_is_input(folder: Path) -> Path:
    """The graph output is the graph input itself; a valid (if pointless) model."""
    return _write(folder, _model([], [_vi("x")], [_vi("x")]))


def _empty_graph(folder: Path) -> Path:
    return _write(folder, _model([], [], []))


def _dims(shape) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return _write(folder, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", shape=shape)], [_vi("y", shape=shape)]))

    return build


def _huge_initializer(folder: Path) -> Path:
    """An initializer claiming shape [2^40] whose raw data holds 16 bytes."""
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 40], raw_data=b"\x00" * 16)
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x", shape=[1])], [_vi("y", shape=[1 << 40])], [t]))


def _huge_constant_attr(folder: Path) -> Path:
    """A Constant node whose value tensor claims [2^20, 2^20] with no data at all."""
    t = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    nodes = [helper.make_node("Constant", [], ["c"], value=t), helper.make_node("Add", ["x", "c"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x", shape=[1, 1])], [_vi("y", shape=None)]))


def _raw_size_mismatch(nbytes: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\x01" * nbytes)
        return _write(folder, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [t]))

    return build


def _float_data_count_mismatch(folder: Path) -> Path:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], float_data=[1.0, 2.0, 3.0])
    return _write(folder, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [t]))


def _negative_initializer_dims(folder: Path) -> Path:
    t = numpy_helper.from_array(_weights(), "w")
    t.dims[:] = [-4, -4]
    return _write(folder, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [t]))


def _initializer_dtype(dtype: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        t = numpy_helper.from_array(_weights(), "w")
        t.data_type = dtype
        return _write(folder, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [t]))

    return build


def _input_dtype(dtype: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        proto = mlp_proto()
        proto.graph.input[0].type.tensor_type.elem_type = dtype
        return _write(folder, proto)

    return build


def _input_without_type(folder: Path) -> Path:
    proto = mlp_proto()
    proto.graph.input[0].ClearField("type")
    return _write(folder, proto)


def _string_input(folder: Path) -> Path:
    """A string tensor input through Identity: a valid model (strings are generated as short words)."""
    return _write(folder, _model([helper.make_node("Identity", ["s"], ["y"])], [_vi("s", TensorProto.STRING, [3])], [_vi("y", TensorProto.STRING, [3])]))


def _string_into_matmul(folder: Path) -> Path:
    return _write(folder, _model([helper.make_node("MatMul", ["s", "s"], ["y"])], [_vi("s", TensorProto.STRING, [2, 2])], [_vi("y", TensorProto.STRING, [2, 2])]))


def _sequence_input(folder: Path) -> Path:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("SequenceLength", ["s"], ["y"])]
    return _write(folder, _model(nodes, [seq], [_vi("y", TensorProto.INT64, [])]))


def _opset(version: int, op: str = "Relu") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        ir_version = IR_VERSION if version >= 7 else 3
        return _write(folder, _model([helper.make_node(op, ["x"], ["y"])], [_vi("x")], [_vi("y")], opset=version, ir_version=ir_version))

    return build


def _newest_opset(folder: Path) -> Path:
    version = onnx.defs.onnx_opset_version()
    return _write(folder, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], opset=version, ir_version=onnx.IR_VERSION))


def _future_opset(folder: Path) -> Path:
    version = onnx.defs.onnx_opset_version() + 50
    return _write(folder, _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], opset=version, ir_version=onnx.IR_VERSION))


def _unknown_domain(folder: Path) -> Path:
    proto = _model([helper.make_node("Boom", ["x"], ["y"], domain="com.evil")], [_vi("x")], [_vi("y")])
    proto.opset_import.append(helper.make_opsetid("com.evil", 1))
    return _write(folder, proto)


def _undeclared_domain(folder: Path) -> Path:
    return _write(folder, _model([helper.make_node("Boom", ["x"], ["y"], domain="com.undeclared")], [_vi("x")], [_vi("y")]))


def _unknown_op(folder: Path) -> Path:
    return _write(folder, _model([helper.make_node("NoSuchOp", ["x"], ["y"])], [_vi("x")], [_vi("y")]))


def _wrong_attribute_type(folder: Path) -> Path:
    node = helper.make_node("Transpose", ["x"], ["y"])
    node.attribute.append(helper.make_attribute("perm", 1.5))
    return _write(folder, _model([node], [_vi("x")], [_vi("y", shape=(4, 2))]))


def _attribute_type_lies(folder: Path) -> Path:
    """An If whose branch attributes carry a graph but claim type FLOAT (hides the subgraph from walkers)."""
    proto = if_proto()
    for attr in proto.graph.node[2].attribute:
        attr.type = onnx.AttributeProto.FLOAT
    return _write(folder, proto)


def _recursive_function(folder: Path) -> Path:
    """A model-local function that calls itself: inlining must not recurse forever."""
    fn = helper.make_function("local", "Rec", ["a"], ["b"], [helper.make_node("Rec", ["a"], ["b"], domain="local")], [helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)])
    proto = _model([helper.make_node("Rec", ["x"], ["y"], domain="local")], [_vi("x")], [_vi("y")], functions=[fn])
    proto.opset_import.append(helper.make_opsetid("local", 1))
    return _write(folder, proto)


def _mutually_recursive_functions(folder: Path) -> Path:
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)]
    f = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("G", ["a"], ["b"], domain="local")], opsets)
    g = helper.make_function("local", "G", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="local")], opsets)
    proto = _model([helper.make_node("F", ["x"], ["y"], domain="local")], [_vi("x")], [_vi("y")], functions=[f, g])
    proto.opset_import.append(helper.make_opsetid("local", 1))
    return _write(folder, proto)


def _field(message_type, name: str, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (no parser or CopyFrom recursion involved)."""
    number = message_type.DESCRIPTOR.fields_by_name[name].number
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def nested_model_bytes(depth: int, op: str = "If") -> bytes:
    """A model whose subgraphs nest ``depth`` levels deep (If then-branches, or Loop bodies).

    Serialized by concatenating encoded fields, because building it with protobuf objects would hit the
    very recursion limits the case is about.
    """
    AP, NP, GP, MP = onnx.AttributeProto, onnx.NodeProto, onnx.GraphProto, onnx.ModelProto
    graph_type = AP.GRAPH
    if op == "If":
        leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["o0"])], "leaf", [], [_vi("o0", shape=(2, 4))])
        leaf_bytes = leaf.SerializeToString()
        inner = leaf_bytes
        for level in range(1, depth + 1):
            out_name = "y" if level == depth else f"o{level}"
            then_attr = AP(name="then_branch", type=graph_type).SerializeToString() + _field(AP, "g", inner)
            node = helper.make_node("If", ["c"], [out_name], else_branch=leaf).SerializeToString() + _field(NP, "attribute", then_attr)
            if level == depth:
                top = helper.make_graph([], "nested", [_vi("x"), _vi("c", TensorProto.BOOL, [])], [_vi("y")])
                inner = top.SerializeToString() + _field(GP, "node", node)
            else:
                inner = helper.make_graph([], f"g{level}", [], [_vi(out_name, shape=(2, 4))]).SerializeToString() + _field(GP, "node", node)
    else:
        one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")

        def body_graph(level: int, nodes) -> onnx.GraphProto:  # names carry the level: SSA across scopes
            ins = [_vi(f"i{level}", TensorProto.INT64, []), _vi(f"c{level}", TensorProto.BOOL, []), _vi(f"v{level}")]
            outs = [_vi(f"co{level}", TensorProto.BOOL, []), _vi(f"vo{level}")]
            return helper.make_graph([helper.make_node("Identity", [f"c{level}"], [f"co{level}"]), *nodes], f"body{level}", ins, outs)

        inner = body_graph(0, [helper.make_node("Identity", ["v0"], ["vo0"])]).SerializeToString()
        for level in range(1, depth + 1):
            body_attr = AP(name="body", type=graph_type).SerializeToString() + _field(AP, "g", inner)
            if level == depth:
                loop = helper.make_node("Loop", ["one", "t", "x"], ["y"]).SerializeToString() + _field(NP, "attribute", body_attr)
                top = helper.make_graph([], "nested", [_vi("x")], [_vi("y")], [one, numpy_helper.from_array(np.array(True), "t")])
                inner = top.SerializeToString() + _field(GP, "node", loop)
            else:
                loop = helper.make_node("Loop", ["one", f"c{level}", f"v{level}"], [f"vo{level}"]).SerializeToString() + _field(NP, "attribute", body_attr)
                inner = body_graph(level, []).SerializeToString() + _field(GP, "node", loop)
    head = helper.make_model(helper.make_graph([], "unused", [], []), opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    head.ClearField("graph")
    return head.SerializeToString() + _field(MP, "graph", inner)


def _nested(depth: int, op: str) -> Callable[[Path], Path]:
    return lambda folder: _write(folder, nested_model_bytes(depth, op))


def _long_chain(folder: Path) -> Path:
    """2,000 Identity nodes in a row: deeper than Python's recursion limit for anything that recurses over producers."""
    n = 2_000
    nodes = [helper.make_node("Identity", ["x" if i == 0 else f"v{i - 1}"], ["y" if i == n - 1 else f"v{i}"]) for i in range(n)]
    return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))


def _huge_loop_trip_count(folder: Path) -> Path:
    """A Loop whose trip count input is negative: a malformed count, not an endless loop."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("v_in")],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("v_out")],
    )
    inits = [numpy_helper.from_array(np.array(-5, dtype=np.int64), "m"), numpy_helper.from_array(np.array(True), "t")]
    return _write(folder, _model([helper.make_node("Loop", ["m", "t", "x"], ["y"], body=body)], [_vi("x")], [_vi("y")], inits))


def _constant_of_shape_huge(folder: Path) -> Path:
    """A constant subexpression worth 4 TiB: ConstantOfShape([2^20, 2^20]) must not be folded or run."""
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x", shape=[1, 1])], [_vi("y", shape=None)], [shape]))


def _expand_huge(folder: Path) -> Path:
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], dtype=np.int64), "shape")
    one = numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one")
    nodes = [helper.make_node("Expand", ["one", "shape"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x", shape=[1])], [_vi("y", shape=None)], [shape, one]))


def _range_huge(folder: Path) -> Path:
    limits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for v, n in ((0, "start"), (1 << 40, "limit"), (1, "delta"))]
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]), helper.make_node("ReduceMax", ["r"], ["m"], keepdims=0), helper.make_node("Add", ["x", "m"], ["y"])]
    return _write(folder, _model(nodes, [_vi("x", TensorProto.INT64, shape=[1])], [_vi("y", TensorProto.INT64, shape=None)], limits))


# ---- external data


def _external(location: str, offset: int | None = 0, length: int | None = None, data: bytes | None = None, where: str = "initializer"):
    """A model whose weight ``w`` [4,4] float is stored externally at ``location`` (relative to in/)."""

    def build(folder: Path) -> Path:
        w = _weights()
        payload = w.tobytes() if data is None else data
        root = folder.parent
        (root / "outside.bin").write_bytes(payload)
        (root / "secret").mkdir(exist_ok=True)
        (root / "secret" / "secret.bin").write_bytes(payload)
        (folder / "weights.bin").write_bytes(payload)
        tensor = numpy_helper.from_array(w, "w")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entries = [("location", location)]
        if offset is not None:
            entries.append(("offset", str(offset)))
        entries.append(("length", str(length if length is not None else w.nbytes)))
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        if where == "initializer":
            return _write(folder, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [tensor]))
        if where == "constant":
            nodes = [helper.make_node("Constant", [], ["w"], value=tensor), helper.make_node("MatMul", ["x", "w"], ["y"])]
            return _write(folder, _model(nodes, [_vi("x")], [_vi("y")]))
        if where == "subgraph":
            branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t")], [tensor])
            other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e")])
            nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
            return _write(folder, _model(nodes, [_vi("x"), _vi("c", TensorProto.BOOL, [])], [_vi("y")]))
        if where == "sparse":
            values = tensor
            values.dims[:] = [16]
            indices = numpy_helper.from_array(np.arange(16, dtype=np.int64), "w_idx")
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [_vi("x")], [_vi("y")],
                sparse_initializer=[helper.make_sparse_tensor(values, indices, [4, 4])],
            )
            return _write(folder, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION))
        if where == "function":
            fn = helper.make_function(
                "local", "F", ["a"], ["b"],
                [helper.make_node("Constant", [], ["k"], value=tensor), helper.make_node("MatMul", ["a", "k"], ["b"])],
                [helper.make_opsetid("", OPSET)],
            )
            proto = _model([helper.make_node("F", ["x"], ["y"], domain="local")], [_vi("x")], [_vi("y")], functions=[fn])
            proto.opset_import.append(helper.make_opsetid("local", 1))
            return _write(folder, proto)
        raise ValueError(where)

    return build


def _external_symlink(folder: Path) -> Path:
    path = _external("link.bin")(folder)
    os.symlink(folder.parent / "secret" / "secret.bin", folder / "link.bin")
    return path


def _external_symlinked_folder(folder: Path) -> Path:
    path = _external("sub/secret.bin")(folder)
    os.symlink(folder.parent / "secret", folder / "sub")
    return path


def _external_is_folder(folder: Path) -> Path:
    path = _external("data")(folder)
    (folder / "data").mkdir()
    return path


def _external_is_fifo(folder: Path) -> Path:
    """Reading a FIFO would block forever: it must be refused, not opened."""
    path = _external("pipe.bin")(folder)
    os.mkfifo(folder / "pipe.bin")
    return path


def _external_dev_zero(folder: Path) -> Path:
    """A symlink inside the folder to /dev/zero: endless data, outside the folder."""
    path = _external("zero.bin")(folder)
    os.symlink("/dev/zero", folder / "zero.bin")
    return path


def _external_huge_sparse_file(folder: Path) -> Path:
    """An initializer of [2^34] floats (64 GiB) whose external file exists as a sparse file of that size."""
    nbytes = (1 << 34) * 4
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 34])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "huge.bin"), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with open(folder / "huge.bin", "wb") as fh:
        fh.truncate(nbytes)
    return _write(folder, _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", shape=[1])], [_vi("y", shape=[1 << 34])], [tensor]))


# ---------------------------------------------------------------------------------------------- hostile text

# Names a model may hold that the CLI must print as plain text: rich markup (every TorchScript node name starts
# with "/", so "[/m/...]" in a pipeline is a closing tag to rich), terminal escape sequences (colour, an OSC 8
# hyperlink, a bell, carriage return, a right-to-left override) and 10,000-character names.
TS_NAME = "/m/encoder/layer.0/attention/self/query/MatMul"
HOSTILE_NAMES = {
    "markup": (TS_NAME, "[/x]", "[link=http://e]a[/link]", "[bold]", "[red]x[/red] :smile:"),
    "escapes": ("\x1b[31mred\x1b[0m", "\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "bell\x07cr\rnl\n", "\u202eevil\x1b[2J"),
    "long": ("n" * 10_000, "[/" + "x" * 9_998, TS_NAME),
}


def hostile_names_proto(kind: str, d: int = 8) -> onnx.ModelProto:
    """x -> (MatMul -> Relu) per name -> y: node, weight and value names are the hostile names, and so are
    the input and output names (which is what the validation table lists)."""
    names = HOSTILE_NAMES[kind]
    nodes, inits, prev = [], [], f"in{names[1]}"
    for i, name in enumerate(names):
        inits.append(numpy_helper.from_array(_weights((d, d), i), f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [prev, f"{name}.weight"], [f"{name}/mm{i}"], name=name))
        nodes.append(helper.make_node("Relu", [f"{name}/mm{i}"], [f"{name}/relu{i}"], name=f"{name}/Relu"))
        prev = f"{name}/relu{i}"
    nodes.append(helper.make_node("Identity", [prev], [f"out{names[-1]}"], name=f"{names[-2]}/out"))
    return _model(nodes, [_vi(f"in{names[1]}", shape=("N", d))], [_vi(f"out{names[-1]}", shape=("N", d))], inits)


def _hostile_names(kind: str) -> Callable[[Path], Path]:
    return lambda folder: _write(folder, hostile_names_proto(kind))


def _hostile_metadata(folder: Path) -> Path:
    """Model and graph doc strings, graph name, producer and metadata (keys and values) holding markup,
    escape sequences and 10k characters: ``inspect`` prints them."""
    proto = mlp_proto()
    proto.doc_string = "doc [bold]\x1b[31m" + "d" * 10_000
    proto.graph.doc_string = "[/graph-doc]"
    proto.graph.name = "[link=http://e]g[/link]"
    proto.producer_name, proto.producer_version = "[/x]producer", "\x1b[2J1.0"
    helper.set_model_props(proto, {"[/key]": "[red]v[/red]\x1b]8;;http://evil\x1b\\", "long": "[" * 10_000, "\x1b[31mk": "\n\r"})
    return _write(folder, proto)


# ---------------------------------------------------------------------------------------------- mutations

SEEDS = {"mlp": mlp_proto, "if": if_proto}
MUTATIONS = ("flip_bytes", "truncate", "delete_field", "change_dtype", "set_dim", "duplicate_node")
_DIM_VALUES = (-1, 0, 1, 3, 1 << 31, 1 << 40, (1 << 63) - 1)
_DTYPE_VALUES = (*onnx.TensorProto.DataType.values(), 31, 999)


def _messages(msg):
    """Every (message, field, index) of a proto, depth first; index is None for a singular field."""
    for field, value in msg.ListFields():
        if field.is_repeated:
            for i, item in enumerate(value):
                yield msg, field, i
                if field.type == field.TYPE_MESSAGE:
                    yield from _messages(item)
        else:
            yield msg, field, None
            if field.type == field.TYPE_MESSAGE:
                yield from _messages(value)


def mutate(seed: str, kind: str, index: int, value: int) -> bytes:
    """A valid seed model with one deterministic mutation; ``index`` picks the place, ``value`` the change."""
    proto = SEEDS[seed]()
    if kind in ("flip_bytes", "truncate"):
        data = bytearray(proto.SerializeToString())
        if kind == "truncate":
            return bytes(data[: index % len(data)])
        rng = random.Random(index * 65_537 + value)
        for _ in range(1 + value % 4):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        return bytes(data)
    if kind == "delete_field":
        places = list(_messages(proto))
        msg, field, i = places[index % len(places)]
        if i is None:
            msg.ClearField(field.name)
        else:
            del getattr(msg, field.name)[i]
    elif kind == "change_dtype":
        places = [m for m, f, i in _messages(proto) if f.name in ("data_type", "elem_type")]
        msg = places[index % len(places)]
        setattr(msg, "data_type" if isinstance(msg, onnx.TensorProto) else "elem_type", _DTYPE_VALUES[value % len(_DTYPE_VALUES)])
    elif kind == "set_dim":
        places = [(m, f, i) for m, f, i in _messages(proto) if f.name in ("dims", "dim_value")]
        msg, field, i = places[index % len(places)]
        new = _DIM_VALUES[value % len(_DIM_VALUES)]
        if i is None:
            msg.dim_value = new
        else:
            msg.dims[i] = new
    elif kind == "duplicate_node":
        nodes = proto.graph.node
        nodes.insert(index % (len(nodes) + 1), nodes[value % len(nodes)])
    else:
        raise ValueError(kind)
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------- corpus

_LOAD = "not a valid ONNX model"
_ORT_LOAD = "onnxruntime cannot load the model"


def cases() -> list[Case]:
    c = Case
    out = [
        # ---- not an ONNX file at all
        c("zero_bytes", _bytes_file(b""), 1, "empty", inspect=1, validate=1),
        c("random_16_bytes", _raw_bytes(1, 16), 1, _LOAD, inspect=1, validate=1),
        c("random_4k", _raw_bytes(2, 4096), 1, _LOAD, inspect=1),
        c("random_1m", _raw_bytes(3, 1 << 20), 1, _LOAD),
        c("all_zero_bytes", _bytes_file(b"\x00" * 4096), 1, _LOAD),
        c("all_ff_bytes", _bytes_file(b"\xff" * 4096), 1, _LOAD),
        c("torch_save_zip", _torch_pt, 1, _LOAD, inspect=1, validate=1),
        c("plain_zip", _plain_zip, 1, _LOAD, inspect=1),
        c("png_header", _png, 1, _LOAD, inspect=1),
        c("gzip", _bytes_file(b"\x1f\x8b\x08\x00" + zlib.compress(b"onnx" * 100)), 1, _LOAD),
        c("elf_header", _bytes_file(b"\x7fELF\x02\x01\x01" + b"\x00" * 57), 1, _LOAD),
        c("npz_file", _npz, 1, _LOAD),
        c("safetensors", _safetensors, 1, _LOAD),
        c("onnx_text_format", _onnx_text, 1, _LOAD, inspect=1),
        c("json_text", _bytes_file(b'{"irVersion": "10", "graph": {"node": []}}'), 1, _LOAD),
        c("tensor_proto_not_model", _tensor_proto, 1, _LOAD, inspect=1),
        c("model_is_folder", _model_is_folder, 2, "is a directory", inspect=2, validate=2),
        c("model_missing", _model_missing, 2, "no such file", inspect=2, validate=2),
        c("model_dangling_symlink", _model_dangling_symlink, 2, "no such file"),
        c("model_is_fifo", _model_is_fifo, 1, "empty", inspect=1, isolate=True),
        c("model_is_dev_zero", _model_is_dev_zero, 1, "empty", inspect=1, isolate=True),
        # ---- truncated protobuf
        c("truncated_1_byte", _truncated(keep=1), 1, _LOAD, inspect=1),
        c("truncated_10pct", _truncated(0.10), 1, _LOAD),
        c("truncated_50pct", _truncated(0.50), 1, _LOAD, inspect=1),
        c("truncated_90pct", _truncated(0.90), 1, _LOAD),
        c("truncated_last_byte", lambda f: _truncated(keep=len(mlp_proto().SerializeToString()) - 1)(f), 1, _LOAD),
        # ---- model-level structure
        c("no_graph", _no_graph, 1, "no graph", inspect=1, validate=1),
        c("ir_version_zero", _ir_version_zero, 1, "ir_version", inspect=1),
        c("ir_version_99", _ir_version_future, 1, _ORT_LOAD),
        c("no_opset_import", _no_opset_import, 1, _ORT_LOAD),
        c("empty_graph", _empty_graph, 1, _ORT_LOAD, note="valid for the checker; onnxruntime cannot build a session"),
        # ---- graph topology
        c("cycle", _cycle, 1, "not acyclic", inspect=0, validate=1),
        c("self_loop", _self_loop, 1, "not acyclic", inspect=0),
        c("undefined_value", _undefined_input, 1, "'ghost' of node '' (::Add:) cannot be found", inspect=1, validate=1),
        c("output_never_produced", _undefined_output, 1, "output 'y' is not produced by any node", inspect=1),
        c("duplicate_node_outputs", _duplicate_node_outputs, 1, "output 'y' is redeclared", inspect=1, validate=1),
        c("duplicate_graph_outputs", _duplicate_graph_outputs, 0, note="valid: onnx.checker and onnxruntime accept y listed twice"),
        c("duplicate_graph_inputs", _duplicate_inputs, 1, "duplicate definition-site for (x)"),
        c("output_is_input", _output_is_input, 0, note="valid: y = x"),
        c("long_chain_2k", _long_chain, 0, isolate=True, note="valid; deep for recursive walkers"),
        # ---- shapes and dims
        c("input_dim_2pow40", _dims([1 << 40, 4]), 1, "cap", inspect=0),
        c("input_dims_overflow_int64", _dims([1 << 40, 1 << 40, 1 << 40]), 1, "cap"),
        c("input_negative_dims", _dims([-3, 4]), 0, note="onnx.checker accepts it; a negative dim is treated as unknown"),
        c("input_rank_64", _dims([1] * 64), 0, note="valid"),
        c("huge_initializer_tiny_data", _huge_initializer, 1, "raw data holds 16 bytes, its shape [1099511627776] and type need 4398046511104", inspect=1),
        c("huge_constant_no_data", _huge_constant_attr, 1, "tensor 'c' is malformed"),
        c("constant_of_shape_4tib", _constant_of_shape_huge, 1, "failed to allocate memory", isolate=True, note="not folded (fold max_output); onnxruntime refuses the allocation"),
        c("expand_4tib", _expand_huge, 1, "failed to allocate memory", isolate=True),
        c("range_2pow40", _range_huge, 1, "failed to allocate memory", isolate=True),
        c("raw_data_too_short", _raw_size_mismatch(10), 1, "raw data holds 10 bytes, its shape [4, 4] and type need 64", inspect=1, validate=1),
        c("raw_data_too_long", _raw_size_mismatch(100), 1, "raw data holds 100 bytes"),
        c("float_data_count_mismatch", _float_data_count_mismatch, 1, "float_data size (3) is too small"),
        c("negative_initializer_dims", _negative_initializer_dims, 1, "negative dimension"),
        # ---- types
        c("initializer_dtype_undefined", _initializer_dtype(0), 1, "undefined is not allowed", inspect=1),
        c("initializer_dtype_999", _initializer_dtype(999), 1, "unknown data type (999)"),
        c("initializer_dtype_string_raw", _initializer_dtype(TensorProto.STRING), 1, "should not be stored in raw_data"),
        c("input_dtype_undefined", _input_dtype(0), 1, "input 'x' has data type undefined", inspect=0),
        c("input_dtype_999", _input_dtype(999), 1, "999 is not a valid datatype"),
        c("input_without_type", _input_without_type, 1, "input 'x' is not a tensor"),
        c("string_input_identity", _string_input, 0, note="valid: strings pass through"),
        c("string_into_matmul", _string_into_matmul, 1, "tensor(string)"),
        c("sequence_input", _sequence_input, 1, "not a tensor"),
        # ---- opsets and domains
        c("opset_1", _opset(1), 1, "could not find an implementation for relu(1)", note="onnxruntime does not run opset 1"),
        c("opset_7", _opset(7), 0, note="the oldest opset onnxruntime runs"),
        c("opset_newest", _newest_opset, 0, note="onnx.defs.onnx_opset_version()"),
        c("opset_future", _future_opset, 1, _ORT_LOAD),
        c("unknown_domain", _unknown_domain, 1, "com.evil:boom(-1) is not a registered function/op", inspect=0),
        c("undeclared_domain", _undeclared_domain, 1, "no opset import for domain 'com.undeclared'"),
        c("unknown_op", _unknown_op, 1, "no op registered for nosuchop"),
        c("attribute_wrong_type", _wrong_attribute_type, 1, "mismatched attribute type"),
        c("attribute_type_lies", _attribute_type_lies, 1, "type field and data field mismatch"),
        c("recursive_function", _recursive_function, 1, _ORT_LOAD, isolate=True),
        c("mutually_recursive_functions", _mutually_recursive_functions, 1, _ORT_LOAD, isolate=True),
        c("loop_negative_trip_count", _huge_loop_trip_count, 0, note="valid: M < 0 runs no iteration"),
        # ---- nesting
        c("nested_if_30", _nested(30, "If"), 0, note="valid and within every parser's limits"),
        c("nested_loop_20", _nested(20, "Loop"), 0, note="valid"),
        c("nested_if_40", _nested(40, "If"), 1, _LOAD, note="over protobuf's nesting limit of 100 messages"),
        c("nested_if_1000", _nested(1000, "If"), 1, _LOAD, inspect=1, validate=1, isolate=True),
        c("nested_loop_1000", _nested(1000, "Loop"), 1, _LOAD, isolate=True),
        # ---- external data
        c("external_valid", _external("weights.bin"), 0, note="control: safe external data is accepted and kept external"),
        c("external_in_sparse_valid", _external("weights.bin", where="sparse"), 0, note="sparse values read relative to the model's folder"),
        c("external_absolute_path", _external("/etc/passwd"), 1, "absolute", inspect=1, validate=1),
        c("external_absolute_outside", lambda f: _external(str(f.parent / "outside.bin"))(f), 1, "absolute"),
        c("external_dotdot", _external("../outside.bin"), 1, "escapes", inspect=1, validate=1),
        c("external_dotdot_nested", _external("a/../../outside.bin"), 1, "escapes"),
        c("external_symlink_file", _external_symlink, 1, "escapes", inspect=1),
        c("external_symlink_folder", _external_symlinked_folder, 1, "escapes"),
        c("external_missing_file", _external("missing.bin"), 1, "missing", inspect=1, validate=1),
        c("external_empty_location", _external(""), 1, "location"),
        c("external_is_folder", _external_is_folder, 1, "is not a regular file"),
        c("external_fifo", _external_is_fifo, 1, "is not a regular file", isolate=True),
        c("external_symlink_dev_zero", _external_dev_zero, 1, "escapes"),
        c("external_length_past_end", _external("weights.bin", offset=0, length=1 << 20), 1, "past the end", inspect=1),
        c("external_offset_past_end", _external("weights.bin", offset=1 << 30, length=64), 1, "past the end"),
        c("external_negative_offset", _external("weights.bin", offset=-8, length=64), 1, "negative"),
        c("external_non_integer_length", _external("weights.bin", offset="0", length="sixty-four"), 1, "integer"),  # type: ignore[arg-type]
        c("external_length_short_for_shape", _external("weights.bin", length=8), 1, "external data size mismatch"),
        c("external_in_constant_dotdot", _external("../outside.bin", where="constant"), 1, "escapes"),
        c("external_in_subgraph_absolute", _external("/etc/passwd", where="subgraph"), 1, "absolute"),
        c("external_in_sparse_absolute", _external("/etc/passwd", where="sparse"), 1, "absolute", inspect=1),
        c("external_in_function_dotdot", _external("../outside.bin", where="function"), 1, "escapes"),
        c("external_huge_sparse_file", _external_huge_sparse_file, 1, _ORT_LOAD, isolate=True, note="64 GiB of weights: refused by onnxruntime under the 4 GiB limit"),
        # ---- model-derived text: printed literally (tests/reliability/test_hostile.py also checks what is printed)
        c("names_markup", _hostile_names("markup"), 0, inspect=0, validate=0, note="node/weight/value/input/output names are rich markup"),
        c("names_escape_sequences", _hostile_names("escapes"), 0, inspect=0, validate=0, note="names hold ANSI/OSC escapes, BEL, CR, LF, RLO"),
        c("names_10k_chars", _hostile_names("long"), 0, inspect=0, validate=0, note="10,000-character names"),
        c("metadata_markup_and_escapes", _hostile_metadata, 0, inspect=0, validate=0, note="doc strings, graph name, producer and metadata"),
    ]
    names = [x.name for x in out]
    assert len(names) == len(set(names)), "case names must be unique"
    return out


CASES = {case.name: case for case in cases()}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for case in CASES.values():
        folder = target / case.name / "in"
        folder.mkdir(parents=True, exist_ok=True)
        case.build(folder)
    print(f"{len(CASES)} cases written to {target}")
