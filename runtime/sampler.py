"""Host-side sampler loop: DDPM and DDIM (eta ≥ 0), and the Euler flow solver of flow-matching models, with
classifier-free guidance, on numpy.

Every sample i draws its initial and per-step noise from its own generator seeded with (seed, i), so a
bundle and the full-precision model see identical noise whatever the batch size.

Noise streams. `dqc sample --seed s` draws sample i from SeedSequence([s, i]): the evaluation stream.
Everything calibration records (trajectories, active rounds, G-Error inputs, PTQD statistics) draws from
SeedSequence([s, i], spawn_key=(CALIBRATION_NOISE, purpose, draw)). numpy pads the entropy of a sequence
with a spawn key to its 4-word pool before appending the key, so a calibration stream's seed material is
7 words long, an evaluation stream's at most 4 (seed and index each below 2**64): no seed, index or purpose
makes the two alike, so an evaluated sample never starts from noise that calibration saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from runtime.engine import EngineSet, timestep_key
from runtime.errors import SamplerError
from runtime.ptqd import CNC_ALL, correct_eps
from runtime.schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm", "euler")  # euler: flow-matching models (runtime.schedule.FlowSchedule) only
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond this only amplifies the prediction into overflow
MAX_SEED = 2**64  # seeds are 0 ≤ s < 2**64 (two 32-bit words of seed material)
EVALUATION_NOISE: tuple[int, ...] = ()  # the spawn key of `dqc sample`'s noise
CALIBRATION_NOISE = 0xCA11B  # the first spawn-key word of every calibration stream
CALIBRATION_PURPOSES = ("trajectories", "active", "generation", "ptqd", "ptqd-checks")


def calibration_noise(purpose: str, draw: int = 0) -> tuple[int, ...]:
    """The spawn key of one calibration noise stream: its purpose, and the draw (round) within it."""
    if purpose not in CALIBRATION_PURPOSES:
        raise ValueError(f"calibration noise purpose {purpose!r}: use one of {CALIBRATION_PURPOSES}")
    if draw < 0:
        raise ValueError(f"calibration noise draw {draw}: must be ≥ 0")
    return (CALIBRATION_NOISE, CALIBRATION_PURPOSES.index(purpose), int(draw))


def noise_streams_record() -> dict:
    """How calibration and evaluation noise are seeded, for the bundle manifest."""
    return {
        "evaluation": "SeedSequence([seed, i]) for sample i (dqc sample --seed)",
        "calibration": f"SeedSequence([seed, i], spawn_key=({CALIBRATION_NOISE}, purpose, draw))",
        "purposes": list(CALIBRATION_PURPOSES),
    }


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed in [0, 2**64), or a SamplerError naming the flag."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < MAX_SEED:
        raise SamplerError(f"{flag} {seed!r}: use an integer in [0, 2**64)")
    return int(seed)


def noise_rng(seed: int, index: int, stream: tuple[int, ...] = EVALUATION_NOISE) -> np.random.Generator:
    """Sample `index`'s generator in `stream` (EVALUATION_NOISE, or a calibration_noise key)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)], spawn_key=stream))


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise SamplerError(f"--sampler {self.name!r}: use one of {SAMPLERS}")
        if self.steps < 1:
            raise SamplerError(f"--steps {self.steps}: must be at least 1")
        if not 0 <= self.eta <= 1:  # NaN fails too
            raise SamplerError(f"--eta {self.eta}: must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)")
        if self.name == "euler" and self.eta != 0:
            raise SamplerError(f"--eta {self.eta}: the Euler flow sampler is deterministic; drop --eta")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise SamplerError(f"--guidance {self.guidance}: must be finite, in [0, {MAX_GUIDANCE:g}]")


@dataclass
class SampleRun:
    """What a sampling run produced, and where its engine time went."""

    samples: np.ndarray
    labels: np.ndarray | None
    timesteps: np.ndarray
    step_groups: list[int] = field(default_factory=list)
    engine_seconds: float = 0.0
    engine_calls: int = 0
    ptqd: list[str] = field(default_factory=list)  # the PTQD corrections applied ([] when none)
    ptqd_seconds: float = 0.0  # host time spent on them
    ptqd_notes: list[str] = field(default_factory=list)
    step_precisions: list[str] = field(default_factory=list)  # the precision serving each step (bundles)
    engine: dict = field(default_factory=dict)  # what ran it: backend, version, precision (tools.deploy.pipeline)
    truncated: list[str] = field(default_factory=list)  # text bundles: prompts cut at the tokenizer's limit

    @property
    def seconds_per_step(self) -> float:
        return self.engine_seconds / max(self.engine_calls, 1)


class _Noise:
    """One generator per sample, seeded with (seed, sample index) in one noise stream."""

    def __init__(self, seed: int, indices: range, shape: tuple[int, ...], stream: tuple[int, ...] = ()) -> None:
        self._rngs = [noise_rng(seed, i, stream) for i in indices]
        self._shape = shape

    def draw(self) -> np.ndarray:
        return np.stack([r.standard_normal(self._shape, dtype=np.float32) for r in self._rngs])


_CONDITIONS = {
    "class_labels": ("class-conditional", "class labels (--class-label)", np.int64,
                     "the model's null class (no null class is recorded)"),
    "encoder_hidden_states": ("text-conditional", "prompt embeddings (--prompt)", np.float32,
                              "the embedding of the empty (or negative) prompt"),
}  # fmt: skip


def null_batch(cond: np.ndarray, null_cond) -> np.ndarray:
    """The unconditional counterpart of a batch of conditions: the null class label, or the null (empty or
    negative) prompt's embedding, once per row."""
    return np.broadcast_to(np.asarray(null_cond, dtype=cond.dtype), cond.shape)


def _guided_eps(engine, x: np.ndarray, t: int, cond, null_cond, guidance: float, both=None) -> np.ndarray:
    """The prediction the update uses; with guidance, cond and uncond batched in one engine call:
    ε = ε(x, ∅) + w · (ε(x, c) − ε(x, ∅)). `both` (the conditions then their null counterparts, as one array)
    may be passed in by a caller that reuses it across steps."""
    n = x.shape[0]
    dtype = np.float32 if engine.spec.timestep_type == "float32" else np.int64  # flow: t = σ·T
    if cond is None:
        return engine.infer(x, np.full(n, t, dtype=dtype))
    if guidance == 1.0:
        return engine.infer(x, np.full(n, t, dtype=dtype), cond)
    if both is None:
        both = np.concatenate([cond, null_batch(cond, null_cond)])
    pred = engine.infer(np.concatenate([x, x]), np.full(2 * n, t, dtype=dtype), both)
    on, off = pred[:n], pred[n:]
    return off + guidance * (on - off)


def step_alphas(schedule: NoiseSchedule, name: str, t: int, prev: int) -> tuple[float, float]:
    """(ā_t, ā_prev) of one update; prev = −1 after the last step (DDIM: the final ā, DDPM: 1)."""
    ac = schedule.alphas_cumprod
    if prev >= 0:
        return ac[t], ac[prev]
    return ac[t], (schedule.final_alpha_cumprod() if name == "ddim" else 1.0)


def noise_sigma(name: str, eta: float, a_t: float, a_prev: float, prev: int) -> float:
    """The sampler's own noise std σ_t of one update, before PTQD's VSC."""
    if name == "ddim":  # DDIM (Song et al. 2021, Eq. 12): σ_t = η √((1−ā_prev)/(1−ā_t)) √(1 − ā_t/ā_prev)
        return float(eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
    # DDPM: the posterior variance β̃ = (1−ā_prev)/(1−ā_t) · β' (Ho et al. 2020, Eq. 7); none after the last step
    return float(np.sqrt(max((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), 1e-20))) if prev >= 0 else 0.0


def _step(schedule: NoiseSchedule, cfg: SamplerConfig, x, pred, t: int, prev: int, noise: _Noise,
          sigma_q: float | None = None):  # fmt: skip
    """One update x_t → x_prev from the model's prediction (ε or v: schedule.prediction_type); prev = −1
    after the last step. `sigma_q` (PTQD VSC): the residual quantization noise std of the prediction, absorbed
    by shrinking the sampler's own noise; in ε it is epsilon_gain(ā_t)·σ_q (docs/ptqd_v_prediction.md)."""
    a_t, a_prev = step_alphas(schedule, cfg.name, t, prev)
    sigma = noise_sigma(cfg.name, cfg.eta, a_t, a_prev, prev)
    x0, eps = schedule.split(pred, x, a_t)  # x̂_0 and ε, whatever the model predicts
    if schedule.clip_sample:
        x0 = np.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    if cfg.name == "ddim":
        out = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    else:
        # DDPM posterior q(x_prev | x_t, x̂_0) (Ho et al. 2020, Eq. 7) over the step's β' = 1 − ā_t/ā_prev
        beta = 1 - a_t / a_prev
        out = (np.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    if sigma > 0:  # drawn whenever the sampler has noise, even where VSC shrinks it to 0: later draws stay in step
        z = noise.draw()
        if sigma_q is not None:
            from runtime.ptqd import calibrated_sigma, eps_coefficient

            lam = eps_coefficient(cfg.name, a_t, a_prev, sigma)
            sigma = calibrated_sigma(sigma, lam, sigma_q * schedule.epsilon_gain(a_t))
        out = out + sigma * z
    return out.astype(np.float32)


def _ptqd_plan(ptqd, components, cfg: SamplerConfig, run: SampleRun, prediction_type: str) -> tuple[str, ...]:
    """Which corrections run, with the reasons for any that cannot."""
    from runtime.ptqd import COMPONENTS

    unknown = set(components) - {*COMPONENTS, CNC_ALL}
    if unknown:
        raise SamplerError(f"--ptqd {','.join(sorted(unknown))}: unknown; use some of {','.join(COMPONENTS)} "
                           f"({CNC_ALL}: CNC at every step, without its guard)")  # fmt: skip
    if CNC_ALL in components:
        components = (*components, "cnc")
    if "gain" in components and "cnc" in components:
        raise SamplerError("--ptqd: gain replaces cnc (both rescale ε); pass one of them")
    if ptqd is None or not components:
        return ()
    if prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise SamplerError(f"--ptqd: PTQD's corrections are derived for ε, v and flow-velocity prediction, not "
                           f"{prediction_type} (sample with --no-ptqd)")  # fmt: skip
    if ptqd.sampler != cfg.name:
        raise SamplerError(
            f"PTQD statistics were gathered for {ptqd.sampler}, not {cfg.name}; sample with --sampler "
            f"{ptqd.sampler}, regather them, or pass --no-ptqd"
        )
    use = tuple(c for c in COMPONENTS if c in components) + ((CNC_ALL,) if CNC_ALL in components else ())
    if "vsc" in use and cfg.name == "ddim" and cfg.eta == 0:
        run.ptqd_notes.append("VSC does nothing with DDIM eta = 0: the sampler adds no noise to shrink")
    if "vsc" in use and cfg.name == "euler":  # docs/ptqd_flow_matching.md, Section 3
        use = tuple(c for c in use if c != "vsc")
        run.ptqd_notes.append("VSC does nothing with the Euler flow solver: it adds no noise to shrink")
    if ptqd.steps != cfg.steps:
        run.ptqd_notes.append(f"statistics gathered for {ptqd.steps} steps, sampling {cfg.steps}: nearest step's used")
    if ptqd.k_fallback:
        run.ptqd_notes.append(f"k_t <= -1 at timesteps {list(ptqd.k_fallback)}: CNC off there (k = 0)")
    if "cnc" in use and CNC_ALL not in use and ptqd.cnc_off:
        off = sorted(ptqd.cnc_off)
        where = f"timesteps {off}" if len(off) <= 8 else f"{len(off)} gathered steps between t = {off[0]} and {off[-1]}"
        run.ptqd_notes.append(
            f"CNC guard: off at {where}, where dividing by 1 + k_t would raise ε's expected error (PTQD Eq. 7); "
            f"{CNC_ALL} applies it there too"
        )
    run.ptqd = list(use)
    return use


def sample(
    engines: EngineSet,
    schedule: NoiseSchedule,
    cfg: SamplerConfig,
    *,
    n: int,
    seed: int = 0,
    cond: np.ndarray | None = None,
    null_cond=None,
    batch_size: int = 16,
    progress: bool = True,
    ptqd=None,
    ptqd_components: tuple[str, ...] = ("cnc", "bc", "vsc"),
    observe: Callable | None = None,
    stream: tuple[int, ...] = EVALUATION_NOISE,
) -> SampleRun:
    """Draw `n` samples; conditional engines need `cond`, one condition per sample (class labels, or the
    prompts' embeddings for text models), and for guidance ≠ 1 `null_cond` (the null class, or the embedding
    of the empty or negative prompt).
    `ptqd` (PtqdTables, or RoutedPtqd for a mixed-precision route) applies the chosen PTQD corrections to
    each step's (guided) prediction.
    `observe(i, t, x, eps, cond)` sees every step's input and the prediction the update will use.
    `stream`: the noise stream (EVALUATION_NOISE, or calibration_noise(...) for calibration data)."""
    seed = check_seed(seed)
    if n < 1:
        raise SamplerError(f"-n {n}: the number of samples must be at least 1")
    if not 1 <= batch_size <= 2**31 - 1:
        raise SamplerError(f"--batch-size {batch_size}: must be between 1 and 2**31 - 1")
    spec = engines.spec
    if spec.condition is not None:  # (what the model is, what to pass, its dtype, the null side of guidance)
        kind, what, dtype, null = _CONDITIONS[spec.condition]
        if cond is None or len(cond) != n:
            raise SamplerError(f"{kind} model: pass {n} {what}")
        cond = np.asarray(cond, dtype=dtype)
        if cfg.guidance != 1.0 and null_cond is None:
            raise SamplerError(f"--guidance ≠ 1 needs {null}")
    elif cond is not None:
        raise SamplerError("--class-label given, but the model is unconditional; drop it")
    flow = getattr(schedule, "kind", None) == "flow"
    if flow != (cfg.name == "euler"):
        raise SamplerError(
            f"--sampler {cfg.name}: a flow-matching model (FlowMatchEulerDiscreteScheduler) is sampled with "
            "--sampler euler, its Euler flow solver" if flow else "--sampler euler: the Euler flow solver needs "
            "a flow-matching model (FlowMatchEulerDiscreteScheduler); this one is a DDPM-family diffusion model: "
            "use ddim or ddpm"
        )  # fmt: skip
    ts = schedule.timesteps(cfg.steps)
    sigmas = schedule.sigmas(cfg.steps) if flow else None
    try:
        run = SampleRun(np.empty((n, *spec.sample_shape), np.float32),
                        cond if spec.num_class_embeds is not None else None, ts)  # fmt: skip
    except (MemoryError, ValueError):
        raise SamplerError(f"-n {n}: {n} samples of shape {spec.sample_shape} do not fit in memory") from None
    use = _ptqd_plan(ptqd, ptqd_components, cfg, run, schedule.prediction_type)
    bar = tqdm(total=n * len(ts), desc="sampling", unit="step", disable=not progress, leave=False)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        noise = _Noise(seed, idx, spec.sample_shape, stream)
        x = noise.draw()
        c = None if cond is None else cond[lo : idx.stop]
        both = np.concatenate([c, null_batch(c, null_cond)]) if c is not None and cfg.guidance != 1.0 else None
        for i, t in enumerate(ts):
            t = float(t) if flow else int(t)
            engine = engines.for_timestep(t)
            start = time.perf_counter()
            eps = _guided_eps(engine, x, t, c, null_cond, cfg.guidance, both)
            run.engine_seconds += time.perf_counter() - start
            run.engine_calls += 1
            if lo == 0:
                run.step_groups.append(engines.group_of(t))
            prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            sigma_q = None
            if use:
                start = time.perf_counter()
                key = timestep_key(t)
                k, bias, sq = ptqd.at(key, guard=CNC_ALL not in use)  # flow models: on the velocity (Eq. 5 of
                gain = ptqd.gain(key) if "gain" in use else None  # docs/ptqd_flow_matching.md)
                eps = correct_eps(eps, k, bias, cnc="cnc" in use, bc="bc" in use, gain=gain)
                if "vsc" in use:  # the independent residual std left: σ_q / (1 + k) after CNC, c_t σ_q after the gain
                    sigma_q = sq * gain if gain is not None else (sq / (1.0 + k) if "cnc" in use else sq)
                run.ptqd_seconds += time.perf_counter() - start
            if observe is not None:
                observe(i, t, x, eps, c)
            if flow:  # Euler on the velocity: x ← x + (σ_next − σ) v (FlowMatchEulerDiscreteScheduler.step)
                x = (x + (sigmas[i + 1] - sigmas[i]) * eps).astype(np.float32)
            else:
                x = _step(schedule, cfg, x, eps, int(t), prev, noise, sigma_q)
            if not np.isfinite(x).all():
                bad = "the engine's prediction" if not np.isfinite(eps).all() else "the update"
                raise SamplerError(
                    f"sampling step {i} (t = {int(t)}), samples {lo}..{idx.stop - 1}: {bad} is NaN or Inf; "
                    "the engine, its scales or the PTQD statistics are broken — nothing was written"
                )
            bar.update(len(idx))
        run.samples[lo : idx.stop] = x
    bar.close()
    return run
