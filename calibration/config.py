"""The calibration stage's one frozen config, and the bit-width string parser."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields

from calibration.objective import LOSS_WEIGHTINGS
from calibration.profiles import get_profile
from runtime.errors import ConfigError, SamplerError
from runtime.sampler import SamplerConfig, check_seed

_BITS = re.compile(r"^W(\d+)A(\d+)$")
ACTIVATION_RANGES = ("minmax", "percentile")
TIMESTEP_SELECTIONS = ("uniform", "random", "normal", "active")
WEIGHT_RANGES = ("lp", "minmax")
WEIGHT_ROUNDINGS = ("nearest", "adaround", "brecq")
GROUP_SEARCHES = ("none", "sigma", "loss")
SAMPLE_WEIGHTINGS = ("uniform", "gac")
GAC_MATCHES = ("cosine", "dot")
_RECONSTRUCTION = dict(weight_range="lp", weight_rounding="brecq", act_iters=5000)
# Method presets: the fields each sets unless given explicitly.
METHODS = {
    "lp": {},  # per-channel L_p weight-range search, min-max activations, round-to-nearest, uniform timesteps
    # what ONNX Runtime's own static quantizer does: min-max ranges, round-to-nearest, one set for all t
    "naive": dict(weight_range="minmax", activation_range="minmax", timestep_selection="uniform"),
    # Q-Diffusion: uniform timesteps, BRECQ/AdaRound blocks, LSQ activation steps, split shortcuts
    "qdiffusion": dict(timestep_selection="uniform", shortcut_split=True, **_RECONSTRUCTION),
    # PTQ4DM: normally distributed timesteps, the same reconstruction
    "ptq4dm": dict(timestep_selection="normal", **_RECONSTRUCTION),
    # GAC: Q-Diffusion's reconstruction with per-input weights learned by gradient alignment
    "gac": dict(timestep_selection="uniform", shortcut_split=True, sample_weighting="gac", **_RECONSTRUCTION),
    # APQ-DM: G = 8 timestep groups from the differentiable search, on 16 actively chosen batches of 64
    "apqdm": dict(groups=8, timestep_selection="active", calib_timesteps=16),
}


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
    method: str = "lp"  # a preset of METHODS; record of how the fields below were chosen
    target: str = "ort-cpu"
    sampler: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    guidance: float = 1.0
    calib_samples: int = 64  # full-precision trajectories recorded (active: per round)
    calib_timesteps: int = 20  # sampling steps whose inputs are kept (active: rounds)
    # uniform (Q-Diffusion) | random | normal (PTQ4DM) | active (APQ-DM Eq. 12, during the group search)
    timestep_selection: str = "uniform"
    fresh_trajectories: bool = False  # each kept timestep from its own calib_samples trajectories (active: always)
    active_eta: float = 1.5  # η of APQ-DM Eq. 12
    normal_mean: float = 0.4  # normal selection: μ = normal_mean · T (PTQ4DM: μ < T/2)
    batch_size: int = 32
    seed: int = 0
    activation_range: str = "minmax"
    percentile: float = 99.99
    weight_range: str = "lp"  # lp: L_p shrink search per channel; minmax: the channel's max |w| (naive)
    weight_lp: float = 2.4  # L_p norm of the weight range search (Q-Diffusion / PTQD: 2.4)
    # nearest | adaround (layer-wise, full-precision layer inputs) | brecq (block-wise, quantized inputs)
    weight_rounding: str = "nearest"
    adaround_iters: int = 20000  # per layer (adaround) or per block (brecq); Q-Diffusion: 20k
    adaround_lr: float = 1e-3
    adaround_reg: float = 0.01  # λ of the rounding regulariser
    adaround_samples: int = 1024  # calibration inputs a layer or block is reconstructed on
    recon_batch: int = 32
    act_iters: int = 0  # LSQ activation step-size learning per block after the weights; Q-Diffusion: 5k
    # relative to each step's initial value, cosine-decayed to 0: the group search's rule (a step size's
    # Adam rate scales with it; an absolute 4e-4 moved a small step by up to 40 % per iteration)
    act_lr: float = 5e-3
    shortcut_split: bool = False  # Q-Diffusion: separate quantizers for the two halves of decoder concats
    # also quantize the attention score and value products' activation inputs (q·√s, k·√s, softmax, v):
    # integer MatMuls on ONNX Runtime (MatMulIntegerToFloat), int8 BMMs on TensorRT; off: they run in float
    attention_products: bool = False
    groups: int = 1  # APQ-DM timestep groups, each with its own activation quantizers and graph
    group_epochs: int = 10  # APQ-DM: 10 epochs of the joint search
    group_lr: float = 0.0  # 0: APQ-DM's 5e-3 for 8-bit and 3e-3 below, decaying to 1e-5
    group_entropy: float = 0.8  # λ of the entropy term on σ^t (APQ-DM Eq. 7)
    # none: each group's min-max ranges on its contiguous share, nothing learned | sigma: the soft search,
    # g(t) = argmax σ^t (APQ-DM) | loss: the soft search, then g(t) = the group of least loss at t, refined
    group_search: str = "loss"
    group_alpha_lr: float = 0.05  # α's own constant Adam rate; 0: the quantizers' decaying rate (as before)
    group_alpha_bias: float = 0.1  # α's initial logit lead for its contiguous share (1.0 before)
    group_refine_epochs: int = 1  # group_search loss: epochs of training under the hard assignment
    # what an ε error at each input's timestep costs (calibration.objective): eps | x0 | xprev | final;
    # weights the group search's J and the LSQ pass of block reconstruction. xprev measured best
    # (docs/RESULTS.md, issue 16: +1.3 dB over eps on LSQ-trained shared scales at W8A8)
    loss_weighting: str = "xprev"
    activation_error: bool = False  # also measure C-Error / G-Error (APQ-DM Table 1) into the stats
    # uniform | gac: each reconstruction input's loss weighted by ω = softmax(s/τ), learned per block by GAC's
    # bi-level step (calibration.gac; algorithms.md, "Gradient-aligned calibration")
    sample_weighting: str = "uniform"
    gac_tau: float = 1.0  # τ of ω = softmax(s/τ) (the paper's best: 1)
    gac_val_share: float = 0.05  # the timestep-balanced validation split, held out of reconstruction (paper: 5 %)
    gac_groups: int = 5  # K timestep groups of the gradient-matching term (paper: 5)
    gac_meta_steps: int = 20  # outer updates of s per block; 0: no meta step, the method is its base
    gac_inner_lr: float = 0.05  # η of the inner step, in the AdaRound variables' units (RMS-normalised step)
    gac_outer_lr: float = 0.1  # Adam rate of s
    gac_gm_weight: float = 1.0  # λ₀: L_GM's size against the validation loss at uniform ω (calibration.gac)
    gac_match: str = "cosine"  # cosine | dot: how L_GM compares two groups' surrogate gradients
    device: str = "cpu"

    def __post_init__(self) -> None:
        for f in fields(self):  # numbers: finite floats, integers a 32-bit index can hold
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}={v}: must be finite")
            if isinstance(v, int) and not isinstance(v, bool) and f.name != "seed" and abs(v) > 2**31 - 1:
                raise ConfigError(f"{f.name}={v}: out of range")
        parse_bits(self.bits)
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: use one of {sorted(METHODS)}")
        get_profile(self.target)
        SamplerConfig(self.sampler, self.steps, self.eta, self.guidance)
        try:
            check_seed(self.seed)
        except SamplerError as e:
            raise ConfigError(str(e)) from None
        for name in ("calib_samples", "calib_timesteps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.timestep_selection == "active":
            if self.calib_timesteps > 4 * self.steps:
                raise ConfigError(
                    f"calib_timesteps={self.calib_timesteps}: active rounds beyond four per sampling step "
                    f"(steps={self.steps}) only repeat steps; lower --calib-timesteps or raise --calib-samples"
                )
        elif self.calib_timesteps > self.steps:
            raise ConfigError(f"calib_timesteps={self.calib_timesteps}: cannot exceed steps={self.steps}")
        if self.activation_range not in ACTIVATION_RANGES:
            raise ConfigError(f"activation_range={self.activation_range!r}: use one of {ACTIVATION_RANGES}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile}: must lie in (50, 100]")
        if self.timestep_selection not in TIMESTEP_SELECTIONS:
            raise ConfigError(f"timestep_selection={self.timestep_selection!r}: use one of {TIMESTEP_SELECTIONS}")
        if not 0.0 <= self.normal_mean < 0.5:
            raise ConfigError(f"normal_mean={self.normal_mean}: PTQ4DM's μ = normal_mean·T needs 0 ≤ normal_mean < 0.5")
        if self.weight_range not in WEIGHT_RANGES:
            raise ConfigError(f"weight_range={self.weight_range!r}: use one of {WEIGHT_RANGES}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"weight_rounding={self.weight_rounding!r}: use one of {WEIGHT_ROUNDINGS}")
        for name in ("adaround_iters", "adaround_samples", "recon_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.act_iters < 0:
            raise ConfigError(f"act_iters={self.act_iters}: must be 0 (off) or more")
        for name in ("adaround_lr", "act_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        if self.adaround_reg < 0:
            raise ConfigError(f"adaround_reg={self.adaround_reg}: must be ≥ 0")
        if self.groups < 1:
            raise ConfigError(f"--groups {self.groups}: must be at least 1")
        if self.groups > self.calib_timesteps:
            what = "active rounds" if self.timestep_selection == "active" else "calibrated timesteps"
            raise ConfigError(
                f"--groups {self.groups}: more groups than the {self.calib_timesteps} {what}; "
                "lower --groups or raise --calib-timesteps"
            )
        if self.timestep_selection == "active" and self.reconstructs:
            raise ConfigError(
                "--timestep-selection active builds the calibration set during the group search, after the weights "
                "are fixed; it cannot feed BRECQ/AdaRound/LSQ reconstruction: use --weight-rounding nearest "
                "--act-iters 0, or another --timestep-selection"
            )
        if self.active_eta < 0:
            raise ConfigError(f"active_eta={self.active_eta}: must be ≥ 0")
        if self.group_search not in GROUP_SEARCHES:
            raise ConfigError(f"group_search={self.group_search!r}: use one of {GROUP_SEARCHES}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting={self.loss_weighting!r}: use one of {LOSS_WEIGHTINGS}")
        if self.group_alpha_lr < 0 or self.group_alpha_bias < 0 or self.group_refine_epochs < 0:
            raise ConfigError(
                f"group search: alpha_lr={self.group_alpha_lr}, alpha_bias={self.group_alpha_bias} and "
                f"refine_epochs={self.group_refine_epochs} must be ≥ 0"
            )
        if self.group_epochs < 1 or self.group_lr < 0 or self.group_entropy < 0:
            raise ConfigError(
                f"group search: epochs={self.group_epochs} must be ≥ 1, lr={self.group_lr} and "
                f"entropy weight={self.group_entropy} ≥ 0"
            )
        if self.reconstructs:
            recorded = self.calib_samples * self.calib_timesteps
            rows = min(self.adaround_samples, recorded)
            if self.recon_batch > rows:
                raise ConfigError(
                    f"recon_batch={self.recon_batch}: larger than the reconstruction set of {rows} inputs "
                    f"(min of adaround_samples={self.adaround_samples} and calib_samples×calib_timesteps="
                    f"{recorded}); lower --recon-batch or record more with --calib-samples"
                )
        if self.sample_weighting not in SAMPLE_WEIGHTINGS:
            raise ConfigError(f"sample_weighting={self.sample_weighting!r}: use one of {SAMPLE_WEIGHTINGS}")
        if self.sample_weighting == "gac":
            self._check_gac()
        if self.weight_lp <= 0:
            raise ConfigError(f"weight_lp={self.weight_lp}: must be > 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")

    def _check_gac(self) -> None:
        if self.weight_rounding != "brecq":
            raise ConfigError(
                f"--method gac learns its sample weights on the blocks' AdaRound variables: it needs "
                f"--weight-rounding brecq, not {self.weight_rounding}"
            )
        if not self.gac_tau > 0:
            raise ConfigError(f"--gac-tau {self.gac_tau}: the softmax temperature τ must be > 0")
        if not 0 < self.gac_val_share <= 0.5:
            raise ConfigError(f"--gac-val-share {self.gac_val_share}: the validation share must lie in (0, 0.5]")
        if not 2 <= self.gac_groups <= self.calib_timesteps:
            raise ConfigError(
                f"--gac-groups {self.gac_groups}: the gradient-matching term needs 2 to calib_timesteps="
                f"{self.calib_timesteps} timestep groups"
            )
        if self.gac_match not in GAC_MATCHES:
            raise ConfigError(f"--gac-match {self.gac_match!r}: use one of {', '.join(GAC_MATCHES)}")
        if self.gac_meta_steps < 0:
            raise ConfigError(f"--gac-meta-steps {self.gac_meta_steps}: must be 0 (off) or more")
        if not (self.gac_inner_lr > 0 and self.gac_outer_lr > 0 and self.gac_gm_weight >= 0):
            raise ConfigError(
                f"--gac-inner-lr {self.gac_inner_lr} and --gac-outer-lr {self.gac_outer_lr} must be > 0, "
                f"--gac-gm-weight {self.gac_gm_weight} ≥ 0"
            )
        rows = min(self.adaround_samples, self.calib_samples * self.calib_timesteps)
        per_group = max(2, round(self.gac_val_share * rows / self.gac_groups))
        if rows - per_group * self.gac_groups < self.recon_batch:
            raise ConfigError(
                f"--gac-val-share {self.gac_val_share}: the validation split ({per_group} inputs in each of "
                f"{self.gac_groups} groups) leaves fewer than recon_batch={self.recon_batch} of the {rows} "
                "reconstruction inputs; record more with --calib-samples"
            )

    @classmethod
    def for_method(cls, method: str = "lp", **fields) -> CalibrationConfig:
        """The method's preset, with explicitly given fields (not None) taking precedence."""
        if method not in METHODS:
            raise ConfigError(f"--method {method!r}: use one of {sorted(METHODS)}")
        given = {k: v for k, v in fields.items() if v is not None}
        chosen = METHODS[method] | given
        if "calib_timesteps" not in given and chosen.get("timestep_selection", cls.timestep_selection) != "active":
            # a default follows the flags it depends on: no more calibrated steps than sampling steps
            steps = chosen.get("steps", cls.steps)
            chosen["calib_timesteps"] = min(chosen.get("calib_timesteps", cls.calib_timesteps), steps)
        return cls(method=method, **chosen)

    @property
    def reconstructs(self) -> bool:
        """Whether calibration learns anything by gradient descent (AdaRound, BRECQ, LSQ)."""
        return self.weight_rounding != "nearest" or self.act_iters > 0

    @property
    def searches_groups(self) -> bool:
        """Whether calibration runs the APQ-DM group search (which also learns the LSQ steps of G = 1)."""
        return self.method == "apqdm" or self.groups > 1 or self.timestep_selection == "active"

    @property
    def search_lr(self) -> float:
        """The group search's initial learning rate (APQ-DM: 5e-3 at 8-bit activations, 3e-3 below)."""
        return self.group_lr or (5e-3 if self.parsed_bits.activation >= 8 else 3e-3)

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
