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
weights other than ``eps`` carry a further factor ā_t. Weights are normalised to mean 1 over the sampler's
steps, so learning rates keep their meaning.
"""

from __future__ import annotations

import numpy as np

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
    """s from x_t = √ā_t x_0 + √(1−ā_t) ε at the least noisy of `timesteps` (rows of `samples`)."""
    t = int(np.min(timesteps))
    x = samples[np.asarray(timesteps) == t].astype(np.float64)
    a = float(schedule.alphas_cumprod[t])
    return float(np.sqrt(max((x.var() - (1 - a)) / a, 1e-4)))


def timestep_weights(schedule, sampler_cfg, how: str, std: float | None = None) -> np.ndarray:
    """(T,) weight of an ε error at each training timestep, for the sampler `sampler_cfg` (its steps get
    their own weight; other timesteps that of the nearest step). `std`: the data std, for ``final``."""
    from runtime.ptqd import eps_coefficient
    from runtime.sampler import noise_sigma, step_alphas

    if how not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {how!r}: use one of {LOSS_WEIGHTINGS}")
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
                if std is None:
                    raise ValueError("loss weighting 'final' needs the data std")
                w[i] *= std**2 / (a_prev * std**2 + 1 - a_prev)
        if how != "eps":  # an error in a v-prediction reaches ε scaled by √ā_t (schedule.epsilon_gain)
            w[i] *= schedule.epsilon_gain(a_t) ** 2
    w = w / w.mean()
    grid = np.arange(schedule.num_train_timesteps)
    nearest = np.abs(grid[:, None] - np.asarray(ts)[None, :]).argmin(1)
    return w[nearest]
