"""The calibration stage's one frozen config, and the bit-width string parser."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from exporter.profiles import get_profile
from runtime.errors import ConfigError
from runtime.sampler import SamplerConfig

_BITS = re.compile(r"^W(\d+)A(\d+)$")
ACTIVATION_RANGES = ("minmax", "percentile")


@dataclass(frozen=True)
class Bits:
    weight: int
    activation: int

    def __str__(self) -> str:
        return f"W{self.weight}A{self.activation}"


def parse_bits(text: str) -> Bits:
    """'W4A8' → Bits(4, 8). Weights and activations 2–8 bits; below 8 they run in int8/uint8 containers
    with values restricted to the b-bit grid (speed is that of int8)."""
    m = _BITS.match(text.strip().upper()) if isinstance(text, str) else None
    if not m:
        raise ConfigError(f"--bits {text!r}: expected W<weight bits>A<activation bits>, e.g. W8A8")
    bits = Bits(int(m[1]), int(m[2]))
    if not 2 <= bits.weight <= 8:
        raise ConfigError(f"--bits {text}: weight bits must be between 2 and 8")
    if not 2 <= bits.activation <= 8:
        raise ConfigError(f"--bits {text}: activation bits must be between 2 and 8")
    return bits


@dataclass(frozen=True)
class CalibrationConfig:
    bits: str = "W8A8"
    target: str = "ort-cpu"
    sampler: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    guidance: float = 1.0
    calib_samples: int = 64  # full-precision trajectories recorded
    calib_timesteps: int = 20  # uniform selection: every (steps // calib_timesteps)-th step is kept
    batch_size: int = 32
    seed: int = 0
    activation_range: str = "minmax"
    percentile: float = 99.99
    weight_lp: float = 2.4  # L_p norm of the weight range search (Q-Diffusion / PTQD: 2.4)
    device: str = "cpu"

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        get_profile(self.target)
        SamplerConfig(self.sampler, self.steps, self.eta, self.guidance)
        for name in ("calib_samples", "calib_timesteps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.calib_timesteps > self.steps:
            raise ConfigError(f"calib_timesteps={self.calib_timesteps}: cannot exceed steps={self.steps}")
        if self.activation_range not in ACTIVATION_RANGES:
            raise ConfigError(f"activation_range={self.activation_range!r}: use one of {ACTIVATION_RANGES}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile}: must lie in (50, 100]")
        if self.weight_lp <= 0:
            raise ConfigError(f"weight_lp={self.weight_lp}: must be > 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")

    @property
    def parsed_bits(self) -> Bits:
        return parse_bits(self.bits)

    @property
    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(self.sampler, self.steps, self.eta, self.guidance)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CalibrationConfig:
        return cls(**json.loads(text))
