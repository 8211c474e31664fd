"""The timestep→group assignment from each group's loss at each timestep (issue 16).

After APQ-DM's soft search (Eqs. 6–7), the deployed network runs every timestep through one group's
quantizers. Evaluating each calibrated timestep's inputs with every group's quantizers forced on gives
the loss table L[t, g] of exactly that deployed choice; g(t) = argmin_g L[t, g] picks, per timestep, the
group that serves it best. Then the quantizer steps are trained for `refine_epochs` under that hard
assignment (σ one-hot and fixed), and the table is evaluated again for the final g(t).
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.engine import timestep_key


def per_group_loss(search) -> np.ndarray:
    """L[k, g]: mean squared ε error (summed over elements) of calibrated timestep k's inputs with group
    g's quantizers forced on. `search` is a groups._Search holding the calibration rows."""
    mixer = search.mixer
    groups = mixer.alpha.shape[1]
    sums = torch.zeros(len(mixer.timesteps), groups, dtype=torch.float64)
    counts = torch.zeros(len(mixer.timesteps), dtype=torch.float64)
    x_all, t_all, c_all, target_all = search.rows
    rows = torch.tensor([mixer.row[int(t)] for t in timestep_key(t_all).tolist()])
    size = search.cfg.batch_size
    try:
        with torch.no_grad():
            for g in range(groups):
                mixer.forced = g
                for lo in range(0, len(t_all), size):
                    sl = slice(lo, lo + size)
                    x, t, c = x_all[sl], t_all[sl], None if c_all is None else c_all[sl]
                    mixer.set_batch(t)
                    err = (search.forward(x, t, c) - target_all[sl]).pow(2).flatten(1).sum(1)
                    sums[:, g].index_add_(0, rows[sl], err.double().cpu())
                    if g == 0:
                        counts.index_add_(0, rows[sl], torch.ones(len(err), dtype=torch.float64))
    finally:
        mixer.forced = None
    return (sums / counts.clamp_min(1)[:, None]).numpy()


def assign_by_loss(search, optimizer_factory, *, refine_epochs: int, progress: bool = False) -> tuple[list[int], dict]:
    """g(t) = argmin_g L[t, g], refined: `refine_epochs` of training under that hard assignment (with the
    _Optimizer that `optimizer_factory(total_steps)` returns), then argmin again. Returns (assignment in
    the mixer's timestep order, stats: the soft search's argmax, the loss tables, timesteps moved)."""
    from tqdm.auto import tqdm

    soft = search.mixer.sigma().detach().argmax(-1).cpu().tolist()
    table = per_group_loss(search)
    first = table.argmin(1).tolist()
    stats = {"soft_assignment": soft, "loss_first": table.round(6).tolist()}
    final = first
    if refine_epochs > 0:
        search.mixer.fix(first)
        steps = refine_epochs * -(-len(search) // search.cfg.batch_size)
        opt = optimizer_factory(steps)
        bar = tqdm(total=steps, desc="group refinement", disable=not progress, leave=False)
        for batch in search.batches(steps):
            opt.step(search.forward, *batch)
            bar.update(1)
        bar.close()
        table = per_group_loss(search)
        final = table.argmin(1).tolist()
        stats["loss_final"] = table.round(6).tolist()
    stats["moved_from_soft"] = int(sum(a != b for a, b in zip(soft, final, strict=True)))
    stats["loss_of_assignment"] = float(np.mean(table[np.arange(len(final)), final]))
    return final, stats
