"""Noise schedule and sampling-timestep selection, from a diffusers scheduler config (numpy only)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from runtime.errors import ModelLoadError, SamplerError

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule β_1..β_T and the sampler conventions of its scheduler config."""

    betas: tuple[float, ...]
    beta_schedule: str
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        if len(self.betas) < 2:
            raise ModelLoadError("noise schedule: need at least 2 training timesteps (betas)")
        bad = [i for i, b in enumerate(self.betas) if not 0.0 < b < 1.0]  # NaN fails both comparisons
        if bad:
            raise ModelLoadError(
                f"noise schedule: betas must lie in (0, 1); betas[{bad[0]}] = {self.betas[bad[0]]}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            )
        if self.timestep_spacing not in _SPACINGS:
            raise ModelLoadError(
                f"scheduler config: timestep_spacing={self.timestep_spacing!r} is not supported; use one of {_SPACINGS}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ā_t = ∏_{i≤t} (1 − β_i), float64, indexed by training timestep t (computed once, read-only: the
        sampler reads it every step)."""
        ac = np.cumprod(1.0 - np.asarray(self.betas, dtype=np.float64))
        ac.flags.writeable = False
        return ac

    def final_alpha_cumprod(self) -> float:
        """ā of the step after the last one (DDIM convention: 1.0 when set_alpha_to_one)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def timesteps(self, steps: int) -> np.ndarray:
        """Training timesteps visited by a `steps`-step sampler, descending (diffusers conventions)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise SamplerError(f"--steps {steps}: must be between 1 and the {T} training timesteps")
        if self.timestep_spacing == "leading":
            ratio = T // steps
            ts = np.arange(0, steps) * ratio + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
        else:
            ts = np.round(np.linspace(0, T - 1, steps))
        ts = np.clip(ts.astype(np.int64), 0, T - 1)
        return ts[::-1].copy()

    def to_dict(self) -> dict:
        return asdict(self) | {"betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        return cls(**(d | {"betas": tuple(float(b) for b in d["betas"])}))


def _betas(cfg: dict, path: Path) -> tuple[np.ndarray, str]:
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float64), "trained_betas"
    T = cfg.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ModelLoadError(f"{path}: num_train_timesteps={T!r} must be an integer ≥ 2")
    b0, b1 = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    for name, v in (("beta_start", b0), ("beta_end", b1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ModelLoadError(f"{path}: {name}={v!r} must be a number")
    b0, b1 = float(b0), float(b1)
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        return np.linspace(b0, b1, T, dtype=np.float64), kind
    if kind == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, T, dtype=np.float64) ** 2, kind
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021) Eq. 17: ā(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]), kind
    raise ModelLoadError(
        f"{path}: beta_schedule={kind!r} is not supported; use one of {_BETA_SCHEDULES} or trained_betas"
    )


def load_schedule(path: str | Path) -> NoiseSchedule:
    """Read a diffusers scheduler config (a scheduler directory or its scheduler_config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler_config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: scheduler config not found; pass a diffusers scheduler directory "
            "(with scheduler_config.json) via --scheduler"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); re-save it with scheduler.save_pretrained") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object with the scheduler config")
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ModelLoadError(f"{path}: prediction_type={pred!r}; dqc supports epsilon-prediction models only")
    betas, kind = _betas(cfg, path)
    return NoiseSchedule(
        betas=tuple(float(b) for b in betas),
        beta_schedule=kind,
        clip_sample=bool(cfg.get("clip_sample", False)),
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        steps_offset=int(cfg.get("steps_offset", 0)),
        timestep_spacing=str(cfg.get("timestep_spacing", "leading")),
    )
