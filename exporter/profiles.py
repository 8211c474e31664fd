"""Export target profiles: where Q/DQ pairs go and in which integer types.

Calibration imports this module to model exactly the quantization points the profile places, so the
PyTorch fake-quant reference and the shipped graph compute the same function. Pure data, no heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ConfigError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    activation_signed: bool  # False: uint8 asymmetric (zero point free); True: int8 symmetric
    conv_output: bool  # quantize every Conv output (ORT forms QLinearConv only with a Q on the output)
    linear_output: bool  # quantize Linear outputs (False: ORT forms MatMulIntegerToFloat / QGemm with float out)
    quantize_bias: bool  # Conv bias as int32 with scale s_in · s_w[c]
    description: str


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
}


def get_profile(name: str) -> TargetProfile:
    if name not in PROFILES:
        raise ConfigError(f"--target {name!r}: unknown export profile; use one of {sorted(PROFILES)}")
    return PROFILES[name]
