"""What an ε error at a timestep costs the sample: per-timestep weights of the calibration objectives.

A per-step ε-MSE weighs every calibrated timestep alike, yet an error δ in ε reaches the sample very
differently along the trajectory. The weights w(t) below scale each calibration input's squared error
(in the group search's J, APQ-DM Eq. 7, and in the LSQ pass of block reconstruction):

- ``eps``: w = 1, the papers' objective (for a v-prediction model: the plain MSE of its output).
- ``x0``: the x̂₀-space factor. x̂₀ = (x_t − √(1−ā_t) ε)/√ā_t, so δ moves x̂₀ by √(1−ā_t)/√ā_t · δ and
  w = (1 − ā_t)/ā_t.
- ``xprev``: the deployment sampler's update. δ moves x_prev by λ_t δ, λ_t the coefficient of ε in the
  update (DDIM: √(1−ā_prev−σ_t²) − √ā_prev √(1−ā_t)/√ā_t; DDPM: the posterior mean's; as PTQD's VSC uses
  it), so w = λ_t².
- ``final``: xprev, carried to the sample. For data of per-element std s the deterministic flow maps x_prev
  to x_0 with gain s / √(ā_prev s² + 1 − ā_prev) (the ratio of the marginal stds; 1 at the end), so
  w = λ_t² s² / (ā_prev s² + 1 − ā_prev). s is estimated from the calibration inputs of the least noisy
  calibrated step: Var(x_t) = ā_t s² + 1 − ā_t.

For a v-prediction model an output error δv is δε = √ā_t δv (v = √ā ε − √(1−ā) x_0 at fixed x_t), so the
weights other than ``eps`` carry a further factor ā_t.

A flow-matching model (x_σ = (1 − σ) x_0 + σ ε, velocity v = ε − x_0, Euler steps x ← x + (σ_next − σ) v) has
its own factors, by the same reasoning: ``x0`` σ² (x̂_0 = x_σ − σ v), ``xprev`` (σ_next − σ)², ``final`` that times
the marginal-std gain s / √((1 − σ_next)² s² + σ_next²) squared (Var(x_σ) = (1 − σ)² s² + σ²).

Weights are normalised to mean 1 over the sampler's steps, so learning rates keep their meaning.
"""

from __future__ import annotations

import numpy as np

from runtime.engine import timestep_key

LOSS_WEIGHTINGS = ("eps", "x0", "xprev", "final")


def loss_weights(model, cfg, data):
    """(T,) torch weights of the calibration objectives' per-input errors by training timestep, for
    cfg.loss_weighting and cfg's sampler, the data std read off `data`; None for plain ε-MSE."""
    if cfg.loss_weighting == "eps":
        return None
    import torch

    std = data_std(model.schedule, np.concatenate(data.timesteps), np.concatenate(data.samples))
    w = timestep_weights(model.schedule, cfg.sampler_config, cfg.loss_weighting, std)
    return torch.from_numpy(w).float().to(cfg.device)


def data_std(schedule, timesteps: np.ndarray, samples: np.ndarray) -> float:
    """s from x_t = √ā_t x_0 + √(1−ā_t) ε (flow: x_σ = (1 − σ) x_0 + σ ε) at the least noisy of `timesteps` (the
    model's inputs, rows of `samples`)."""
    timesteps = np.asarray(timesteps)
    t = timesteps.min()
    x = samples[timesteps == t].astype(np.float64)
    if getattr(schedule, "kind", None) == "flow":
        sigma = float(t) / schedule.num_train_timesteps
        return float(np.sqrt(max((x.var() - sigma**2) / max((1 - sigma) ** 2, 1e-6), 1e-4)))
    a = float(schedule.alphas_cumprod[int(t)])
    return float(np.sqrt(max((x.var() - (1 - a)) / a, 1e-4)))


def timestep_weights(schedule, sampler_cfg, how: str, std: float | None = None) -> np.ndarray:
    """(T,) weight of an ε error at each training timestep, for the sampler `sampler_cfg` (its steps get
    their own weight; other timesteps that of the nearest step). `std`: the data std, for ``final``."""
    from runtime.ptqd import eps_coefficient
    from runtime.sampler import noise_sigma, step_alphas

    if how not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {how!r}: use one of {LOSS_WEIGHTINGS}")
    if how == "final" and std is None:
        raise ValueError("loss weighting 'final' needs the data std")
    if getattr(schedule, "kind", None) == "flow":
        return _spread(schedule, timestep_key(schedule.timesteps(sampler_cfg.steps)),
                       _flow_weights(schedule.sigmas(sampler_cfg.steps).astype(np.float64), how, std))  # fmt: skip
    ts = schedule.timesteps(sampler_cfg.steps)
    w = np.ones(len(ts))
    for i, t in enumerate(ts):
        prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        a_t, a_prev = step_alphas(schedule, sampler_cfg.name, int(t), prev)
        if how == "x0":
            w[i] = (1 - a_t) / a_t
        elif how in ("xprev", "final"):
            sigma = noise_sigma(sampler_cfg.name, sampler_cfg.eta, a_t, a_prev, prev)
            w[i] = eps_coefficient(sampler_cfg.name, a_t, a_prev, sigma) ** 2
            if how == "final":
                w[i] *= std**2 / (a_prev * std**2 + 1 - a_prev)
        if how != "eps":  # an error in a v-prediction reaches ε scaled by √ā_t (schedule.epsilon_gain)
            w[i] *= schedule.epsilon_gain(a_t) ** 2
    return _spread(schedule, ts, w)


def _flow_weights(sigmas: np.ndarray, how: str, std: float | None) -> np.ndarray:
    """Per Euler step i (σ_i → σ_{i+1}): what a velocity error costs (module docstring)."""
    sigma, nxt = sigmas[:-1], sigmas[1:]
    if how == "eps":
        return np.ones(len(sigma))
    if how == "x0":
        return sigma**2
    w = (nxt - sigma) ** 2
    if how == "final":
        w = w * std**2 / ((1 - nxt) ** 2 * std**2 + nxt**2)
    return w


def _spread(schedule, keys: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(T,) from per-step weights normalised to mean 1: each timestep key gets its nearest step's."""
    w = w / w.mean()
    grid = np.arange(schedule.num_train_timesteps)
    nearest = np.abs(grid[:, None] - np.asarray(keys)[None, :]).argmin(1)
    return w[nearest]
