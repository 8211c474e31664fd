"""APQ-DM distribution-aware timestep groups: the differentiable group search (paper Eqs. 5–7).

Every quantized activation gets G quantizers Q_1..Q_G. During the search each is applied and mixed with
the importance weights of the input's timestep,

    x̂ = Σ_g σ_g^t · Q_g(x),   σ^t = softmax(α^t)                                         (Eq. 6)

and the quantizer step sizes and α are optimised jointly on

    J = ‖ε_target − ε_θ̂(x_t, t)‖² + λ Σ_g −σ_g^t log σ_g^t,   λ = 0.8                   (Eq. 7)

After the search g(t) = argmax_g σ_g^t: every timestep is served by one group's quantizers, so each group
exports as one graph. Symmetry between the G identical quantizers is broken by initialising group g's
ranges on the g-th contiguous share of the calibrated timesteps and α towards that share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from calibration.adaround import apply_layer
from calibration.quantizers import ActParams, LsqQuantizer


class GroupMixer(nn.Module):
    """α (one row of G logits per calibrated timestep) and the σ of the batch being run."""

    def __init__(self, timesteps: list[int], groups: int, init_assignment: list[int], bias: float = 1.0) -> None:
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]
        self.row = {t: i for i, t in enumerate(self.timesteps)}
        alpha = torch.zeros(len(self.timesteps), groups)
        alpha[torch.arange(len(self.timesteps)), torch.tensor(init_assignment)] = bias
        self.alpha = nn.Parameter(alpha)
        self.current: torch.Tensor | None = None

    def set_batch(self, t: torch.Tensor) -> torch.Tensor:
        """σ for each row of a batch of timesteps (all must be calibrated timesteps)."""
        rows = torch.tensor([self.row[int(x)] for x in t.tolist()], device=self.alpha.device)
        self.current = torch.softmax(self.alpha[rows], dim=-1)
        return self.current

    def sigma(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=-1)

    @staticmethod
    def entropy(sigma: torch.Tensor) -> torch.Tensor:
        """Mean over rows of Σ_g −σ_g log σ_g."""
        return -(sigma * torch.log(sigma.clamp_min(1e-12))).sum(-1).mean()


class MixedQuantizer(nn.Module):
    """Σ_g σ_g^t · Q_g(x) over the batch rows (Eq. 6); Q_g are LSQ quantizers with fixed zero points."""

    def __init__(self, inits: list[ActParams], mixer: GroupMixer) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(LsqQuantizer.from_params(p) for p in inits)
        self._mixer = [mixer]  # not a submodule: α is registered once, on the mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self._mixer[0].current
        w = sigma.to(x.dtype).reshape(sigma.shape[0], sigma.shape[1], *[1] * (x.ndim - 1))
        return sum(w[:, g] * q(x) for g, q in enumerate(self.quantizers))

    def params(self) -> list[ActParams]:
        """Each group's learned quantizer."""
        return [q.to_params() for q in self.quantizers]


@dataclass
class GroupSearchResult:
    assignment: dict[int, int]  # calibrated sampling timestep → group
    sigma: np.ndarray  # (K, G) final importance weights, rows in `timesteps` order
    timesteps: list[int]
    history: list[dict] = field(default_factory=list)  # per epoch: loss, entropy, σ snapshot

    def group_of_t(self, num_train_timesteps: int) -> np.ndarray:
        return nearest_group_table(self.assignment, num_train_timesteps)


def contiguous_assignment(timesteps: list[int], groups: int) -> list[int]:
    """Group of each timestep when the sorted timesteps are cut into G nearly equal contiguous shares."""
    order = np.argsort(timesteps)
    out = np.empty(len(timesteps), np.int64)
    for rank, i in enumerate(order):
        out[i] = rank * groups // len(timesteps)
    return out.tolist()


def nearest_group_table(assignment: dict[int, int], num_train_timesteps: int) -> np.ndarray:
    """(T,) group for every training timestep: that of the nearest calibrated timestep (ties: the lower
    one), so a step count other than the calibrated one still routes every t to a group."""
    if not assignment:
        raise ValueError("group assignment is empty")
    ts = np.array(sorted(assignment))
    gs = np.array([assignment[int(t)] for t in ts])
    grid = np.arange(num_train_timesteps)
    idx = np.clip(np.searchsorted(ts, grid), 1, len(ts) - 1) if len(ts) > 1 else np.zeros_like(grid)
    if len(ts) > 1:
        left = ts[idx - 1]
        right = ts[idx]
        idx = np.where(grid - left <= right - grid, idx - 1, idx)
    return gs[idx].astype(np.int64)


def compact_groups(group_of_t: np.ndarray, acts: dict[str, list[ActParams]]):
    """Drop groups that no timestep uses and renumber the rest 0..G'−1 in order of first use from t = 0,
    so every group graph in a bundle serves some step."""
    used = list(dict.fromkeys(int(g) for g in group_of_t))
    new = {g: i for i, g in enumerate(used)}
    table = np.array([new[int(g)] for g in group_of_t], np.int64)
    return table, {p: [qs[g] for g in used] for p, qs in acts.items()}


def assignment_from_sigma(sigma: torch.Tensor, timesteps: list[int]) -> dict[int, int]:
    """g(t) = argmax_g σ_g^t (after the search)."""
    best = sigma.argmax(dim=-1).tolist()
    return {int(t): int(g) for t, g in zip(timesteps, best, strict=True)}


def search_loop(
    forward: nn.Module,
    mixer: GroupMixer,
    quant_params: list[torch.Tensor],
    batches,
    steps_per_epoch: int,
    *,
    epochs: int,
    lr: float,
    lr_end: float = 1e-5,
    entropy_weight: float = 0.8,
    progress: bool = False,
) -> GroupSearchResult:
    """Joint optimisation of the quantizer steps and α on J (Eq. 7). `batches()` yields (x, t, c, target)
    for one epoch, in `steps_per_epoch` batches; `forward(x, t, c)` is the mixed fake-quant model whose
    quantizers read mixer.current. The learning rate decays exponentially from lr to lr_end over the run."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam([{"params": quant_params}, {"params": [mixer.alpha]}], lr=lr)
    total = max(epochs * steps_per_epoch, 1)
    gamma = (lr_end / lr) ** (1 / total)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    history = [{"epoch": 0, "entropy": float(GroupMixer.entropy(mixer.sigma().detach())),
                "sigma": mixer.sigma().detach().cpu().numpy().round(4).tolist()}]  # fmt: skip
    bar = tqdm(total=total, desc="group search", disable=not progress, leave=False)
    for epoch in range(1, epochs + 1):
        losses = []
        for x, t, c, target in batches():
            sigma = mixer.set_batch(t)
            rec = (forward(x, t, c) - target).pow(2).flatten(1).sum(1).mean()
            loss = rec + entropy_weight * GroupMixer.entropy(sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for p in quant_params:  # a step size must stay positive
                p.data.clamp_(min=1e-8)
            losses.append(rec.item())
            bar.update(1)
        sigma = mixer.sigma().detach()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "entropy": float(GroupMixer.entropy(sigma)),
                        "sigma": sigma.cpu().numpy().round(4).tolist()})  # fmt: skip
    bar.close()
    sigma = mixer.sigma().detach().cpu()
    return GroupSearchResult(assignment_from_sigma(sigma, mixer.timesteps), sigma.numpy(), mixer.timesteps, history)


class MixedLayer(nn.Module):
    """A Conv2d or Linear with fixed quantized weights and group-mixed activation quantizers."""

    def __init__(self, layer: nn.Module, w_int: torch.Tensor, w_scale: torch.Tensor, q_in, q_out) -> None:
        super().__init__()
        self.layer, self.q_in, self.q_out = layer.requires_grad_(False), q_in, q_out
        shape = [-1] + [1] * (w_int.ndim - 1)
        self.register_buffer("weight", (w_int.float() * w_scale.float().reshape(shape)).to(layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_layer(self.layer, self.q_in(x), self.weight, self.layer.bias)
        return y if self.q_out is None else self.q_out(y)


def run_group_search(model, layers, weights: dict, data, cfg, *, groups: int, epochs: int, lr: float,
                     entropy_weight: float = 0.8, progress: bool = False):  # fmt: skip
    """Search G groups on the recorded calibration data of `model` (a LoadedModel with `weights` from
    calibration). Targets are the full-precision model's ε on the same inputs (data-free distillation of
    Eq. 7's ε). Returns (GroupSearchResult, {point: [ActParams per group]})."""
    from calibration.calibrate import observe_activations
    from calibration.qmodules import replace_layers

    timesteps = sorted({int(t) for ts in data.timesteps for t in ts})
    if not 1 <= groups <= len(timesteps):
        raise ValueError(f"groups={groups}: must be between 1 and the {len(timesteps)} calibrated timesteps")
    init = contiguous_assignment(timesteps, groups)
    inits: dict[str, list[ActParams]] = {}
    for g in range(groups):
        share = {t for t, a in zip(timesteps, init, strict=True) if a == g}
        for point, p in observe_activations(model, layers, data.at_timesteps(share), cfg, False).items():
            inits.setdefault(point, []).append(p)
    mixer = GroupMixer(timesteps, groups, init).to(cfg.device)
    mixed: dict[str, MixedQuantizer] = {}

    def quantizer(point: str) -> MixedQuantizer | None:
        if point not in inits:
            return None
        mixed[point] = MixedQuantizer(inits[point], mixer).to(cfg.device)
        return mixed[point]

    def build(name: str, layer: nn.Module) -> nn.Module:
        key = name.removeprefix("unet.")
        if key not in weights:
            return layer
        return MixedLayer(layer, *weights[key], quantizer(f"{key}:input"), quantizer(f"{key}:output"))

    fp = model.wrapper().eval()
    forward = replace_layers(fp, build).eval()
    with torch.inference_mode():
        targets = [fp(x, t, c) for x, t, c in data.batches(cfg.batch_size, cfg.device)]
    targets = [y.clone() for y in targets]  # out of inference mode, once

    def batches():
        for (x, t, c), y in zip(data.batches(cfg.batch_size, cfg.device), targets, strict=True):
            yield x, t, c, y

    params = [q.scale for m in mixed.values() for q in m.quantizers]
    with torch.enable_grad():
        result = search_loop(forward, mixer, params, batches, len(targets), epochs=epochs, lr=lr,
                             entropy_weight=entropy_weight, progress=progress)  # fmt: skip
    acts = {p: m.params() for p, m in mixed.items()}
    return result, acts
