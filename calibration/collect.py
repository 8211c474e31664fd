"""Calibration data: inputs (x_t, t, c) recorded along full-precision sampling trajectories."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from calibration.config import CalibrationConfig
from calibration.model_io import LoadedModel
from runtime.engine import Engine, EngineSet, TorchEngine, timestep_key
from runtime.sampler import calibration_noise, sample


@dataclass
class CalibrationData:
    """Recorded engine inputs; each entry is one engine call (a batch at one timestep). `timesteps` are what the
    model is fed (int64, or a flow model's float32 t = σ·T); keys() gives the integer timesteps that key tables."""

    samples: list[np.ndarray]
    timesteps: list[np.ndarray]
    labels: list[np.ndarray | None]

    def __len__(self) -> int:
        return sum(len(s) for s in self.samples)

    def subset(self, rows: int, seed: int) -> CalibrationData:
        """`rows` inputs drawn without replacement (seeded), so every recorded timestep keeps its share;
        the first rows alone would be the early trajectories' steps only. All of them when rows ≥ len."""
        n = len(self)
        if rows >= n:
            return self
        keep = np.sort(np.random.default_rng([seed, 3]).permutation(n)[:rows])
        cat = lambda parts: None if parts[0] is None else [np.concatenate(parts)[keep]]  # noqa: E731
        return CalibrationData(cat(self.samples), cat(self.timesteps), cat(self.labels) or [None])

    def keys(self) -> np.ndarray:
        """(rows,) int64: each row's timestep key (runtime.engine.timestep_key)."""
        return timestep_key(np.concatenate(self.timesteps))

    def at_timesteps(self, keep: set[int]) -> CalibrationData:
        """The recorded inputs whose timestep key is in `keep`."""
        t = np.concatenate(self.timesteps)
        rows = np.isin(self.keys(), np.fromiter(keep, np.int64))
        if not rows.any():
            raise ValueError(f"no calibration inputs at timesteps {sorted(keep)}")
        labels = None if self.labels[0] is None else np.concatenate(self.labels)[rows]
        return CalibrationData([np.concatenate(self.samples)[rows]], [t[rows]], [labels])

    def batches(self, batch_size: int, device: str = "cpu") -> Iterator[tuple[torch.Tensor, ...]]:
        x = np.concatenate(self.samples)
        t = np.concatenate(self.timesteps)
        c = None if self.labels[0] is None else np.concatenate(self.labels)
        for lo in range(0, len(x), batch_size):
            sl = slice(lo, lo + batch_size)
            yield (
                torch.from_numpy(x[sl]).to(device),
                torch.from_numpy(t[sl]).to(device),
                None if c is None else torch.from_numpy(c[sl]).to(device),
            )


class _Reached(Exception):
    """Raised by a recorder with `stop_after` once it has kept that timestep: the rest of the trajectory
    is not needed."""


class _Recorder:
    """An engine that forwards to another and keeps the inputs of the selected timesteps (keys)."""

    def __init__(self, engine: Engine, keep: set[int], data: CalibrationData, stop_after: int | None = None) -> None:
        self.engine, self.spec, self.keep, self.data, self.stop_after = engine, engine.spec, keep, data, stop_after

    def infer(self, sample, timestep, cond=None):
        t = timestep_key(timestep[0])
        if t in self.keep:
            self.data.samples.append(sample.copy())
            flow = self.spec.timestep_type == "float32"
            self.data.timesteps.append(np.asarray(timestep, np.float32 if flow else np.int64).copy())
            self.data.labels.append(None if cond is None else np.array(cond, copy=True))
        if t == self.stop_after:
            raise _Reached
        return self.engine.infer(sample, timestep, cond)


def uniform_timesteps(timesteps: np.ndarray, count: int) -> set[int]:
    """Uniform selection (Q-Diffusion): every n-th sampling step, n = steps // count."""
    stride = max(1, len(timesteps) // count)
    return {int(t) for t in timesteps[::stride][:count]}


def random_timesteps(timesteps: np.ndarray, count: int, seed: int) -> set[int]:
    """Random selection: `count` distinct sampling steps, uniformly."""
    rng = np.random.default_rng([seed, 1])
    return {int(t) for t in rng.choice(timesteps, size=min(count, len(timesteps)), replace=False)}


def normal_timesteps(timesteps: np.ndarray, count: int, seed: int, num_train_timesteps: int, mean: float) -> set[int]:
    """PTQ4DM's normally distributed selection: t ~ N(μ, T/2) with μ = mean·T (< T/2), clipped to [0, T−1],
    each draw mapped to the nearest sampling step, until `count` distinct steps are chosen."""
    rng = np.random.default_rng([seed, 2])
    count = min(count, len(timesteps))
    chosen: set[int] = set()
    ts = np.sort(np.asarray(timesteps))
    while len(chosen) < count:
        t = np.clip(rng.normal(mean * num_train_timesteps, num_train_timesteps / 2), 0, num_train_timesteps - 1)
        free = np.array([x for x in ts if int(x) not in chosen])
        chosen.add(int(free[np.argmin(np.abs(free - t))]))
    return chosen


def select_timesteps(model: LoadedModel, cfg: CalibrationConfig) -> set[int]:
    """The sampling steps (their timestep keys) whose inputs feed calibration, by the configured strategy."""
    timesteps = timestep_key(model.schedule.timesteps(cfg.steps))
    if cfg.timestep_selection == "random":
        return random_timesteps(timesteps, cfg.calib_timesteps, cfg.seed)
    if cfg.timestep_selection == "normal":
        T = model.schedule.num_train_timesteps
        return normal_timesteps(timesteps, cfg.calib_timesteps, cfg.seed, T, cfg.normal_mean)
    return uniform_timesteps(timesteps, cfg.calib_timesteps)


def default_labels(model: LoadedModel, n: int) -> np.ndarray | None:
    """Cycle through the real classes 0..K−2 (the last embedding is the null class)."""
    k = model.spec.num_class_embeds
    return None if k is None else np.arange(n, dtype=np.int64) % max(k - 1, 1)


def calib_conds(model: LoadedModel, n: int) -> np.ndarray | None:
    """The conditions of n calibration trajectories: the real classes cycled (class models), the calibration
    prompts' embeddings cycled (text models), None (unconditional)."""
    if model.spec.context_shape is not None:
        return model.prompt_embeddings(n)
    return default_labels(model, n)


def record_at(model: LoadedModel, cfg: CalibrationConfig, t: int, n: int, draw: int) -> CalibrationData:
    """The inputs at sampling step t of n fresh full-precision trajectories (noise: cfg.seed's calibration
    stream for fresh draws, number `draw`); the trajectories stop there."""
    data = CalibrationData([], [], [])
    fp = TorchEngine(model.wrapper(), model.spec, device=cfg.device)
    recorder = _Recorder(fp, {t}, data, stop_after=t)
    try:
        sample(EngineSet.single(recorder), model.schedule, cfg.sampler_config, n=n, seed=cfg.seed,
               cond=calib_conds(model, n), null_cond=model.null_cond, batch_size=n, progress=False,
               stream=calibration_noise("active", draw))  # fmt: skip
    except _Reached:
        return data
    raise ValueError(f"timestep {t} is not a step of the {cfg.steps}-step {cfg.sampler} sampler")


def concat(parts: list[CalibrationData]) -> CalibrationData:
    """One CalibrationData of all of `parts`, in order."""
    out = CalibrationData([], [], [])
    for p in parts:
        out.samples += p.samples
        out.timesteps += p.timesteps
        out.labels += p.labels
    return out


def record_trajectories(model: LoadedModel, cfg: CalibrationConfig, progress: bool = True,
                        purpose: str = "trajectories") -> CalibrationData:  # fmt: skip
    """The inputs at the selected timesteps of cfg.calib_samples full-precision trajectories, drawn from
    cfg.seed's calibration noise stream for `purpose` (never from an evaluation stream)."""
    sampler = cfg.sampler_config
    keep = select_timesteps(model, cfg)
    if cfg.fresh_trajectories:  # each timestep from its own calib_samples trajectories
        from tqdm.auto import tqdm

        ordered = tqdm(sorted(keep, reverse=True), desc="calibration inputs", disable=not progress, leave=False)
        n = cfg.calib_samples
        return concat([record_at(model, cfg, t, n, i) for i, t in enumerate(ordered)])
    data = CalibrationData([], [], [])
    fp = TorchEngine(model.wrapper(), model.spec, device=cfg.device)
    engines = EngineSet.single(_Recorder(fp, keep, data))
    sample(
        engines,
        model.schedule,
        sampler,
        n=cfg.calib_samples,
        seed=cfg.seed,
        cond=calib_conds(model, cfg.calib_samples),
        null_cond=model.null_cond,
        batch_size=cfg.batch_size,
        progress=progress,
        stream=calibration_noise(purpose),
    )
    return data
