"""The ``qdq`` pass class: finds the targets, calibrates, plans and rewrites (see ``Qdq``)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxpress.errors import UsageError
from onnxpress.pass_infra import Pass
from onnxpress.passes import quant_math as qm
from onnxpress.passes.qdq.options import QdqOptions
from onnxpress.passes.qdq.plan import Plan, make_plan
from onnxpress.passes.qdq.rewrite import apply_plan
from onnxpress.passes.qdq.targets import find_targets, infer_types


class Qdq(Pass):
    """``qdq``: quantize MatMul, Gemm, Conv weights (and activations in static mode) and embedding Gathers.

    Rewrites (ORT fuses each pattern into an integer kernel at load time):
    - static: ``x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- int8 W`` (ORT CPU:
      MatMulIntegerToFloat, u8s8 with int8 weights). Activations get calibrated per-tensor ranges
      (minmax/percentile/entropy/MSE); SmoothQuant moves outlier channels of an activation into the weights
      through one ``Mul(x, 1/s)`` before the QuantizeLinear (a per-channel QuantizeLinear would save the node
      but ORT's CPU kernel for it is 6-8x slower on MiniLM), or, where ``x`` comes from a MatMul/Gemm through
      only its bias Add and Relu/LeakyRelu, by dividing that layer's weight columns and bias (no node at all).
      Gemm biases become int32 at ``a_scale * w_scale`` (ORT fuses DQ -> Gemm into QGemm only when every input
      is dequantized). Bias correction adds each layer's mean output error
      on the calibration sample to its float bias. Only the inputs of MatMul/Gemm/Conv are quantized by
      default: Softmax, LayerNormalization, residual Add, GELU and attention's activation x activation
      MatMuls stay float (``quantize_activations_of`` adds them); ``weight_only`` keeps chosen layers' inputs
      float, ``include``/``exclude`` choose the layers.
    - weight: int8 per-channel weights behind DequantizeLinear (ORT CPU fuses DQ+MatMul into MatMulNBits).
    - int4: block-wise 4-bit weights of MatMul and Gemm (GPTQ with calibration data, else MSE clip search)
      as com.microsoft MatMulNBits (Gemm: alpha folded into the scales, beta * C added after) or standard
      DequantizeLinear with ``block_size`` (opset 21; Gemm transB=1 gets its blocks along axis 1).
    - embeddings (Gather of a constant table by indices): int8 per row (Gather + Cast + Mul, standard ops) or
      int4 GatherBlockQuantized.
    Applies to float32 initializer weights; a weight already behind DequantizeLinear is skipped (so a second
    run changes nothing). Lossy: each layer reports its scale, clipped fraction and output error on the
    calibration sample (``report_errors`` adds the model-output cosine of each layer quantized alone).
    """

    name = "qdq"
    Options = QdqOptions
    lossless = False
    min_opset = lambda o: 21 if (o.mode == "int4" and o.int4_format == "qdq") else 13  # noqa: E731 - per-axis DequantizeLinear: 13; block_size: 21
    planner: ClassVar[type]  # QdqPlanner: the package sets it (the planner makes Qdq instances, so it imports this module)
    # What a deployment target (``onnxpress.targets``) changes in these options' defaults, and why; an option the
    # user sets in the pipeline text still wins. Target name -> {option: value} and -> {option: reason}.
    target_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "cuda": {"weight_type": "int8"},
        # per_channel stays True on purpose: NNAPI's QDQ MatMul/Gemm want per-tensor weight scales, but
        # per-tensor int8 weights wreck transformers (MiniLM: embedding cosine 0.42 per-tensor vs 0.9925
        # per-channel, same run); the CPU provider and XNNPACK take per-channel weights, NNAPI Conv does too.
        "mobile": {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False, "smooth": "off"},
    }
    target_reasons: ClassVar[dict[str, dict[str, str]]] = {
        "cuda": {"weight_type": "symmetric int8 weights (zero point 0); uint8+128 only helps AVX2 CPU kernels"},
        "mobile": {
            "activation_type": "NNAPI takes only uint8 (asymmetric) activations in QDQ groups",
            "weight_type": "NNAPI/XNNPACK take int8 weights only when symmetric (zero point 0)",
            "reduce_range": "7-bit weights are an x86 AVX2 workaround; mobile kernels use the full int8 range",
            "smooth": "SmoothQuant puts a float Mul in front of most QuantizeLinear nodes: one more op per quantized input for the mobile EPs to place",
        },
    }

    # -- entry ---------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        if o.mode == "static" and o.quantize_activations_of:
            infer_types(model)
        targets, skipped = find_targets(model, o)
        self.details.extend(skipped)
        if not targets:
            if not skipped:
                self.details.append({"layer": "(model)", "skipped": "no float MatMul/Gemm/Conv/Gather weights to quantize"})
            return ir.passes.PassResult(model, False)
        feeds = self._feeds(model)
        reference = None
        if o.report_errors and feeds:
            from onnxpress import runtime

            # a copy that keeps where external data lives: sessions of it open from any working directory
            reference = runtime.copy_model(model)
        plan = make_plan(model, targets, o, feeds)
        apply_plan(model, plan, o)
        self.details.extend(row for row in plan.rows)
        if reference is not None:
            self._report_errors(reference, plan, feeds)
        return ir.passes.PassResult(model, True)

    def _feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]] | None:
        feeds = self.context.calibration
        o = self.options
        needs = o.mode == "static" or o.report_errors or o.embedding_split or (o.awq and o.mode == "int4")
        if not feeds:
            if o.mode == "static":
                raise UsageError("qdq(mode=static) needs calibration data: pass --calibration PATH (CLI) or calibration= (API), or use mode=weight")
            if o.embedding_split:
                raise UsageError("qdq(embedding_split=true) needs calibration data (it keeps the rows the data uses at 4 bits): pass --calibration PATH or calibration=")
            if o.report_errors:
                raise UsageError("qdq(report_errors=true) needs calibration data: pass --calibration PATH or calibration=")
            if o.awq and o.mode == "int4":
                raise UsageError("qdq(awq=true) needs calibration data (it scales weights by their inputs' magnitudes): pass --calibration PATH or calibration=")
            return None
        from onnxpress.data import check_feeds

        for i, feed in enumerate(feeds):
            check_feeds(feed, model, where=f"calibration batch {i}")
        return feeds if (needs or o.weight_method == "gptq") else None

    def _report_errors(self, reference, plan: Plan, feeds) -> None:
        from onnxpress import runtime

        feeds = feeds[:4]
        ref_session = runtime.make_session(reference)
        names = [o.name for o in ref_session.get_outputs()]
        expected = [runtime.run(ref_session, f, names) for f in feeds]
        for row, target_index in zip(plan.rows, plan.row_targets):
            if target_index is None:
                continue
            single = runtime.copy_model(reference)
            nodes = list(single.graph)
            sub = plan.restrict(target_index, nodes)
            apply_plan(single, sub, self.options)
            session = runtime.make_session(single)
            cos = min(
                qm.cosine(runtime.run(session, f, names)[n], e[n]) for f, e in zip(feeds, expected) for n in names if e[n].dtype.kind == "f"
            )
            row["model_cosine_alone"] = round(cos, 6)
