"""Export target profiles: where Q/DQ pairs go and in which integer and float types.

The contract between calibration and export: calibration models exactly the quantization points the
profile places, so the PyTorch fake-quant reference and the shipped graph compute the same function, and the
exporter places them. It sits in calibration/ (which the exporter already reads) so that calibration never
imports from the exporter. Pure data, no heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ConfigError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    activation_signed: bool  # False: uint8 asymmetric (zero point free); True: int8 symmetric, zero point 0
    conv_output: bool  # quantize every Conv output (ORT forms QLinearConv only with a Q on the output)
    linear_output: bool  # quantize Linear outputs (False: ORT forms MatMulIntegerToFloat / QGemm with float out)
    quantize_bias: bool  # Conv bias as int32 with scale s_in · s_w[c] (False: the bias stays float)
    description: str
    residual_input: bool = False  # quantize the residual input of each resnet's skip Add (TensorRT fuses it)
    float_type: str = "float32"  # element type of every float tensor between the graph's input and output casts
    opset: int = 17  # ONNX opset of the shipped graph (Q/DQ with float16/bfloat16 scales need 19)
    backend: str = "ort"  # the engine backend the profile is for: ort (ONNX Runtime) or trt (TensorRT)


_TRT = (
    "TensorRT explicit quantization: int8 symmetric activations (zero point 0), int8 symmetric per-channel "
    "weights (Conv axis 0, ConvTranspose axis 1), constant scales, Q/DQ on every Conv/Gemm/MatMul input and on "
    "the residual input of each resnet's skip Add (fused into the conv), float bias"
)


def _trt(name: str, float_type: str, extra: str) -> TargetProfile:
    return TargetProfile(
        name=name,
        activation_signed=True,
        conv_output=False,
        linear_output=False,
        quantize_bias=False,
        residual_input=True,
        float_type=float_type,
        opset=19,
        backend="trt",
        description=f"{_TRT}; {extra}",
    )


PROFILES = {
    "ort-cpu": TargetProfile(
        name="ort-cpu",
        activation_signed=False,
        conv_output=True,
        linear_output=False,
        quantize_bias=True,
        description=(
            "ONNX Runtime CPU: uint8 asymmetric activations, int8 symmetric per-channel weights, "
            "Q/DQ on every Conv input and output (→ QLinearConv) and on every Linear input "
            "(→ MatMulIntegerToFloat / QGemm), int32 Conv bias"
        ),
    ),
    **{
        name: _trt(name, float_type, extra)
        for name, float_type, extra in (
            ("trt", "float16", "a strongly typed FP16 graph (float32 only for the timestep embedding and the I/O)"),
            ("trt-bf16", "bfloat16", "a strongly typed BF16 graph (float32 only for the timestep embedding, I/O)"),
            ("trt-fp32", "float32", "float parts in FP32 (the trt placement, runnable on ONNX Runtime CPU too)"),
        )
    },
}


def get_profile(name: str) -> TargetProfile:
    if name not in PROFILES:
        raise ConfigError(f"--target {name!r}: unknown export profile; use one of {sorted(PROFILES)}")
    return PROFILES[name]
