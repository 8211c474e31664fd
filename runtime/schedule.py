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
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
    prediction_type: str = "epsilon"  # what the model predicts: ε, or v = √ā ε − √(1−ā) x_0
    rescale_betas_zero_snr: bool = False  # the betas were rescaled to zero terminal SNR (ā_T = 0, β_T = 1)

    def __post_init__(self) -> None:
        if len(self.betas) < 2:
            raise ModelLoadError("noise schedule: need at least 2 training timesteps (betas)")
        last = len(self.betas) - 1
        zero_snr = self.rescale_betas_zero_snr
        # NaN fails both comparisons; a zero-SNR schedule ends on β_T = 1
        bad = [i for i, b in enumerate(self.betas) if not (0.0 < b < 1.0 or (zero_snr and i == last and b == 1.0))]
        if bad:
            raise ModelLoadError(
                f"noise schedule: betas must lie in (0, 1); betas[{bad[0]}] = {self.betas[bad[0]]}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            )
        if self.timestep_spacing not in _SPACINGS:
            raise ModelLoadError(
                f"scheduler config: timestep_spacing={self.timestep_spacing!r} is not supported; use one of {_SPACINGS}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"scheduler config: prediction_type={self.prediction_type!r} is not supported; use one of "
                f"{PREDICTION_TYPES}"
            )
        if zero_snr and self.prediction_type == "epsilon":
            raise ModelLoadError(
                "scheduler config: rescale_betas_zero_snr needs prediction_type='v_prediction' (at zero SNR an "
                "ε-prediction gives no x̂_0: it divides by √ā_T = 0)"
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

    def split(self, pred: np.ndarray, x: np.ndarray, a_t: float) -> tuple[np.ndarray, np.ndarray]:
        """(x̂_0, ε) from the model's prediction at x_t with ā_t: the one place the prediction type is read.
        ε-prediction: x̂_0 = (x_t − √(1−ā) ε)/√ā. v-prediction (Salimans & Ho 2022, v = √ā ε − √(1−ā) x_0):
        x̂_0 = √ā x_t − √(1−ā) v, ε = √ā v + √(1−ā) x_t, with no division, so ā_T = 0 works."""
        if self.prediction_type == "v_prediction":
            return np.sqrt(a_t) * x - np.sqrt(1 - a_t) * pred, np.sqrt(a_t) * pred + np.sqrt(1 - a_t) * x
        return (x - np.sqrt(1 - a_t) * pred) / np.sqrt(a_t), pred

    def epsilon_gain(self, a_t: float) -> float:
        """∂ε/∂prediction at fixed x_t: what an error in the model's output becomes in ε (1, or √ā for v)."""
        return float(np.sqrt(a_t)) if self.prediction_type == "v_prediction" else 1.0

    def final_alpha_cumprod(self) -> float:
        """ā of the step after the last one (DDIM convention: 1.0 when set_alpha_to_one)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def timesteps(self, steps: int) -> np.ndarray:
        """Training timesteps visited by a `steps`-step sampler, descending (diffusers conventions). Each
        update goes from one to the next: where they are not evenly spaced ("linspace", or "trailing" when
        `steps` does not divide T), diffusers' DDIM instead steps from t to t − T // steps."""
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


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler options dqc does not run, with the value that is the plain Euler flow
_FLOW_UNSUPPORTED = {
    "use_dynamic_shifting": False,  # the shift would depend on the image size at request time
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}


@dataclass(frozen=True)
class FlowSchedule:
    """Flow matching (rectified flow): x_σ = (1 − σ) x_0 + σ ε for σ ∈ [0, 1], the network predicts the velocity
    v = ε − x_0 at t = σ·T, and a deterministic Euler solver steps x ← x + (σ_next − σ) v (diffusers'
    FlowMatchEulerDiscreteScheduler, static `shift`; docs/ptqd_flow_matching.md)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: str = "flow"  # what the model predicts: the velocity ε − x_0
    kind: str = "flow"

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ModelLoadError(f"flow schedule: num_train_timesteps={T!r} must be an integer ≥ 2")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ModelLoadError(f"flow schedule: shift={self.shift!r} must be a positive number")

    def _shifted(self, sigmas: np.ndarray) -> np.ndarray:
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def sigmas(self, steps: int) -> np.ndarray:
        """σ_1 > … > σ_steps, then 0 (float32, `steps` + 1 entries), as FlowMatchEulerDiscreteScheduler.set_timesteps
        computes them: a linear ramp in t between the ends of the shifted training table, shifted again."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise SamplerError(f"--steps {steps}: must be between 1 and the {T} training timesteps")
        table = self._shifted(np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)).astype(np.float32)
        ramp = np.linspace(float(table[0]) * T, float(table[-1]) * T, steps) / T
        return np.concatenate([self._shifted(ramp).astype(np.float32), np.zeros(1, np.float32)])

    def timesteps(self, steps: int) -> np.ndarray:
        """t = σ·T of the visited steps, descending (float32): the network's timestep input."""
        return (self.sigmas(steps)[:-1] * np.float32(self.num_train_timesteps)).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlowSchedule:
        return cls(int(d["num_train_timesteps"]), float(d["shift"]))


def _flow_schedule(cfg: dict, path: Path) -> FlowSchedule:
    for key, plain in _FLOW_UNSUPPORTED.items():
        if cfg.get(key, plain) not in (plain, None, False) or (plain is None and cfg.get(key)):
            raise ModelLoadError(f"{path}: {FLOW_SCHEDULER} with {key}={cfg.get(key)!r} is not supported; dqc runs "
                                 f"the Euler flow with a static shift (set {key} to {plain})")  # fmt: skip
    shift = cfg.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise ModelLoadError(f"{path}: shift={shift!r} must be a number")
    try:
        return FlowSchedule(cfg.get("num_train_timesteps", 1000), float(shift))
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def schedule_from_dict(d: dict):
    """The schedule a manifest records: a NoiseSchedule, or a FlowSchedule (kind "flow")."""
    return FlowSchedule.from_dict(d) if d.get("kind") == "flow" else NoiseSchedule.from_dict(d)


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
    if cfg.get("_class_name") == FLOW_SCHEDULER:
        return _flow_schedule(cfg, path)
    if "Flow" in str(cfg.get("_class_name", "")):
        raise ModelLoadError(f"{path}: scheduler {cfg['_class_name']} is not supported; dqc runs {FLOW_SCHEDULER} "
                             "flows and the DDPM/DDIM family")  # fmt: skip
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ModelLoadError(f"{path}: prediction_type={pred!r} is not supported; dqc runs {PREDICTION_TYPES}")
    if cfg.get("thresholding"):
        raise ModelLoadError(f"{path}: thresholding=true (dynamic thresholding) is not supported; set it false")
    betas, kind = _betas(cfg, path)
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    try:
        return _schedule(cfg, betas, kind, pred, zero_snr)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _schedule(cfg: dict, betas: np.ndarray, kind: str, pred: str, zero_snr: bool) -> NoiseSchedule:
    return NoiseSchedule(
        betas=tuple(float(b) for b in betas),
        beta_schedule=kind,
        clip_sample=bool(cfg.get("clip_sample", False)),
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        steps_offset=int(cfg.get("steps_offset", 0)),
        timestep_spacing=str(cfg.get("timestep_spacing", "leading")),
        prediction_type=pred,
        rescale_betas_zero_snr=zero_snr,
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1: shift
    and scale √ā so that √ā_T = 0 and √ā_1 is kept, then recover the betas (β_T = 1)."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas
