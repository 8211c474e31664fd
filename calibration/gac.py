"""Gradient-aligned calibration (GAC, arXiv 2602.01289; algorithms.md, "Gradient-aligned calibration").

Calibration inputs from different timesteps pull a block's quantization parameters in conflicting
directions. GAC gives every training input i a weight ω_i = softmax(s / τ)_i and, before a block is
reconstructed, learns s by a bi-level step (Algorithm 2):

- inner, one differentiable step on a training batch b:
  θ'(ω) = θ − η ∇_θ L_b,  L_b = Σ_{i∈b} (n ω_i / |b|) L_i(θ)  (n ω_i = 1 for uniform ω: the plain batch
  mean), L_i the block reconstruction error of input i (BRECQ's block loss), θ the block's AdaRound variables.
  The paper does not publish η. Here η = η₀ / rms(∇_θ L) at uniform ω on the block's first meta batch, a
  constant per block, so that η₀ (cfg.gac_inner_lr) is a step in θ's own units whatever the block's scale;
- outer, on a timestep-balanced validation split X^V held out of reconstruction, cut into K timestep groups:
  L_VAL(ω) = L(θ'(ω); X^V) + λ L_GM,  L_GM = −2 / (K(K−1)) Σ_{g<h} G_g · G_h,
  with the paper's surrogate G_g = ∂L(θ'(ω); X^V_g) / ∂ω_b — the group's gradient with respect to the batch's
  sample weights rather than to θ', whose ω-derivative would need third-order derivatives of the block.
  s takes an Adam step on ∂L_VAL/∂s (autograd through the surrogate: `outer_terms`).
  Two choices the paper leaves open, made here and selectable:
  · the comparison of G_g and G_h. As written (cfg.gac_match "dot"), G_g·G_h grows with the gradients'
    size, so maximising it also rewards a θ' far from the validation optimum (a problem whose inputs pull
    against the validation data shows it: ω moves onto them). The default "cosine" compares directions only.
  · λ. L_GM as written is a product of two ω-gradients, orders of magnitude below L(θ'; X^V) and varying by
    block; a cosine lies in [−1, 1] while L(θ'; X^V) varies by block too. λ = λ₀ |L(θ'; X^V)| at uniform ω on
    the block's first meta step (for "dot": λ₀ |L(θ'; X^V)| / |L_GM|), so λ₀ (cfg.gac_gm_weight) sets the GM
    term against the validation loss whatever the block's scale.

The block is then reconstructed on the training rows with each input's loss weighted by n ω_i
(calibration.reconstruct). `torch.func.functional_call` runs the block on substituted parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# per-row losses of the block with the given parameters on the given rows: (params, rows) → (len(rows),)
RowLoss = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class Split:
    """Reconstruction rows and the held-out validation rows, each validation row in one of K timestep groups."""

    train: torch.Tensor  # row indices
    val: torch.Tensor
    val_group: torch.Tensor  # (len(val),) group of each validation row, 0..K−1 in timestep order
    groups: int


def split_rows(row_t: np.ndarray, share: float, groups: int, seed: int, device: str = "cpu") -> Split:
    """A timestep-balanced validation split: the calibrated timesteps cut into `groups` contiguous groups,
    round(share · rows) validation rows (at least 2 per group) drawn evenly from the groups, the rest training."""
    steps = np.unique(row_t)
    if not 2 <= groups <= len(steps):
        raise ValueError(f"gac_groups={groups}: needs 2 to {len(steps)} (the calibrated timesteps)")
    group_of_step = {int(t): g for g, chunk in enumerate(np.array_split(steps, groups)) for t in chunk}
    row_group = np.array([group_of_step[int(t)] for t in row_t])
    per_group = max(2, round(share * len(row_t) / groups))
    rng = np.random.default_rng([seed, 7])
    val, val_group = [], []
    for g in range(groups):
        rows = np.flatnonzero(row_group == g)
        if len(rows) < per_group + 1:
            raise ValueError(f"timestep group {g} has {len(rows)} inputs: too few for {per_group} validation rows")
        pick = np.sort(rng.choice(rows, per_group, replace=False))
        val.append(pick)
        val_group.append(np.full(per_group, g))
    val_rows = np.concatenate(val)
    train = np.setdiff1d(np.arange(len(row_t)), val_rows)
    return Split(*(torch.from_numpy(a).to(device) for a in (train, val_rows, np.concatenate(val_group))), groups)


def outer_terms(
    logits: torch.Tensor, tau: float, batch: torch.Tensor, params: dict[str, torch.Tensor], row_loss: RowLoss,
    train: torch.Tensor, split: Split, inner_lr: float, match: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The two terms of L_VAL(ω) for one meta step, differentiable in `logits` (s): the inner step on the
    training rows train[batch], then the validation loss L(θ'(ω); X^V) and L_GM over the pairs of surrogate
    gradients, compared by `match` ("dot": G_g·G_h as written; "cosine": G_g·G_h / (|G_g| |G_h|)).
    Returns (val, gm)."""
    omega = torch.softmax(logits / tau, 0)
    w_batch = omega[batch] * len(omega)  # n ω_i: 1 at uniform ω, so the inner loss is the batch mean
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    inner = (row_loss(theta, train[batch]) * w_batch).mean()
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    moved = {k: v - inner_lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    val_losses = row_loss(moved, split.val)
    per_group = [val_losses[split.val_group == g].mean() for g in range(split.groups)]
    surrogate = [torch.autograd.grad(lg, w_batch, create_graph=True)[0] for lg in per_group]
    if match == "cosine":
        surrogate = [g / g.norm().clamp_min(1e-30) for g in surrogate]
    k = split.groups
    gm = -2.0 / (k * (k - 1)) * sum(surrogate[g] @ surrogate[h] for g in range(k) for h in range(g + 1, k))
    return val_losses.mean(), gm


def outer_loss(
    logits: torch.Tensor, tau: float, batch: torch.Tensor, params: dict[str, torch.Tensor], row_loss: RowLoss,
    train: torch.Tensor, split: Split, inner_lr: float, gm_weight: float, match: str = "cosine",
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """L_VAL(ω) = L(θ'(ω); X^V) + λ L_GM with an absolute λ (`gm_weight`), and its parts."""
    val, gm = outer_terms(logits, tau, batch, params, row_loss, train, split, inner_lr, match)
    return val + gm_weight * gm, {"val": float(val.detach()), "gm": float(gm.detach())}


def learn_sample_weights(
    params: dict[str, torch.Tensor], row_loss: RowLoss, split: Split, *, tau: float, steps: int, batch: int,
    inner_lr: float, outer_lr: float, gm_weight: float, generator: torch.Generator, match: str = "cosine",
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """ω over the training rows (softmax(s/τ), uniform start) after `steps` meta steps, and their record."""
    train = split.train
    logits = torch.zeros(len(train), dtype=torch.float64 if _f64(params) else torch.float32,
                         device=train.device, requires_grad=True)  # fmt: skip
    opt = torch.optim.Adam([logits], lr=outer_lr)
    first = last = None
    eta = lam = None
    for _ in range(steps):
        b = torch.randint(0, len(train), (min(batch, len(train)),), generator=generator).to(train.device)
        if eta is None:  # η = η₀ / rms of the uniform-ω gradient: a step of η₀ in θ's units
            theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            grads = torch.autograd.grad(row_loss(theta, train[b]).mean(), list(theta.values()))
            rms = float(torch.sqrt(sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads)))
            eta = inner_lr / rms if rms > 0 else inner_lr  # a stationary start: θ's units are unknown
        # attention's fused CPU/GPU kernels have no derivative of their backward: the math kernel has all orders
        with sdpa_kernel(SDPBackend.MATH):
            val, gm = outer_terms(logits, tau, b, params, row_loss, train, split, eta, match)
            if lam is None:  # λ from the first step's |L(θ'; X^V)|: λ₀ times it for a cosine in [−1, 1] ...
                v, g = abs(float(val.detach())), abs(float(gm.detach()))
                scale = 1.0 if match == "cosine" else g  # ... or, as written, so that λ|L_GM| = λ₀|L(θ'; X^V)|
                lam = gm_weight * v / scale if scale > 0 else 0.0
            opt.zero_grad(set_to_none=True)
            (val + lam * gm).backward()
        opt.step()
        parts = {"val": float(val.detach()), "gm": float(gm.detach())}
        first, last = first or parts, parts
    omega = torch.softmax(logits.detach() / tau, 0)
    return omega, {"meta_steps": steps, "inner_step": eta, "gm_scale": lam, "first": first, "last": last}


def weight_record(omega: torch.Tensor, row_t: np.ndarray, split: Split) -> dict:
    """What the manifest keeps of ω: its mass per calibrated timestep (ω summed over the training rows at
    t, against t's share of rows) and its entropy relative to uniform (1: uniform)."""
    w = omega.detach().double().cpu().numpy()
    t_train = row_t[split.train.cpu().numpy()]
    steps = np.unique(t_train)
    n = len(w)
    entropy = float(-(w * np.log(np.clip(w, 1e-300, None))).sum() / math.log(n)) if n > 1 else 1.0
    return {
        "timesteps": steps.tolist(),
        "mass": [round(float(w[t_train == t].sum()), 6) for t in steps],
        "uniform_mass": [round(float(np.mean(t_train == t)), 6) for t in steps],
        "entropy": round(entropy, 6),
        "validation_rows": len(split.val),
    }


def _f64(params: dict[str, torch.Tensor]) -> bool:
    return any(v.dtype == torch.float64 for v in params.values())
