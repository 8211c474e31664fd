"""APQ-DM's active calibration timestep selection (paper Eq. 12) around the group search of
calibration.groups: the calibration set is built during the search, one round at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from calibration.groups import (
    GroupMixer,
    GroupSearchResult,
    _assign_by_loss,
    _Optimizer,
    _Search,
    _share_inits,
    assignment_from_sigma,
    contiguous_assignment,
    snapshot,
)
from calibration.objective import loss_weights
from runtime.engine import timestep_key

if TYPE_CHECKING:
    from calibration.collect import CalibrationData


def select_active(entropy: np.ndarray, counts: np.ndarray, timesteps: np.ndarray, eta: float = 1.5) -> int:
    """Index of the next calibration timestep (APQ-DM Eq. 12): argmax_t H(σ^t) + η / (N_t + 1).

    σ^t of a timestep never drawn has had no data to learn from, so its entropy is read at the nearest
    drawn timestep (the one whose group it would be routed to). Ties go to the timestep farthest from every
    drawn one, then to the later step."""
    timesteps = np.asarray(timesteps)
    drawn = np.flatnonzero(counts > 0)
    if len(drawn):
        nearest = drawn[np.abs(timesteps[:, None] - timesteps[drawn][None, :]).argmin(1)]
        h = np.where(counts > 0, entropy, entropy[nearest])
        gap = np.abs(timesteps - timesteps[nearest])
    else:
        h, gap = entropy, np.zeros(len(timesteps))
    score = np.round(h + eta / (counts + 1.0), 9)
    best = np.flatnonzero(score == score.max())
    return int(best[np.lexsort((-timesteps[best], -gap[best]))[0]])


def run_active_search(model, layers, weights: dict, cfg, *, groups: int, rounds: int, per_round: int, epochs: int,
                      lr: float, eta: float = 1.5, entropy_weight: float = 0.8, progress: bool = False):  # fmt: skip
    """APQ-DM's group search with active calibration timestep selection (Eq. 12).

    The candidates are the deployment sampler's steps, each with its own α row. The first G rounds draw one
    batch at the middle step of each group's contiguous share (so every group's quantizers start from
    data of their own); every later round picks t = argmax H(σ^t) + η / (N_t + 1), records `per_round`
    fresh full-precision trajectories at t and trains on all data so far. The training budget is that of
    `epochs` passes over the final set, spread evenly over the phases. Only drawn timesteps are calibrated:
    the others route to the group of the nearest drawn one. Returns (GroupSearchResult restricted to the
    drawn timesteps, {point: [ActParams per group]}, CalibrationData drawn)."""
    from tqdm.auto import tqdm

    from calibration.collect import concat, record_at

    candidates = [int(t) for t in timestep_key(model.schedule.timesteps(cfg.steps))]
    if not 1 <= groups <= rounds:
        raise ValueError(f"groups={groups}: active selection needs at least one round per group (rounds={rounds})")
    if rounds > 4 * len(candidates):
        raise ValueError(f"rounds={rounds}: more than four per sampling step; raise --steps or lower the rounds")
    init = np.array(contiguous_assignment(candidates, groups))
    counts = np.zeros(len(candidates), np.int64)
    bar = tqdm(total=rounds, desc="active rounds", disable=not progress, leave=False)

    def draw(i: int) -> CalibrationData:
        counts[i] += 1
        bar.update(1)
        return record_at(model, cfg, candidates[i], per_round, int(counts.sum()))

    pilot = []
    for g in range(groups):
        share = np.flatnonzero(init == g)
        pilot.append(draw(int(share[len(share) // 2])))
    search = _Search(model, layers, weights, cfg, candidates, groups, _share_inits(model, layers, cfg, pilot))
    drawn = [concat(pilot)]
    search.add(drawn[0])
    weight_of_t = loss_weights(model, cfg, drawn[0])
    phases = rounds - groups + 1
    total = epochs * -(-len(search) * rounds // groups // cfg.batch_size)
    opt = _Optimizer(search.mixer, search.params, total, lr=lr, entropy_weight=entropy_weight,
                     alpha_lr=cfg.group_alpha_lr, weight_of_t=weight_of_t)  # fmt: skip
    history = [snapshot(search.mixer, 0)]
    with torch.enable_grad():
        for phase in range(phases):
            if phase:
                entropy = GroupMixer.row_entropy(search.mixer.sigma().detach()).cpu().numpy()
                drawn.append(draw(select_active(entropy, counts, np.array(candidates), eta)))
                search.add(drawn[-1])
            steps = total // phases + (total % phases if phase == phases - 1 else 0)
            losses = [opt.step(search.forward, *batch) for batch in search.batches(steps)]
            loss = float(np.mean(losses)) if losses else None
            history.append(snapshot(search.mixer, history[-1]["step"] + steps, loss))
    bar.close()
    keep = counts > 0
    sigma = search.mixer.sigma().detach().cpu()[torch.from_numpy(keep)]
    timesteps = [t for t, k in zip(candidates, keep, strict=True) if k]
    result = GroupSearchResult(
        assignment_from_sigma(sigma, timesteps),
        sigma.numpy(),
        timesteps,
        history,
        {t: int(n) for t, n in zip(candidates, counts, strict=True) if n},
        candidates,
    )
    with torch.enable_grad():
        _assign_by_loss(search, result, cfg, lr, weight_of_t, progress)
    return result, search.group_params(), concat(drawn)
