"""The ``qdq`` pass's options and the constants its modules share."""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from onnxpress.pass_infra import option

FLOAT = ir.DataType.FLOAT
QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized",
    "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
}
MS_DOMAIN = "com.microsoft"
# 0.85 and 0.95: on MiniLM 20 of 24 activations picked 0.75 when it was the largest alpha tried (the search sat on its edge).
SMOOTH_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.95)


@dataclasses.dataclass(frozen=True)
class QdqOptions:
    """Options of the ``qdq`` pass (each field is a pipeline key; its help text is its documentation).

    int4 for a deployed decoder LLM (issue 18, SmolLM2-135M from Q4_1 source weights, benchmarks/llm_int4_bench.py):
    ``qdq(mode=int4,awq=true,int4_symmetric=true,int4_signed=true,gptq_act_order=true,gptq_refit=true,gptq_damp=0.3)``
    stores no zero points (MatMulNBits decodes at the speed of onnxruntime-genai's int4, smaller than its file) and
    keeps perplexity within +10%: the 16-level signed grid, GPTQ in act order with static groups, the
    least-squares scale refit and a stronger dampening each took part of the gap to asymmetric blocks
    (measured in benchmarks/results/llm_int4.md). Defaults are unchanged: each of these options is off.
    """

    mode: Literal["static", "weight", "int4"] = option(
        "static", "static: int8 weights and activations (needs calibration data); weight: int8 weights only; int4: block-wise 4-bit weights"
    )
    per_channel: bool = option(True, "int8 weights: one scale per output channel (false: one per tensor)")
    activation_type: Literal["uint8", "int8"] = option("uint8", "static: integer type of activations (asymmetric; uint8 is ORT's fast CPU path)")
    calibrate: Literal["minmax", "percentile", "entropy", "mse"] = option("minmax", "static: how activation clip ranges are chosen")
    percentile: float = option(99.999, "calibrate=percentile: percent of calibration values kept inside the range")
    smooth: Literal["auto", "fixed", "off"] = option(
        "auto", "static: SmoothQuant (move activation outlier channels into the weights); auto searches alpha per tensor"
    )
    smooth_alpha: float = option(0.5, "smooth=fixed: migration strength alpha in [0, 1]")
    smooth_min_gain: float = option(
        1.0,
        "smooth=auto: keep SmoothQuant for an activation only where it divides the layer's simulated output error by at "
        "least this factor (1: wherever it helps; each kept one costs a Mul at run time unless folded into its producer)",
    )
    weight_method: Literal["rtn", "mse", "gptq"] = option(
        "gptq", "weights: round-to-nearest, MSE clip search per channel/block, or GPTQ error compensation (needs calibration data; else mse)"
    )
    weight_type: Literal["auto", "int8", "uint8"] = option(
        "auto",
        "8-bit weight storage: int8 (ORT's u8s8 kernels, the fast ones), or uint8 with zero point 128 (u8u8 kernels: no int16 "
        "saturation on x86 CPUs without VNNI, but ~1.7x slower GEMMs on CPUs with it); auto: int8 unless the CPU running the pass is x86 without VNNI",
    )
    reduce_range: bool = option(False, "int8 weights in 7 bits (the other way to avoid u8s8 saturation on AVX2 CPUs without VNNI)")
    quantize_activations_of: tuple[str, ...] = option(
        (), "static: op types whose float activation inputs are also quantized (MatMul: attention activation x activation matmuls; also Add, Softmax, ...)"
    )
    embeddings: Literal["auto", "int8", "int4", "float"] = option("auto", "Gather of embedding tables (auto: int4 in int4 mode, else int8 per row)")
    block_size: int = option(32, "int4: block size along K (power of 2, >= 16)")
    embedding_block_size: int = option(64, "int4 embeddings: block size along the embedding dimension (power of 2, >= 16)")
    int4_format: Literal["matmulnbits", "qdq"] = option(
        "matmulnbits", "int4: com.microsoft MatMulNBits/GatherBlockQuantized (ORT CPU/GPU kernels) or standard DequantizeLinear(block_size) (opset 21)"
    )
    int4_symmetric: bool = option(False, "int4: symmetric blocks (no zero points)")
    int4_signed: bool = option(
        False,
        "int4_symmetric: all 16 levels (-8..7 around MatMulNBits' implicit zero point 8), each block's largest-magnitude "
        "value on -8 with a signed scale (onnxruntime-genai's builder grid); false: 15 levels -7..7",
    )
    gptq_act_order: bool = option(
        False,
        "int4 GPTQ: round the rows in descending order of the Hessian diagonal, each block's scale fixed up front "
        "(static groups) by a clip search weighted by that diagonal",
    )
    gptq_damp: float = option(
        0.01,
        "GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean (more: less trust in the calibration "
        "sample's input correlations, e.g. when a layer has more inputs than calibration tokens)",
    )
    gptq_refit: bool = option(
        False,
        "int4 GPTQ: after rounding, refit every block scale by least squares on the layer's output error for the "
        "codes GPTQ chose (one small solve per column); the clip search before it is weighted by the Hessian diagonal",
    )
    embedding_split: bool = option(
        False,
        "int4 embeddings: rows the calibration data indexes keep int4 (embedding_block_size), all others 2-bit "
        "(embedding_cold_block_size); needs calibration data and int4_format=matmulnbits",
    )
    embedding_cold_block_size: int = option(128, "embedding_split: block size of the 2-bit rows (power of 2, >= 16)")
    accuracy_level: int = option(
        4,
        "int4 MatMulNBits accuracy_level, the least accurate compute ORT may use: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 (the input is quantized per block to int8). ORT CPU takes the least accurate level it has a kernel for at "
        "or above the one given: on x86 1-3 run as fp32, 4 as int8. Default 4: SmolLM2-135M decodes 3.5x faster than at 0 "
        "(26.4 vs 7.6 tok/s, 2 threads, AVX2) for +0.5% perplexity",
    )
    awq: bool = option(
        False,
        "int4: activation-aware scaling (AWQ): per input channel factors searched on the calibration activations "
        "(needs calibration data), folded into the producing norm's weight or MatMul where possible, else a Mul; "
        "combines with weight_method (gptq/mse/rtn rounds the scaled weights)",
    )
    include: tuple[str, ...] = option(
        (), "node names or op types to quantize, all others left in float (empty: every eligible node); exclude still wins"
    )
    exclude: tuple[str, ...] = option((), "node names or op types left in float")
    weight_only: tuple[str, ...] = option(
        (), "static: node names or op types whose input activations stay float (int8 weights only), for layers the error report shows are sensitive"
    )
    bias_correction: bool = option(
        True, "static: add to each layer's float bias the mean output error its quantization causes on the calibration sample"
    )
    calibration_rows: int = option(4096, "rows (tokens / pixels) per activation sampled for clip searches and layer errors")
    report_errors: bool = option(False, "measure in ORT the model-output cosine caused by each quantized layer alone (one run per layer)")

    def validate(self) -> None:
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError("smooth_alpha must be in [0, 1]")
        if not self.smooth_min_gain >= 1.0:
            raise ValueError("smooth_min_gain must be >= 1")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (0, 100]")
        for key in ("block_size", "embedding_block_size", "embedding_cold_block_size"):
            size = getattr(self, key)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{key} must be a power of 2 and >= 16")
        if self.calibration_rows < 16:
            raise ValueError("calibration_rows must be >= 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy_level must be 0..4")
        if not 0.0 < self.gptq_damp <= 10.0:
            raise ValueError("gptq_damp must be in (0, 10]")
        if self.int4_signed and not self.int4_symmetric:
            raise ValueError("int4_signed applies to symmetric blocks: add int4_symmetric=true")
        if self.embedding_split:
            if self.int4_format != "matmulnbits":
                raise ValueError("embedding_split needs int4_format=matmulnbits (2-bit rows are GatherBlockQuantized bits=2)")
            if not (self.embeddings == "int4" or (self.embeddings == "auto" and self.mode == "int4")):
                raise ValueError("embedding_split applies to int4 embeddings: use mode=int4 or embeddings=int4")
