"""APQ-DM distribution-aware timestep groups: the differentiable group search (paper Eqs. 5–7).

Every quantized activation gets G quantizers Q_1..Q_G. During the search each is applied and mixed with
the importance weights of the input's timestep,

    x̂ = Σ_g σ_g^t · Q_g(x),   σ^t = softmax(α^t)                                         (Eq. 6)

and the quantizer step sizes and α are optimised jointly on

    J = ‖ε_target − ε_θ̂(x_t, t)‖² + λ Σ_g −σ_g^t log σ_g^t,   λ = 0.8                   (Eq. 7)

After the search g(t) = argmax_g σ_g^t: every timestep is served by one group's quantizers, so each group
exports as one graph. Symmetry between the G identical quantizers is broken by initialising group g's
ranges on the g-th contiguous share of the calibrated timesteps and α towards that share.

Two departures from a literal reading, so the search can move the assignment (issue 16): α has its own
constant learning rate (`group_alpha_lr`; with the quantizers' rate decaying from 5e-3 to 1e-5 an α moved
0.1 in all) and a weak initial lead (`group_alpha_bias`, 0.1 instead of 1). With `group_assign = "loss"`
the final g(t) is the group whose quantizers, forced on, give timestep t's inputs the least loss, refined
by a pass of training under that hard assignment (calibration.group_assign). J's per-input error may be
weighted by what an ε error at its timestep costs the sample (calibration.objective).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from calibration.adaround import apply_layer
from calibration.objective import loss_weights
from calibration.quantizers import ActParams, LsqQuantizer
from runtime.engine import timestep_key


class GroupMixer(nn.Module):
    """α (one row of G logits per calibrated timestep) and the σ of the batch being run."""

    def __init__(self, timesteps: list[int], groups: int, init_assignment: list[int], bias: float = 1.0,
                 fixed: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]
        self.row = {t: i for i, t in enumerate(self.timesteps)}
        alpha = torch.zeros(len(self.timesteps), groups)
        alpha[torch.arange(len(self.timesteps)), torch.tensor(init_assignment)] = 1.0 if fixed else bias
        # fixed: σ is the one-hot initial assignment and is not learned (one group per timestep)
        self.alpha = nn.Parameter(alpha, requires_grad=not fixed)
        self.fixed = fixed
        self.current: torch.Tensor | None = None
        self.current_group: torch.Tensor | None = None
        self.forced: int | None = None  # every row through this group's quantizers (per-group loss evaluation)

    @property
    def hard(self) -> bool:
        """Whether each row runs through one group's quantizers only."""
        return self.fixed or self.forced is not None

    def fix(self, assignment: list[int]) -> None:
        """From now on σ is the one-hot `assignment` (one group per timestep, in `timesteps` order), not learned."""
        one_hot = torch.zeros_like(self.alpha)
        one_hot[torch.arange(len(assignment)), torch.tensor(assignment)] = 1.0
        self.alpha.data = one_hot.to(self.alpha.device)
        self.alpha.requires_grad_(False)
        self.fixed = True

    def set_batch(self, t: torch.Tensor) -> torch.Tensor:
        """σ for each row of a batch of timesteps (all must be calibrated timesteps)."""
        if self.forced is not None:
            self.current = torch.zeros(len(t), self.alpha.shape[1], device=self.alpha.device)
            self.current[:, self.forced] = 1.0
            self.current_group = torch.full((len(t),), self.forced, device=self.alpha.device)
            return self.current
        rows = torch.tensor([self.row[int(x)] for x in timestep_key(t).tolist()], device=self.alpha.device)
        if self.fixed:
            self.current = self.alpha[rows].detach()
        else:
            self.current = torch.softmax(self.alpha[rows], dim=-1)
        self.current_group = self.current.argmax(-1)
        return self.current

    def sigma(self) -> torch.Tensor:
        return self.alpha.detach().clone() if self.fixed else torch.softmax(self.alpha, dim=-1)

    @staticmethod
    def row_entropy(sigma: torch.Tensor) -> torch.Tensor:
        """Σ_g −σ_g log σ_g of each row."""
        return -(sigma * torch.log(sigma.clamp_min(1e-12))).sum(-1)

    @staticmethod
    def entropy(sigma: torch.Tensor) -> torch.Tensor:
        """Mean over rows of Σ_g −σ_g log σ_g."""
        return GroupMixer.row_entropy(sigma).mean()


class MixedQuantizer(nn.Module):
    """Σ_g σ_g^t · Q_g(x) over the batch rows (Eq. 6); Q_g are LSQ quantizers with fixed zero points."""

    def __init__(self, inits: list[ActParams], mixer: GroupMixer) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(LsqQuantizer.from_params(p) for p in inits)
        self._mixer = [mixer]  # not a submodule: α is registered once, on the mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self._mixer[0]
        if mixer.hard:  # one-hot σ: run each row through its own group's quantizer only
            out = torch.empty_like(x)
            for g in mixer.current_group.unique().tolist():
                rows = mixer.current_group == g
                out[rows] = self.quantizers[g](x[rows])
            return out
        sigma = mixer.current
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
    history: list[dict] = field(default_factory=list)  # per epoch or round: step, loss, entropy, σ snapshot
    counts: dict[int, int] | None = None  # active selection: how often each timestep was drawn
    rows: list[int] | None = None  # the timestep of each σ row in `history` (default: `timesteps`)
    assigned_by_loss: dict | None = None  # group_search = "loss": the loss tables and what moved

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


class _Optimizer:
    """Adam on the quantizer steps and α of J (Eq. 7), the learning rate decaying exponentially from lr to
    lr_end over `total` steps (APQ-DM: 5e-3 / 3e-3 → 1e-5).

    A step size's rate is relative to its initial value: Adam's update is about lr in absolute terms
    whatever the gradient's scale, and the activation steps of one network span three orders of magnitude,
    so an absolute 5e-3 would move a 0.01 step by half of itself per iteration."""

    def __init__(self, mixer: GroupMixer, quant_params: list[torch.Tensor], total: int, *, lr: float,
                 lr_end: float = 1e-5, entropy_weight: float = 0.8, alpha_lr: float = 0.0,
                 weight_of_t: torch.Tensor | None = None) -> None:  # fmt: skip
        decay = (lr_end / lr) ** (1 / max(total, 1))
        groups = [{"params": [p], "lr": lr * float(p.detach().abs().max())} for p in quant_params]
        if not mixer.fixed:  # alpha_lr > 0: α's own constant rate; 0: the quantizers' decaying one
            groups.append({"params": [mixer.alpha], "lr": alpha_lr or lr})
        self.opt = torch.optim.Adam(groups, lr=lr)
        factors = [lambda i: decay**i] * len(quant_params)
        if not mixer.fixed:
            factors.append((lambda i: 1.0) if alpha_lr else (lambda i: decay**i))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factors)
        self.floor = [0.01 * float(p.detach().abs().max()) for p in quant_params]
        self.mixer, self.quant_params, self.entropy_weight = mixer, quant_params, entropy_weight
        self.weight_of_t = weight_of_t

    def step(self, forward: nn.Module, x, t, c, target) -> float:
        sigma = self.mixer.set_batch(t)
        per_row = (forward(x, t, c) - target).pow(2).flatten(1).sum(1)
        if self.weight_of_t is not None:  # what an ε error at each input's timestep costs (calibration.objective)
            per_row = per_row * self.weight_of_t[timestep_key(t)]
        rec = per_row.mean()
        loss = rec + self.entropy_weight * GroupMixer.entropy(sigma)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        for p, floor in zip(self.quant_params, self.floor, strict=True):  # a step size must stay positive
            p.data.clamp_(min=floor)
        return rec.item()


def snapshot(mixer: GroupMixer, step: int, loss: float | None = None) -> dict:
    """One point of σ's evolution, for the manifest's history and its plot."""
    sigma = mixer.sigma().detach()
    out = {"step": step, "entropy": float(GroupMixer.entropy(sigma)), "sigma": sigma.cpu().numpy().round(3).tolist()}
    if loss is not None:
        out["loss"] = loss
    return out


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
    alpha_lr: float = 0.0,
    weight_of_t: torch.Tensor | None = None,
    progress: bool = False,
) -> GroupSearchResult:
    """Joint optimisation of the quantizer steps and α on J (Eq. 7) over a fixed calibration set.
    `batches()` yields (x, t, c, target) for one epoch, in `steps_per_epoch` batches; `forward(x, t, c)`
    is the mixed fake-quant model whose quantizers read mixer.current."""
    from tqdm.auto import tqdm

    opt = _Optimizer(mixer, quant_params, epochs * steps_per_epoch, lr=lr, lr_end=lr_end,
                     entropy_weight=entropy_weight, alpha_lr=alpha_lr, weight_of_t=weight_of_t)  # fmt: skip
    history = [snapshot(mixer, 0)]
    bar = tqdm(total=epochs * steps_per_epoch, desc="group search", disable=not progress, leave=False)
    for _ in range(epochs):
        losses = []
        for x, t, c, target in batches():
            losses.append(opt.step(forward, x, t, c, target))
            bar.update(1)
        history.append(snapshot(mixer, history[-1]["step"] + len(losses), float(np.mean(losses))))
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


class _Search:
    """The mixed fake-quant network of Eq. 6 over a calibration set that may grow between phases, with the
    full-precision model's ε on the same inputs as targets (data-free distillation of Eq. 7's ε)."""

    def __init__(self, model, layers, weights: dict, cfg, timesteps: list[int], groups: int,
                 inits: dict[str, list[ActParams]]) -> None:  # fmt: skip
        from calibration.qmodules import replace_layers, wrap_residuals

        fixed = groups == len(timesteps)  # one group per calibrated timestep: nothing to search
        init = contiguous_assignment(timesteps, groups)
        self.mixer = GroupMixer(timesteps, groups, init, bias=cfg.group_alpha_bias, fixed=fixed).to(cfg.device)
        self.mixed: dict[str, MixedQuantizer] = {}

        self.aliases = {f"{x.name}:input": x.input_point for x in layers if x.shares is not None}

        def quantizer(point: str) -> MixedQuantizer | None:
            if point in self.aliases:  # the same tensor as another layer's input: one quantizer for both
                return self.mixed[self.aliases[point]]
            if point not in inits:
                return None
            self.mixed[point] = MixedQuantizer(inits[point], self.mixer).to(cfg.device)
            return self.mixed[point]

        def build(name: str, layer: nn.Module) -> nn.Module:
            key = name.removeprefix("unet.")
            if key not in weights:
                return layer
            return MixedLayer(layer, *weights[key], quantizer(f"{key}:input"), quantizer(f"{key}:output"))

        self.fp = model.wrapper().eval()
        self.forward = wrap_residuals(replace_layers(model.wrapper(), build), quantizer, prefix="unet.").eval()
        self.params = [q.scale for m in self.mixed.values() for q in m.quantizers]
        self.cfg, self.rows, self.passes = cfg, None, 0

    def add(self, data) -> None:
        with torch.inference_mode():
            new = [(x, t, c, self.fp(x, t, c)) for x, t, c in data.batches(self.cfg.batch_size, self.cfg.device)]
        cols = [None if v[0] is None else torch.cat(v).clone() for v in zip(*new, strict=True)]  # out of inference
        if self.rows is not None:
            cols = [None if a is None else torch.cat([a, b]) for a, b in zip(self.rows, cols, strict=True)]
        self.rows = cols

    def __len__(self) -> int:
        return 0 if self.rows is None else len(self.rows[0])

    def batches(self, count: int | None = None):
        """`count` batches (default: one epoch), rows reshuffled (seeded) on every pass over the set, so a
        batch mixes timesteps."""
        count = -(-len(self) // self.cfg.batch_size) if count is None else count
        done = 0
        while done < count:
            self.passes += 1
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.passes)
            order = torch.randperm(len(self), generator=gen).to(self.rows[0].device)
            for lo in range(0, len(order), self.cfg.batch_size):
                if done == count:
                    return
                rows = order[lo : lo + self.cfg.batch_size]
                yield tuple(None if v is None else v[rows] for v in self.rows)
                done += 1

    def group_params(self) -> dict[str, list[ActParams]]:
        params = {p: m.params() for p, m in self.mixed.items()}
        return params | {alias: params[point] for alias, point in self.aliases.items()}


def _share_inits(model, layers, cfg, shares: list) -> dict[str, list[ActParams]]:
    """Initial ranges of each group's quantizers: observed on that group's share of the data."""
    from calibration.calibrate import observe_activations

    inits: dict[str, list[ActParams]] = {}
    for share in shares:
        for point, p in observe_activations(model, layers, share, cfg, False).items():
            inits.setdefault(point, []).append(p)
    return inits


def run_group_search(model, layers, weights: dict, data, cfg, *, groups: int, epochs: int, lr: float,
                     entropy_weight: float = 0.8, progress: bool = False):  # fmt: skip
    """Search G groups on the recorded calibration data of `model` (a LoadedModel with `weights` from
    calibration). G equal to the number of calibrated timesteps gives each its own quantizers (no search).
    Returns (GroupSearchResult, {point: [ActParams per group]})."""
    timesteps = sorted({int(t) for t in data.keys()})
    if not 1 <= groups <= len(timesteps):
        raise ValueError(f"groups={groups}: must be between 1 and the {len(timesteps)} calibrated timesteps")
    init = contiguous_assignment(timesteps, groups)
    shares = [data.at_timesteps({t for t, a in zip(timesteps, init, strict=True) if a == g}) for g in range(groups)]
    inits = _share_inits(model, layers, cfg, shares)
    if cfg.group_search == "none":  # each group's min-max ranges on its contiguous share, nothing learned
        sigma = np.eye(groups)[init]
        return GroupSearchResult(dict(zip(timesteps, init, strict=True)), sigma, timesteps), inits
    search = _Search(model, layers, weights, cfg, timesteps, groups, inits)
    search.add(data)
    weight_of_t = loss_weights(model, cfg, data)
    steps = -(-len(search) // cfg.batch_size)
    with torch.enable_grad():
        result = search_loop(search.forward, search.mixer, search.params, search.batches, steps, epochs=epochs,
                             lr=lr, entropy_weight=entropy_weight, alpha_lr=cfg.group_alpha_lr,
                             weight_of_t=weight_of_t, progress=progress)  # fmt: skip
        _assign_by_loss(search, result, cfg, lr, weight_of_t, progress)
    return result, search.group_params()


def _assign_by_loss(search: _Search, result: GroupSearchResult, cfg, lr: float, weight_of_t, progress: bool) -> None:
    """With cfg.group_search == "loss": replace result's argmax-σ assignment (of its timesteps) by the
    per-timestep loss assignment, refined (calibration.group_assign); record what moved."""
    if cfg.group_search != "loss" or search.mixer.fixed:
        return
    from calibration.group_assign import assign_by_loss

    def optimizer(total: int) -> _Optimizer:
        return _Optimizer(search.mixer, search.params, total, lr=0.2 * lr, weight_of_t=weight_of_t)

    final, stats = assign_by_loss(search, optimizer, refine_epochs=cfg.group_refine_epochs, progress=progress)
    of = dict(zip(search.mixer.timesteps, final, strict=True))
    result.assignment = {t: of[t] for t in result.timesteps}
    stats["loss_rows"] = search.mixer.timesteps
    result.assigned_by_loss = stats
