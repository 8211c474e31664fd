"""calibrate(model, config) → CalibrationResult: weight ranges (L_p search or min-max), activation ranges
from recorded full-precision trajectories, optional learned rounding (layer-wise AdaRound or BRECQ blocks)
and LSQ activation steps, optional shortcut splits; one group (G = 1) shared by every timestep."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration.collect import CalibrationData, record_trajectories
from calibration.config import CalibrationConfig
from calibration.model_io import LoadedModel, load_model
from calibration.profiles import get_profile
from calibration.qmodules import (
    QuantLayer,
    extra_points,
    float_modules,
    observe_point,
    quantizable_layers,
    tie_shared_inputs,
)
from calibration.quantizers import (
    ActParams,
    RangeObserver,
    activation_params,
    minmax_weight_scale,
    quantize_weight,
    search_weight_scale,
)
from calibration.result import CalibrationResult
from calibration.shortcut import apply_splits
from runtime.errors import CalibrationError


def quantize_weights(model: LoadedModel, layers: list[QuantLayer], cfg: CalibrationConfig, progress: bool):
    bits = cfg.parsed_bits.weight
    out = {}
    for layer in tqdm(layers, desc="weights", disable=not progress, leave=False):
        w = model.unet.get_submodule(layer.name).weight.detach().float().cpu()
        if cfg.weight_range == "minmax":
            scale = minmax_weight_scale(w, bits, axis=0)
        else:
            scale = search_weight_scale(w, bits, axis=0, p=cfg.weight_lp)
        out[layer.name] = (quantize_weight(w, scale, bits, axis=0), scale)
    return out


def adaround_weights(
    model: LoadedModel,
    layers: list[QuantLayer],
    data: CalibrationData,
    weights: dict,
    cfg: CalibrationConfig,
    progress: bool,
) -> dict:
    """Layer-wise AdaRound on each layer's full-precision inputs (`adaround_samples` recorded calibration
    inputs drawn over all timesteps), keeping the range-searched scales."""
    from calibration.adaround import adaround_layer

    data = data.subset(cfg.adaround_samples, cfg.seed)
    # one forward pass per layer: holding every layer's inputs at once would not fit for large models
    out = dict(weights)
    forward = model.wrapper()
    for layer in tqdm(layers, desc="adaround", disable=not progress, leave=False):
        module = model.unet.get_submodule(layer.name)
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach()))
        try:
            with torch.inference_mode():
                for x, t, c in data.batches(cfg.batch_size, cfg.device):
                    forward(x, t, c)
        finally:
            handle.remove()
        inputs = torch.cat(seen).clone()  # attention projections keep (images, tokens, channels)
        w_int = adaround_layer(
            module, inputs, weights[layer.name][1].to(inputs.device), cfg.parsed_bits.weight,
            iters=cfg.adaround_iters, batch=cfg.recon_batch, lr=cfg.adaround_lr, reg_weight=cfg.adaround_reg,
            seed=cfg.seed,
        )  # fmt: skip
        out[layer.name] = (w_int.cpu(), weights[layer.name][1])
    return out


def observe_activations(
    model: LoadedModel, layers: list[QuantLayer], data: CalibrationData, cfg: CalibrationConfig, progress: bool
) -> dict[str, ActParams]:
    """Per-tensor ranges of every quantization point of the profile, on the full-precision model."""
    profile = get_profile(cfg.target)
    observers: dict[str, RangeObserver] = {}
    handles = []
    for layer in layers:
        module = model.unet.get_submodule(layer.name)
        for point in layer.points(profile):
            if point.endswith(":input") and layer.shares is not None:
                continue  # the same tensor as the layer it shares its input with: that layer's range
            observers[point] = obs = RangeObserver()
            if point.endswith(":input"):
                handles.append(module.register_forward_pre_hook(lambda m, args, o=obs: o.observe(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, y, o=obs: o.observe(y)))
    for point in extra_points(model.unet, profile, cfg.attention_products):
        observers[point] = obs = RangeObserver()
        handles.append(observe_point(model.unet, point, obs.observe))
    forward = model.wrapper()
    try:
        with torch.inference_mode():
            total = -(-len(data) // cfg.batch_size)
            for x, t, c in tqdm(
                data.batches(cfg.batch_size, cfg.device),
                total=total,
                desc="activations",
                disable=not progress,
                leave=False,
            ):
                forward(x, t, c)
    finally:
        for h in handles:
            h.remove()
    params = {}
    for point, obs in observers.items():
        if not obs.seen:
            raise CalibrationError(f"quantization point {point}: never reached by the forward pass")
        lo, hi = obs.range(cfg.activation_range, cfg.percentile)
        params[point] = activation_params(lo, hi, profile.activation_signed, cfg.parsed_bits.activation)
    for layer in layers:
        params[f"{layer.name}:input"] = params[layer.input_point]
    return params


def example_inputs(model: LoadedModel, batch: int = 2, seed: int = 0) -> tuple:
    """One seeded call of the model's wrapper: noise, timesteps spread over the schedule, a condition."""
    from runtime.engine import example_cond

    spec = model.spec
    rng = np.random.default_rng([seed, 11])
    device = next(model.unet.parameters()).device
    x = torch.from_numpy(rng.standard_normal((batch, *spec.sample_shape), dtype=np.float32)).to(device)
    dtype = np.float32 if spec.timestep_type == "float32" else np.int64  # flow models take t = σ·T
    t = torch.from_numpy(np.linspace(0, spec.num_train_timesteps - 1, batch + 2)[1:-1].astype(dtype)).to(device)
    cond = example_cond(spec, batch, rng)
    return x, t, None if cond is None else torch.from_numpy(cond).to(device)


def calibrate(
    model: LoadedModel | str | Path,
    cfg: CalibrationConfig,
    *,
    scheduler: str | Path | None = None,
    weights: dict | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate a model for one export profile; the result is independent of the exporter. `weights`
    (another result's, same weight bits, ranges and rounding) skips the weight stage: a second precision
    of step-aware mixed precision that differs only in activation bits reuses the first one's weights."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, scheduler, device=cfg.device)
    torch.manual_seed(cfg.seed)
    splits = model.family.shortcut_splits(model.unet) if cfg.shortcut_split else {}
    model = dataclasses.replace(model, unet=apply_splits(model.unet, splits))
    layers = tie_shared_inputs(model.wrapper(), quantizable_layers(model.unet), example_inputs(model, seed=cfg.seed))
    start = time.perf_counter()
    active = cfg.timestep_selection == "active"
    data = None if active else record_trajectories(model, cfg, progress)
    t_record = time.perf_counter() - start
    if cfg.reconstructs and len(data) < cfg.recon_batch:
        raise CalibrationError(
            f"recon_batch={cfg.recon_batch}: larger than the {len(data)} recorded calibration inputs; "
            "lower --recon-batch or raise --calib-samples"
        )
    if weights is not None:
        if cfg.weight_rounding == "brecq":
            raise CalibrationError("BRECQ learns the weights with the activations quantized; it cannot reuse weights")
    else:
        weights = quantize_weights(model, layers, cfg, progress)
        if cfg.weight_rounding == "adaround":
            with torch.enable_grad():
                weights = adaround_weights(model, layers, data, weights, cfg, progress)
    recon_stats = {}
    if cfg.reconstructs or not cfg.searches_groups:
        acts = observe_activations(model, layers, data, cfg, progress)
        if cfg.reconstructs:
            from calibration.objective import loss_weights
            from calibration.reconstruct import reconstruct

            weights, acts, recon_stats = reconstruct(model.wrapper(), layers, weights, acts, data, cfg, progress,
                                                     weight_of_t=loss_weights(model, cfg, data),
                                                     block_types=model.family.block_types)  # fmt: skip
        activations = {p: [a] for p, a in acts.items()}
    group_of_t = np.zeros(model.spec.num_train_timesteps, np.int64)
    group_stats = None
    if cfg.searches_groups:
        from calibration import groups

        search_args = dict(groups=cfg.groups, epochs=cfg.group_epochs, lr=cfg.search_lr,
                           entropy_weight=cfg.group_entropy, progress=progress)  # fmt: skip
        if active:
            from calibration.active import run_active_search

            search, group_acts, data = run_active_search(
                model, layers, weights, cfg, rounds=cfg.calib_timesteps, per_round=cfg.calib_samples,
                eta=cfg.active_eta, **search_args,
            )  # fmt: skip
        else:
            search, group_acts = groups.run_group_search(model, layers, weights, data, cfg, **search_args)
        table = search.group_of_t(model.spec.num_train_timesteps)
        group_of_t, activations = groups.compact_groups(table, group_acts)
        group_stats = {"assignment": search.assignment, "history": thin(search.history, 12),
                       "sigma_rows": search.rows or search.timesteps}  # fmt: skip
        if search.counts:
            group_stats["draws"] = search.counts
        if search.assigned_by_loss:
            group_stats["assigned_by_loss"] = search.assigned_by_loss
    errors = activation_errors(model, layers, data, cfg, activations, group_of_t) if cfg.activation_error else None
    stats = {
        "record_seconds": round(t_record, 3),
        "weight_seconds": round(time.perf_counter() - start - t_record, 3),  # ranges, rounding, activations
        "total_seconds": round(time.perf_counter() - start, 3),
        "calibration_inputs": len(data),
        "device": cfg.device,
        "device_name": device_name(cfg.device),
    }
    if group_stats is not None:
        stats["group_search"] = group_stats
    if recon_stats:
        stats["reconstruction"] = recon_stats
    if errors:
        stats["activation_error"] = errors
    return CalibrationResult(
        cfg,
        model.identity(),
        layers,
        weights,
        activations,
        group_of_t,
        float_modules(model.unet),
        stats,
        splits,
    )


def thin(history: list, keep: int) -> list:
    """At most `keep` evenly spaced entries of a history, first and last included."""
    if len(history) <= keep:
        return history
    idx = np.unique(np.linspace(0, len(history) - 1, keep).round().astype(int))
    return [history[i] for i in idx]


def activation_errors(model, layers, data, cfg, activations, group_of_t) -> dict:
    """C-Error on the calibration inputs and G-Error on 16 fresh full-precision generation trajectories at
    every sampling step (APQ-DM Table 1)."""
    from calibration.activation_error import activation_error

    generation = dataclasses.replace(cfg, calib_samples=16, calib_timesteps=cfg.steps, timestep_selection="uniform",
                                     fresh_trajectories=False)  # fmt: skip
    gen = record_trajectories(model, generation, False, purpose="generation")
    return {
        "c_error": activation_error(model, layers, data, cfg, activations, group_of_t),
        "g_error": activation_error(model, layers, gen, cfg, activations, group_of_t),
    }


def device_name(device: str) -> str:
    """What ran calibration, for reports: the GPU's name, or the CPU's core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"cpu ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
