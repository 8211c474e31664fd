"""What several `dqc` verbs share: argument helpers and the calibration objective's flags."""

from __future__ import annotations

import argparse

from runtime.errors import ConfigError

MODEL_HELP = (
    "a diffusers pipeline directory (unet/ or transformer/ + scheduler/, or a text-to-image pipeline), a bare "
    "UNet2DModel directory with --scheduler, 'reference' for the shipped digits model, 'reference-text' for the "
    "shipped digits text-to-image pipeline or 'reference-dit' for the shipped flow-matching digits DiT"
)


def csv_list(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def int_list(text: str | None, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in csv_list(text) or [])
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def calibration_overrides(a: argparse.Namespace) -> dict:
    """The calibration fields a quality table's --flags override (None: the method's preset)."""
    keys = ("adaround_iters", "act_iters", "recon_batch", "calib_samples", "calib_timesteps", "group_epochs",
            *OBJECTIVE_KEYS)  # fmt: skip
    return {k: getattr(a, k) for k in keys}


OBJECTIVE_KEYS = ("attention_products", "group_search", "group_alpha_lr", "group_alpha_bias", "group_refine_epochs",
                  "loss_weighting", "gac_tau", "gac_val_share", "gac_groups", "gac_meta_steps", "gac_inner_lr",
                  "gac_outer_lr", "gac_gm_weight", "gac_match")  # fmt: skip


def objective_flags(p) -> None:
    """The calibration objective's flags (issue 16), shared by compile and the quality tables."""
    from calibration.config import GROUP_SEARCHES
    from calibration.objective import LOSS_WEIGHTINGS

    p.add_argument("--quantize-attention", dest="attention_products", action=argparse.BooleanOptionalAction,
                   help="also quantize the attention products' activation inputs (q, k, softmax, v): integer "
                   "MatMuls on ONNX Runtime, int8 BMMs on TensorRT (default: off, they run in float)")  # fmt: skip
    p.add_argument("--group-search", choices=GROUP_SEARCHES,
                   help="none: per-group min-max ranges on contiguous shares, nothing learned; sigma: APQ-DM's "
                   "search, g(t) = argmax sigma; loss: the search, then each timestep to the group of least loss "
                   "on its inputs, refined (default loss)")  # fmt: skip
    p.add_argument("--group-alpha-lr", type=float, help="alpha's own constant Adam rate (0: the quantizers' "
                   "decaying rate, as APQ-DM; default 0.05)")  # fmt: skip
    p.add_argument("--group-alpha-bias", type=float, help="alpha's initial lead for its contiguous share "
                   "(default 0.1)")  # fmt: skip
    p.add_argument("--group-refine-epochs", type=int, help="--group-search loss: epochs under the hard "
                   "assignment (default 1)")  # fmt: skip
    p.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS,
                   help="weight each calibration input's error (group search, LSQ pass) by what an eps error at "
                   "its timestep costs: eps (none), x0 ((1-abar)/abar), xprev (the sampler update's eps "
                   "coefficient squared; default), final (xprev carried to the sample)")  # fmt: skip
    g = p.add_argument_group("gradient-aligned calibration (--method gac)")
    g.add_argument("--gac-tau", type=float, help="temperature of the sample weights softmax(s/tau) (default 1)")
    g.add_argument("--gac-val-share", type=float, help="share of the reconstruction inputs held out as the "
                   "timestep-balanced validation split, in (0, 0.5] (default 0.05)")  # fmt: skip
    g.add_argument("--gac-groups", type=int, help="timestep groups of the gradient-matching term, 2 to "
                   "--calib-timesteps (default 5)")  # fmt: skip
    g.add_argument("--gac-meta-steps", type=int, help="outer updates of the sample weights per block (0: none, "
                   "the method is qdiffusion; default 20)")  # fmt: skip
    g.add_argument("--gac-inner-lr", type=float, help="the inner step, in AdaRound-variable units (default 0.05)")
    g.add_argument("--gac-outer-lr", type=float, help="Adam rate of the sample-weight logits (default 0.1)")
    g.add_argument("--gac-gm-weight", type=float, help="weight of the gradient-matching term, relative: its "
                   "size against the validation loss at the block's uniform start (default 1)")  # fmt: skip
    g.add_argument("--gac-match", choices=("cosine", "dot"), help="how the gradient-matching term compares two "
                   "timestep groups' gradients: cosine (directions only; default) or dot (the paper's product, "
                   "which also rewards larger gradients)")  # fmt: skip
