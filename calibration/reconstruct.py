"""BRECQ block reconstruction (Li et al. 2021) as Q-Diffusion runs it (algorithms.md, "AdaRound / BRECQ").

The network is cut into units in execution order: every UNet resnet block and attention block is one unit,
every quantizable layer outside them (time embedding, conv_in, down/upsampler convs, conv_out) is a unit
of its own. Two passes over the units:

1. weights — activations float, for unit k: inputs from the network whose units < k are already
   quantized, target the full-precision unit output on full-precision inputs; minimise
   E‖unit_Q(x̂) − unit_FP(x)‖² + λ Σ (1 − |2h(V) − 1|^β) over the AdaRound variables V of the unit's
   layers (eq. 25 of AdaRound, block output instead of layer output); Adam lr 1e-3, batch 32.
2. activations — hardened weights, every activation quantizer on; the same block loss over the LSQ step
   sizes of the unit's activation quantizers (LSQ eq. 1–4), Adam with cosine decay at a rate relative to
   each step's initial value (cfg.act_lr, as the group search), each input's error weighted by what an ε
   error at its timestep costs (cfg.loss_weighting, calibration.objective).

The stats record, per unit, the error before and after each pass and, for the weights, the gap between the
soft rounding at the end of training and its hardened form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.adaround import AdaRoundWeight, annealed_beta, apply_layer, block_loss
from calibration.collect import CalibrationData
from calibration.config import CalibrationConfig
from calibration.qmodules import ActQuant, QuantLayer, replace_layers, run_with_pre_hooks, wrap_residuals
from calibration.quantizers import ActParams, LsqQuantizer

_REPORT_EVERY = 25


class ReconLayer(nn.Module):
    """A Conv2d or Linear under reconstruction: AdaRound weights (soft, hard, or float) and LSQ
    activation quantizers on its input and, where the profile has one, its output."""

    def __init__(self, layer: nn.Module, scale: torch.Tensor, bits: int, act_in: ActParams | LsqQuantizer,
                 act_out: ActParams | None):  # fmt: skip
        super().__init__()
        self.layer = layer.requires_grad_(False)
        self.rounding = AdaRoundWeight(layer.weight, scale, bits)
        # a quantizer given as a module is shared with the layer that reads the same input tensor
        shared = isinstance(act_in, LsqQuantizer)
        self.act_in = act_in if shared else LsqQuantizer.from_params(act_in).to(layer.weight.device)
        self.act_out = None if act_out is None else LsqQuantizer.from_params(act_out).to(layer.weight.device)
        self.weights, self.quant_acts = "float", False  # weights: float | soft | hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_acts:
            x = self.act_in(x)
        w = self.layer.weight if self.weights == "float" else self.rounding(hard=self.weights == "hard")
        y = apply_layer(self.layer, x, w, self.layer.bias)
        return self.act_out(y) if self.quant_acts and self.act_out is not None else y


@dataclass
class Unit:
    name: str  # module path in the forward wrapper, e.g. "unet.down_blocks.0.resnets.0"
    layers: list[str]  # its quantizable layers, as in the QuantLayer table


def reconstruction_units(forward: nn.Module, layers: list[QuantLayer], example: tuple,
                         block_types: tuple[str, ...]) -> list[Unit]:  # fmt: skip
    """Blocks (modules of the family's `block_types`) and stand-alone layers in the order the forward pass
    first reaches them."""
    names = {f"unet.{layer.name}" for layer in layers}
    blocks = [n for n, m in forward.named_modules() if type(m).__name__ in block_types]
    blocks = [b for b in blocks if not any(b.startswith(f"{o}.") for o in blocks)]  # outermost only
    inside = {n for n in names if any(n.startswith(f"{b}.") for b in blocks)}
    candidates = [b for b in blocks if any(n.startswith(f"{b}.") for n in names)] + sorted(names - inside)
    order: list[str] = []
    run_with_pre_hooks(forward, candidates, lambda n, args: order.append(n) if n not in order else None, example)
    units = []
    for n in order:
        members = [
            layer.name for layer in layers if f"unet.{layer.name}" == n or f"unet.{layer.name}".startswith(f"{n}.")
        ]
        units.append(Unit(n, members))
    return units


class _Stop(Exception):
    """Raised by a capture hook: nothing after the unit needs computing."""


def _collate(calls: list[tuple[tuple, dict]]) -> tuple[list, dict]:
    """Concatenate captured calls along the batch dimension; non-tensor arguments are taken as given."""
    first_args, first_kwargs = calls[0]
    args = [torch.cat([c[0][i] for c in calls]) if torch.is_tensor(a) else a for i, a in enumerate(first_args)]
    kwargs = {k: torch.cat([c[1][k] for c in calls]) if torch.is_tensor(v) else v for k, v in first_kwargs.items()}
    return args, kwargs


def _index(args: list, kwargs: dict, idx: torch.Tensor) -> tuple[list, dict]:
    return (
        [a[idx] if torch.is_tensor(a) else a for a in args],
        {k: v[idx] if torch.is_tensor(v) else v for k, v in kwargs.items()},
    )


def _capture(forward: nn.Module, unit: str, data: CalibrationData, cfg: CalibrationConfig, what: str):
    """The unit's inputs ("inputs": args and kwargs) or its output ("output") for every row of `data`,
    in order, stopping each forward pass at the unit."""
    module = forward.get_submodule(unit)
    calls: list = []
    if what == "inputs":

        def hook(m, args, kwargs):
            calls.append(([a.detach() if torch.is_tensor(a) else a for a in args],
                          {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))  # fmt: skip
            raise _Stop

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(m, args, out):
            calls.append(out.detach())
            raise _Stop

        handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for x, t, c in data.batches(cfg.batch_size, cfg.device):
                try:
                    forward(x, t, c)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if what == "inputs":
        args, kwargs = _collate(calls)
        return _index(args, kwargs, torch.arange(len(data), device=cfg.device))  # leaves inference mode
    return torch.cat(calls).clone()


def _per_row(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """block_loss per input: channels summed, positions averaged."""
    return (out - target).pow(2).sum(1 if out.ndim == 4 else -1).reshape(len(out), -1).mean(1)


def _loss(q_forward: nn.Module, unit: str, args: list, kwargs: dict, target: torch.Tensor, idx,
          row_weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    a, k = _index(args, kwargs, idx)
    out = q_forward.get_submodule(unit)(*a, **k)
    if row_weight is None:
        return block_loss(out, target[idx])
    return (_per_row(out, target[idx]) * row_weight[idx]).mean()  # weighted by the input's timestep or ω


def _sample_weights(q_forward: nn.Module, unit: str, members: list, args: list, kwargs: dict,
                    target: torch.Tensor, split, cfg: CalibrationConfig, generator: torch.Generator):  # fmt: skip
    """GAC's ω over the training rows for this unit (calibration.gac), learned on its soft AdaRound
    variables; returns (per-row weights: n·ω on training rows, 0 on validation rows; ω; the meta steps' record)."""
    from calibration.gac import learn_sample_weights

    module = q_forward.get_submodule(unit)
    ours = {id(m.rounding.v) for m in members}
    params = {n: p for n, p in module.named_parameters() if id(p) in ours}

    def row_loss(theta: dict, rows: torch.Tensor) -> torch.Tensor:
        a, k = _index(args, kwargs, rows)
        out = torch.func.functional_call(module, theta, tuple(a), k, strict=False)
        return _per_row(out, target[rows])

    omega, record = learn_sample_weights(
        params, row_loss, split, tau=cfg.gac_tau, steps=cfg.gac_meta_steps, batch=cfg.recon_batch,
        inner_lr=cfg.gac_inner_lr, outer_lr=cfg.gac_outer_lr, gm_weight=cfg.gac_gm_weight, generator=generator,
        match=cfg.gac_match,
    )  # fmt: skip
    weights = torch.zeros(len(target), device=target.device)
    weights[split.train] = (omega * len(omega)).to(weights)
    return weights, omega, record


def _fit_loss(q_forward: nn.Module, unit: str, args: list, kwargs: dict, target: torch.Tensor, chunk: int,
              row_weight: torch.Tensor | None = None) -> float:  # fmt: skip
    """The unit's reconstruction error over all its reconstruction inputs, in chunks, without gradients."""
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(target), chunk):
            idx = torch.arange(lo, min(lo + chunk, len(target)), device=target.device)
            total += _loss(q_forward, unit, args, kwargs, target, idx, row_weight).item() * len(idx)
    return total / len(target)


def reconstruct(
    fp_forward: nn.Module,
    layers: list[QuantLayer],
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    acts: dict[str, ActParams],
    data: CalibrationData,
    cfg: CalibrationConfig,
    progress: bool = True,
    *,
    block_types: tuple[str, ...],
    weight_of_t: torch.Tensor | None = None,
) -> tuple[dict, dict, dict]:
    """Block-reconstructed integer weights and, when cfg.act_iters > 0, learned activation scales; the
    reconstruction units are the modules of `block_types` (the model family's) and the layers outside them.

    `weights` gives each layer's range-searched per-channel scales (kept), `acts` the observed activation
    quantizers that initialise the LSQ step sizes, `weight_of_t` (T,) the LSQ pass's per-timestep loss
    weights (None: uniform). With cfg.sample_weighting "gac" (and meta steps), each unit's loss in both
    passes is weighted per input by the ω GAC learns before its weights pass, on the rows outside GAC's
    validation split (calibration.gac). Returns (weights, acts, stats)."""
    bits = cfg.parsed_bits.weight
    data = data.subset(cfg.adaround_samples, cfg.seed)
    rows = len(data)
    row_t_np = data.keys()
    row_t = torch.from_numpy(row_t_np).to(cfg.device)
    act_weight = None if weight_of_t is None else weight_of_t.to(cfg.device)[row_t]
    split = None
    if cfg.sample_weighting == "gac" and cfg.gac_meta_steps > 0:
        from calibration.gac import split_rows, weight_record

        split = split_rows(row_t_np, cfg.gac_val_share, cfg.gac_groups, cfg.seed, cfg.device)
    unit_weight: dict[str, torch.Tensor] = {}  # GAC: n·ω per row, learned before the unit's weights pass
    meta_gen = torch.Generator().manual_seed(cfg.seed + 6029)
    recon: dict[str, ReconLayer] = {}

    shares = {layer.name: layer.shares for layer in layers if layer.shares is not None}

    def build(name: str, layer: nn.Module) -> nn.Module:
        key = name.removeprefix("unet.")
        if key not in weights:
            return layer
        act_in = recon[shares[key]].act_in if key in shares else acts[f"{key}:input"]
        recon[key] = ReconLayer(layer, weights[key][1], bits, act_in, acts.get(f"{key}:output"))
        return recon[key]

    fp_forward = copy.deepcopy(fp_forward).eval().requires_grad_(False)
    residuals: list[ActQuant] = []  # the profile's residual quantizers: fixed, on with the activations

    def residual(point: str) -> ActQuant | None:
        if point not in acts:
            return None
        residuals.append(ActQuant(acts[point]))
        residuals[-1].enabled = False
        return residuals[-1]

    q_forward = wrap_residuals(replace_layers(fp_forward, build), residual, prefix="unet.").eval()
    x0, t0, c0 = next(data.batches(1, cfg.device))
    units = reconstruction_units(fp_forward, layers, (x0, t0, c0), block_types)
    gen = torch.Generator().manual_seed(cfg.seed)
    stats: dict = {"units": len(units), "rows": rows, "weight_loss": {}, "act_loss": {}}
    learned: set[int] = set()  # LSQ quantizers a previous unit trained: a later unit that shares them keeps them
    if split is not None:
        stats["gac"] = {}

    def run(phase: str, iters: int) -> None:
        bar = tqdm(total=len(units) * iters, desc=f"reconstruct {phase}", disable=not progress, leave=False)
        for unit in units:
            members = [recon[n] for n in unit.layers if n in recon]
            if not members:
                bar.update(iters)
                continue
            args, kwargs = _capture(q_forward, unit.name, data, cfg, "inputs")
            target = _capture(fp_forward, unit.name, data, cfg, "output")
            if phase == "weights":
                for m in members:
                    m.weights = "soft"
                if split is not None:
                    unit_weight[unit.name], omega, record = _sample_weights(
                        q_forward, unit.name, members, args, kwargs, target, split, cfg, meta_gen
                    )
                    stats["gac"][unit.name.removeprefix("unet.")] = weight_record(omega, row_t_np, split) | record
            row_weight = act_weight if phase == "activations" else None
            if unit.name in unit_weight:
                gac = unit_weight[unit.name]
                row_weight = gac if row_weight is None else row_weight * gac
            if phase == "weights":
                params = [m.rounding.v for m in members]
                opt = torch.optim.Adam(params, lr=cfg.adaround_lr)
                sched = None
            else:
                quantizers = {id(q): q for m in members for q in (m.act_in, m.act_out) if q is not None}
                params = [q.scale for k, q in quantizers.items() if k not in learned]
                learned.update(quantizers)
                if not params:  # every quantizer of the unit was learned with the layers it shares an input with
                    bar.update(iters)
                    continue
                floors = [0.01 * float(q.detach().abs().max()) for q in params]
                opt = torch.optim.Adam([{"params": [q], "lr": cfg.act_lr * float(q.detach().abs().max())}
                                        for q in params])  # fmt: skip
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
            # reported: the unit's error on all its inputs before (round-to-nearest weights / observed
            # activation ranges) and after, hard-rounded; and the training loss over the last steps
            soft = [m.weights for m in members]
            for m in members:
                m.weights = "hard"  # at initialisation hard rounding is round-to-nearest
            before = _fit_loss(q_forward, unit.name, args, kwargs, target, 4 * cfg.recon_batch, row_weight)
            for m, w in zip(members, soft, strict=True):
                m.weights = w
            window = min(_REPORT_EVERY, iters)
            tail, shown = [], 0
            for i in range(iters):
                if split is None:
                    idx = torch.randint(0, rows, (cfg.recon_batch,), generator=gen).to(target.device)
                else:  # the validation rows stay out of reconstruction
                    pick = torch.randint(0, len(split.train), (cfg.recon_batch,), generator=gen)
                    idx = split.train[pick.to(split.train.device)]
                rec = _loss(q_forward, unit.name, args, kwargs, target, idx, row_weight)
                loss = rec
                if phase == "weights" and (beta := annealed_beta(i, iters)) is not None:
                    loss = rec + cfg.adaround_reg * sum(m.rounding.regulariser(beta) for m in members)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                    for q, floor in zip(params, floors, strict=True):  # a step size must stay positive
                        q.data.clamp_(min=floor)
                if i >= iters - window:
                    tail.append(rec.item())
                if (i + 1) % _REPORT_EVERY == 0 or i == iters - 1:
                    bar.update(i + 1 - shown)
                    shown = i + 1
            bar.set_postfix(unit=unit.name.removeprefix("unet."), loss=f"{sum(tail) / len(tail):.4g}")
            entry = {"before": round(before, 6)}
            if phase == "weights":  # the soft rounding as trained, before hardening: the soft/hard gap
                entry["soft"] = round(_fit_loss(q_forward, unit.name, args, kwargs, target, 4 * cfg.recon_batch), 6)
            for m in members:
                m.weights = "hard"
            after = _fit_loss(q_forward, unit.name, args, kwargs, target, 4 * cfg.recon_batch, row_weight)
            entry |= {"after": round(after, 6), "train_tail": round(sum(tail) / len(tail), 6)}
            stats[f"{'weight' if phase == 'weights' else 'act'}_loss"][unit.name.removeprefix("unet.")] = entry
        bar.close()

    with torch.enable_grad():
        if cfg.weight_rounding == "brecq":
            run("weights", cfg.adaround_iters)
        else:
            for name, m in recon.items():  # keep the given (nearest or layer-wise) integer weights
                m.rounding.v.data = torch.where(weights[name][0].to(m.rounding.v.device).float() > m.rounding.w_floor,
                                                1.0, -1.0)  # fmt: skip
        for m in recon.values():
            m.weights, m.quant_acts = "hard", cfg.act_iters > 0
        for q in residuals:
            q.enabled = cfg.act_iters > 0
        if cfg.act_iters > 0:
            run("activations", cfg.act_iters)
    new_weights = {n: (m.rounding.integer().cpu(), weights[n][1]) for n, m in recon.items()}
    new_acts = dict(acts)
    if cfg.act_iters > 0:
        for n, m in recon.items():
            new_acts[f"{n}:input"] = m.act_in.to_params()
            if m.act_out is not None:
                new_acts[f"{n}:output"] = m.act_out.to_params()
    return new_weights, new_acts, stats
