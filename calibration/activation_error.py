"""APQ-DM Table 1's activation quantization error of a set of group scales (C-Error, G-Error)."""

from __future__ import annotations

import numpy as np
import torch

from calibration.quantizers import ActParams
from runtime.engine import timestep_key


def activation_error(model, layers, data, cfg, acts: dict[str, list[ActParams]], group_of_t: np.ndarray) -> float:
    """Quantization error of the activations (APQ-DM Table 1's C-Error on calibration inputs, G-Error on
    generation inputs): 100 · mean over quantization points of Σ (Q_g(t)(a) − a)² / Σ a², with a the
    full-precision network's activation and g(t) the group serving the input's timestep."""
    from calibration.profiles import get_profile

    profile = get_profile(cfg.target)
    err: dict[str, list[float]] = {}
    current: dict[str, torch.Tensor] = {}

    def record(point: str, a: torch.Tensor) -> None:
        a = a.float()
        q = torch.empty_like(a)
        for g in current["g"].unique().tolist():
            rows = current["g"] == g
            q[rows] = acts[point][g].apply(a[rows])
        e = err.setdefault(point, [0.0, 0.0])
        e[0] += float((q - a).pow(2).sum())
        e[1] += float(a.pow(2).sum())

    from calibration.qmodules import extra_points, observe_point

    handles = []
    for layer in layers:
        module = model.unet.get_submodule(layer.name)
        for point in layer.points(profile):
            if point not in acts:
                continue
            if point.endswith(":input"):
                handles.append(module.register_forward_pre_hook(lambda m, args, p=point: record(p, args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, y, p=point: record(p, y)))
    for point in extra_points(model.unet, profile, cfg.attention_products):
        if point in acts:
            handles.append(observe_point(model.unet, point, lambda a, p=point: record(p, a)))
    table = torch.from_numpy(np.asarray(group_of_t, np.int64))
    forward = model.wrapper()
    try:
        with torch.inference_mode():
            for x, t, c in data.batches(cfg.batch_size, cfg.device):
                current["g"] = table[timestep_key(t.cpu())].to(t.device)
                forward(x, t, c)
    finally:
        for h in handles:
            h.remove()
    return 100.0 * float(np.mean([e / max(r, 1e-30) for e, r in err.values()]))
