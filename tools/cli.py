"""The `dqc` command line: each verb a thin argparse shell over one library call."""

from __future__ import annotations

import argparse
import json
import sys

from runtime.bundle import BACKENDS
from runtime.errors import ConfigError, DqcError
from runtime.openvino import DEFAULT_HINT, PRECISION_HINTS

MODEL_HELP = (
    "a diffusers pipeline directory (unet/ + scheduler/), a bare UNet2DModel directory with --scheduler, "
    "or 'reference' for the shipped digits model"
)


def _compile(a: argparse.Namespace) -> None:
    from calibration.config import CalibrationConfig
    from tools.pipeline import compile_model

    cfg = CalibrationConfig.for_method(
        a.method,
        bits=a.bits,
        target=a.target,
        sampler=a.sampler,
        steps=a.steps,
        eta=a.eta,
        guidance=a.guidance,
        calib_samples=a.calib_samples,
        calib_timesteps=a.calib_timesteps,
        batch_size=a.batch_size,
        seed=a.seed,
        activation_range=a.activation_range,
        timestep_selection=a.timestep_selection,
        weight_range=a.weight_range,
        weight_rounding=a.weight_rounding,
        adaround_iters=a.adaround_iters,
        adaround_samples=a.adaround_samples,
        recon_batch=a.recon_batch,
        act_iters=a.act_iters,
        shortcut_split=a.shortcut_split,
        groups=_resolve_groups(a.groups, a),
        group_epochs=a.group_epochs,
        **{k: getattr(a, k) for k in OBJECTIVE_KEYS},
        fresh_trajectories=a.fresh_trajectories,
        active_eta=a.active_eta,
        percentile=a.percentile,
        device=a.device or _default_device(),
    )
    out = compile_model(
        a.model,
        a.output,
        cfg,
        scheduler=a.scheduler,
        overwrite=a.force,
        calibration_out=a.save_calibration,
        ptqd_samples=a.ptqd_samples if a.ptqd else None,
        mixed_bits=a.mixed_bits,
        switch_t=a.switch_t,
        progress=not a.quiet,
    )
    print(f"wrote bundle {out}")
    if a.mixed_bits:
        from runtime.bundle import load_bundle

        _print_plan(load_bundle(out).manifest["precision_plan"])


def _print_plan(plan: dict) -> None:
    how = "set by --switch-t" if plan["overridden"] else "PTQD's SNR criterion"
    print(
        f"mixed precision ({how}): {plan['low']} at t >= {plan['switch_t']} ({plan['steps'][plan['low']]} steps), "
        f"{plan['high']} below ({plan['steps'][plan['high']]} steps); {plan['bop_saving']:.1%} fewer bit "
        f"operations than {plan['high']} at every step"
        + (f" (the criterion chose t >= {plan['switch_t_criterion']})" if plan["overridden"] else "")
    )


def _csv(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _ints(text: str | None, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(text) or [])
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8") from None


def _groups_arg(text: str) -> int | str:
    if text == "per-step":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of groups, or per-step") from None


def _resolve_groups(groups: int | str | None, a: argparse.Namespace) -> int | None:
    """per-step: one group per calibrated timestep (the method's calib_timesteps unless given)."""
    if groups != "per-step":
        return groups
    from calibration.config import CalibrationConfig

    return a.calib_timesteps or CalibrationConfig.for_method(a.method).calib_timesteps


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _engine_words(engine: dict) -> str:
    names = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "trt": "TensorRT", "torch": "torch"}
    words = f"{names.get(engine.get('backend'), engine.get('backend'))} {engine.get('version', '')}".strip()
    return words + (f" ({engine['precision_hint']} float parts)" if "precision_hint" in engine else "")


def _sample(a: argparse.Namespace) -> None:
    from tools.pipeline import sample_to_file

    run = sample_to_file(
        a.source,
        a.output,
        n=a.n,
        steps=a.steps,
        eta=a.eta,
        sampler=a.sampler,
        seed=a.seed,
        class_label=a.class_label,
        guidance=a.guidance,
        batch_size=a.batch_size,
        png=a.png,
        scheduler=a.scheduler,
        ptqd=() if a.no_ptqd else tuple(_csv(a.ptqd) or ()),
        precision=a.precision,
        switch_t=a.switch_t,
        backend=a.backend,
        hint=a.precision_hint,
        progress=not a.quiet,
    )
    print(
        f"wrote {a.output}: {a.n} samples, {len(run.timesteps)} steps, "
        f"{1e3 * run.seconds_per_step:.2f} ms per engine call on {_engine_words(run.engine)}"
    )
    if run.ptqd:
        share = run.ptqd_seconds / max(run.engine_seconds, 1e-12)
        print(f"PTQD corrections {','.join(run.ptqd)}: {share:.2%} of the engine time")
    for note in run.ptqd_notes:
        print(f"PTQD: {note}")
    if len({p for p in run.step_precisions}) > 1:
        from tools.pipeline import precision_split

        split = precision_split(run.step_precisions)
        runs = ", ".join(f"{r['bits']} steps {r['step_from']}–{r['step_to']}" for r in split)
        print(f"precisions: {runs}")


def _info(a: argparse.Namespace) -> None:
    from tools.pipeline import bundle_info

    info = bundle_info(a.bundle)
    if a.plots:
        from tools.pipeline import group_plots

        for path in group_plots(a.bundle, a.plots):
            print(f"wrote {path}")
    if a.json:
        print(json.dumps(info, indent=1))
        return
    print(f"bundle {info['bundle']}  (format v{info['format_version']}, target {info['target']}, bits {info['bits']})")
    print(f"model  {info['model']['class']}  weights sha256 {info['model']['weight_sha256'][:16]}…")
    cal = info["calibration"]
    per = "rounds" if cal.get("selection") == "active" else "steps"
    print(
        f"calibrated for {cal.get('sampler')} {cal.get('steps')} steps, eta {cal.get('eta')}, "
        f"{cal.get('samples')} trajectories × {cal.get('timesteps')} {per}, "
        f"method {cal.get('method')}, {cal.get('selection')} timesteps, "
        f"{cal.get('activation_range')} activation ranges"
    )
    n_steps = info["step_ranges"][-1]["step_to"] + 1 if info["step_ranges"] else 0
    print(f"groups ({len(info['groups'])}) over the {n_steps} calibrated {cal.get('sampler')} steps:")
    for r in info["step_ranges"]:
        print(f"  steps {r['step_from']:>3}–{r['step_to']:<3} (t = {r['t_from']}..{r['t_to']}): group {r['group']}")
    print("training timesteps t → group (other step counts route by this table):")
    for r in info["timestep_ranges"]:
        print(f"  t = {r['t_from']}..{r['t_to']}: group {r['group']}")
    for bits, q in (info["ptqd"] or {}).items():
        print(
            f"PTQD statistics {bits} ({q['sampler']} {q['steps']} steps, eta {q['eta']}): k in {q['k_range']} "
            f"({q['k_positive_share']:.0%} positive), sigma_q in {q['sigma_q_range']}, |bias| ≤ {q['bias_abs_max']}"
            + (f"; k ≤ −1 fell back to 0 at t = {q['k_fallback']}" if q["k_fallback"] else "")
            + (f"; CNC guard off at {len(q['cnc_guard_off'])} steps" if q.get("cnc_guard_off") else "")
        )
    if info["precision_plan"]:
        _print_plan(info["precision_plan"])
    print(f"quantized nodes: {info['quantized_nodes']}; left in float: {len(info['float_nodes'])}")
    for f in info["float_nodes"]:
        print(f"  {f['node']} ({f['op']}): {f['reason']}")
    print("files:")
    for name, size in info["files"].items():
        print(f"  {name:<24}{size / 1e6:>10.3f} MB")


def _lint(a: argparse.Namespace) -> int:
    from exporter.lint import lint_bundle

    report = lint_bundle(a.bundle, a.target)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        groups = report["groups"]
        print(f"{report['bundle']}: {len(groups)} group graphs against the {report['target']} rules")
        for g, violations in groups.items():
            for v in violations:
                print(f"  group {g}  [{v['rule']}] {v['node']}: {v['message']}")
        print(f"{report['violations']} violations" if report["violations"] else "no violations")
    return 1 if report["violations"] else 0


def _build(a: argparse.Namespace) -> None:
    from tools.build import run_build

    sizes = _ints(a.batch_sizes, "--batch-sizes") or None
    report = run_build(a.bundle, backend=a.backend, **({"batch_sizes": sizes} if sizes else {}), opt_batch=a.opt_batch,
                       workspace_mb=a.workspace_mb, timing_cache=a.timing_cache, verify_int8=a.verify_int8,
                       progress=not a.quiet)  # fmt: skip
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"built {len(report.get('groups', {}))} TensorRT plans in {a.bundle}/engines/trt (TensorRT "
              f"{report.get('tensorrt_version')}, batch {report.get('batch_sizes')})")  # fmt: skip


def _demo(a: argparse.Namespace) -> None:
    from tools.demo import run_demo

    run_demo(a.output, n=a.n, steps=a.steps, eta=a.eta, guidance=a.guidance, calib_samples=a.calib_samples,
             groups=a.groups, group_epochs=a.group_epochs, ptqd_samples=a.ptqd_samples, seed=a.seed,
             progress=not a.quiet)  # fmt: skip


def _eval(a: argparse.Namespace) -> None:
    from tools.metrics import evaluate
    from tools.pipeline import check_output_file, write_json

    check_output_file(a.json, "--json")
    r = evaluate(
        a.samples,
        reference=a.reference,
        labels=a.labels,
        classifier=a.classifier,
        fid_inception=a.fid_inception,
        inception_weights=a.inception_weights,
    )
    acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
    print(f"{r['samples']}: N = {r['n']}, seed {r['seed']}")
    print(f"  FD (classifier features vs held-out digits) {r['fd']:.4f}")
    print(f"  accuracy (classified as requested)          {acc}")
    if "psnr_vs_reference" in r:
        lo, hi = r["psnr_ci95"]
        plo, phi = r["psnr_pooled_ci95"]
        print(f"  PSNR vs {r['reference']}  mean per sample {r['psnr_vs_reference']:.2f} dB [{lo:.2f}, {hi:.2f}], "
              f"pooled {r['psnr_pooled_vs_reference']:.2f} dB [{plo:.2f}, {phi:.2f}] (95 % bootstrap); "
              f"MSE {r['mse_vs_reference']:.3g}")  # fmt: skip
    if a.fid_inception:
        fid = r["fid_inception"]
        print(f"  FID (Inception)  {'—' if fid is None else f'{fid:.3f}'}  ({r['fid_inception_note']})")
    if a.json:
        write_json(a.json, r)
        print(f"wrote {a.json}")


def _train_reference(a: argparse.Namespace) -> None:
    from tools.train_reference import (
        ClassifierTrainConfig,
        DiffusionTrainConfig,
        train_classifier,
        train_diffusion,
    )

    if a.part in ("all", "classifier"):
        meta = train_classifier(a.output, ClassifierTrainConfig(seed=a.seed, device=a.device), progress=not a.quiet)
        acc = meta["test_accuracy"]
        print(f"classifier: {acc:.2%} on the held-out test split -> {a.output}/classifier.safetensors")
    if a.part in ("all", "diffusion"):
        cfg = DiffusionTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device)
        out = train_diffusion(a.output, cfg, progress=not a.quiet)
        print(f"diffusion model: {out}/unet, {out}/scheduler (EMA weights); loss log {out}/train_log.jsonl")


def _calibration_overrides(a: argparse.Namespace) -> dict:
    """The calibration fields a quality table's --flags override (None: the method's preset)."""
    keys = ("adaround_iters", "act_iters", "recon_batch", "calib_samples", "calib_timesteps", "group_epochs",
            *OBJECTIVE_KEYS)  # fmt: skip
    return {k: getattr(a, k) for k in keys}


OBJECTIVE_KEYS = ("group_search", "group_alpha_lr", "group_alpha_bias", "group_refine_epochs", "loss_weighting")


def _objective_flags(p) -> None:
    """The calibration objective's flags (issue 16), shared by compile and the quality tables."""
    from calibration.config import GROUP_SEARCHES
    from calibration.objective import LOSS_WEIGHTINGS

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


def _bench(a: argparse.Namespace) -> None:
    if a.ptqd_ablation:
        from tools.ptqd_ablation import run_ptqd_ablation

        run_ptqd_ablation(
            a.model or "reference",
            bits=_csv(a.bits),
            samplers=_csv(a.samplers),
            out_dir=a.out or "ptqd_ablation",
            method=a.method,
            mixed_bits=a.mixed_bits,
            n=a.n,
            steps=a.steps,
            seed=a.seed,
            ptqd_samples=a.ptqd_samples,
            reuse_calibration=a.reuse_calibration,
            regather_samples=a.regather_samples,
            batch_size=a.sample_batch,
            calibration=_calibration_overrides(a),
            backend=a.backend,
            progress=not a.quiet,
        )
        return
    if a.ptqd_checks:
        from tools.ptqd_checks import run_ptqd_checks

        if not a.model:
            raise ConfigError("--ptqd-checks: give the bundle as MODEL")
        run_ptqd_checks(a.model, model_dir=a.fp, n=a.n, seed=a.seed, json_out=a.json, progress=not a.quiet)
        return
    if a.groups_vs:
        from tools.group_bench import run_group_bench

        if not a.model:
            raise ConfigError("--groups-vs: give the multi-group bundle as MODEL")
        run_group_bench(a.model, a.groups_vs, batch=a.batch, reps=a.reps, json_out=a.json, progress=not a.quiet)
        return
    if a.methods:
        from tools.method_table import run_method_table

        run_method_table(
            a.model or "reference",
            methods=_csv(a.methods),
            bits=_csv(a.bits),
            out_dir=a.out or "method_table",
            n=a.n,
            steps=a.steps,
            eta=a.eta,
            seed=a.seed,
            batch_size=a.sample_batch,
            calibration=_calibration_overrides(a)
            | dict(fresh_trajectories=a.fresh_trajectories, activation_error=a.activation_error or None),
            groups=_csv(a.groups),
            timesteps=_csv(a.timesteps),
            calib_sizes=[int(v) for v in _csv(a.calib_sizes) or []] or None,
            backend=a.backend,
            progress=not a.quiet,
        )
        return
    from tools.bench import BenchPlan, run_bench

    if a.quick:
        import dataclasses

        plan = dataclasses.replace(BenchPlan.quick(), memory=a.memory, profile=a.profile)
    else:
        models = tuple(_csv(a.models) or ([a.model] if a.model else ["reference", "cifar10"]))
        batches = _ints(a.batches, "--batches")
        plan = BenchPlan(models=models, batches=batches, reps=a.reps, memory=a.memory, profile=a.profile)
    run_bench(plan, out_dir=a.out, progress=not a.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dqc",
        description="Diffusion quantization compiler: calibrate a diffusers "
        "model, export quantized ONNX bundles, and sample them.",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    c = sub.add_parser(
        "compile",
        help="calibrate a model and export a quantized bundle",
        description="Calibrate a diffusers UNet2DModel on full-precision trajectories and export "
        "one Q/DQ ONNX graph per timestep group into a bundle directory.",
    )
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument("-o", "--output", required=True, help="bundle directory to create")
    c.add_argument("--scheduler", help="scheduler directory or scheduler_config.json (bare model directories)")
    c.add_argument("--bits", default="W8A8", help="weight/activation bit-widths, e.g. W8A8 (default)")
    c.add_argument(
        "--target",
        default="ort-cpu",
        choices=["ort-cpu", "trt", "trt-bf16", "trt-fp32"],
        help="export profile: ort-cpu (ONNX Runtime integer kernels, default); trt (TensorRT explicit quantization, "
        "strongly typed FP16; then dqc build), trt-bf16, trt-fp32 (the trt placement in FP32, runs on ORT too)",
    )
    c.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="deployment sampler (default ddim)")
    c.add_argument("--steps", type=int, default=100, help="deployment sampling steps (default 100)")
    c.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    c.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    c.add_argument(
        "--calib-samples", type=int, help="full-precision trajectories (default 64; --timesteps active: per round)"
    )
    c.add_argument(
        "--calib-timesteps",
        type=int,
        help="sampling steps whose inputs are kept (default 20, at most --steps; --timesteps active: rounds, "
        "apqdm default 16)",
    )
    c.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    c.add_argument(
        "--method",
        default="lp",
        choices=["lp", "naive", "qdiffusion", "ptq4dm", "apqdm"],
        help="calibration preset (explicit flags override it): lp (default: per-channel L_p weight-range "
        "search, min-max activations, round-to-nearest); naive (min-max ranges, round-to-nearest: what ONNX "
        "Runtime's static quantizer does); qdiffusion (uniform timesteps, BRECQ block reconstruction with "
        "AdaRound, LSQ activation steps, shortcut split); ptq4dm (normal timesteps, the same reconstruction); "
        "apqdm (8 timestep groups from APQ-DM's differentiable search, one graph per group)",
    )
    c.add_argument("--activation-range", choices=["minmax", "percentile"], help="default: the method's (minmax)")
    c.add_argument("--weight-range", choices=["lp", "minmax"], help="per-channel weight range: L_p search or max |w|")
    c.add_argument(
        "--weight-rounding",
        choices=["nearest", "adaround", "brecq"],
        help="nearest; adaround: learned up/down rounding per weight, layer by layer on float inputs; brecq: "
        "the same learned per resnet/attention block on the inputs of the already-quantized network",
    )
    c.add_argument("--adaround-iters", type=int, help="AdaRound iterations per layer or block (default 20000)")
    c.add_argument("--adaround-samples", type=int, help="calibration inputs a layer/block is fitted on (default 1024)")
    c.add_argument("--recon-batch", type=int, help="reconstruction batch (default 32)")
    c.add_argument("--act-iters", type=int, help="LSQ activation step-size iterations per block (0: off; presets)")
    c.add_argument(
        "--groups",
        type=_groups_arg,
        help="timestep groups G (apqdm: 8; 1: one shared set of scales; per-step: one per calibrated timestep)",
    )
    c.add_argument("--group-epochs", type=int, help="epochs of the group search (default 10)")
    _objective_flags(c)
    c.add_argument(
        "--shortcut-split",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="separate quantizers for the two halves of decoder skip concatenations (qdiffusion: on)",
    )
    c.add_argument(
        "--timesteps",
        "--timestep-selection",
        dest="timestep_selection",
        choices=["uniform", "random", "normal", "active"],
        help="which sampling steps feed calibration: uniform (Q-Diffusion, default), random, normal (PTQ4DM), "
        "active (apqdm's default: APQ-DM Eq. 12, each round records --calib-samples fresh trajectories at the "
        "step of highest group-weight entropy + eta/(draws + 1), for --calib-timesteps rounds)",
    )
    c.add_argument(
        "--fresh-trajectories",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record each calibrated step from its own --calib-samples trajectories instead of the same ones "
        "at every step (active: always)",
    )
    c.add_argument("--active-eta", type=float, help="eta of the active selection score (default 1.5)")
    c.add_argument("--percentile", type=float, default=99.99, help="with --activation-range percentile")
    c.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the calibration trajectories; their noise is a calibration stream that no "
        "`dqc sample --seed` draws, so evaluation stays held out (default 0)",
    )
    c.add_argument("--device", help="calibration device: cpu or cuda (default: cuda when present)")
    c.add_argument("--save-calibration", metavar="FILE", help="also write the CalibrationResult file")
    c.add_argument("--ptqd", action="store_true", help="also gather PTQD statistics (k, bias, residual std per step)")
    c.add_argument("--ptqd-samples", type=int, default=1024, help="trajectories for the PTQD statistics (default 1024)")
    c.add_argument(
        "--mixed-bits",
        metavar="BITS",
        help="step-aware mixed precision: also build engines at this cheaper precision (e.g. W4A4 with --bits "
        "W4A8, same weight bits) and run it on the early steps PTQD's SNR criterion allows; needs --ptqd",
    )
    c.add_argument("--switch-t", type=int, help="with --mixed-bits: run the cheaper precision at t >= this "
                   "timestep instead of where the SNR criterion puts the switch")  # fmt: skip
    c.add_argument("--force", action="store_true", help="replace an existing bundle")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_compile)

    s = sub.add_parser(
        "sample",
        help="draw samples from a bundle or a full-precision model",
        description="Sample a bundle (OpenVINO or ONNX Runtime on the CPU, TensorRT plans on a GPU) or a model "
        "directory (full precision, torch) with a seeded host-side sampler; identical seeds give identical noise "
        "for both. The output records the backend that ran.",
    )
    s.add_argument("source", help="bundle directory, or " + MODEL_HELP)
    s.add_argument("-n", type=int, required=True, help="number of samples")
    s.add_argument("-o", "--output", required=True, help="output .npz (samples: float32 (N, C, H, W) in [−1, 1])")
    s.add_argument("--png", help="also write a PNG grid of the samples")
    s.add_argument("--steps", type=int, help="sampling steps (default: the bundle's calibrated steps, else 100)")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], help="default: the bundle's calibrated sampler, else ddim")
    s.add_argument("--eta", type=float, help="DDIM eta (default: calibrated, else 0)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--class-label", help="label or comma list for class-conditional models (default: cycle classes)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: calibrated, else 1)")
    s.add_argument(
        "--ptqd",
        default="cnc,bc,vsc",
        metavar="C1,C2",
        help="PTQD corrections applied when the bundle has statistics: cnc (correlated noise; skipped where it "
        "would raise the expected error), cnc-all (at every step), gain (instead of cnc: the minimum-error gain "
        "c_t = (1+k) E[eps^2] / ((1+k)^2 E[eps^2] + sigma_q^2)), bc (bias), vsc (variance schedule; no effect "
        "with DDIM eta 0) (default: cnc,bc,vsc)",
    )
    s.add_argument("--no-ptqd", action="store_true", help="apply no PTQD correction")
    s.add_argument("--precision", metavar="BITS", help="mixed-precision bundles: run this precision at every step")
    s.add_argument("--switch-t", type=int, help="mixed-precision bundles: run the cheaper precision at t >= this "
                   "timestep (default: the bundle's plan)")  # fmt: skip
    s.add_argument("--batch-size", type=int, default=16, help="samples per engine call (default 16)")
    s.add_argument(
        "--backend", default="auto", choices=BACKENDS,
        help="what runs a bundle's graphs: ort (ONNX Runtime), openvino (OpenVINO CPU plugin), trt (the TensorRT "
        "plans of dqc build), auto (default: TensorRT plans when the bundle has them and TensorRT loads, else "
        "OpenVINO when installed, else ONNX Runtime)",
    )  # fmt: skip
    s.add_argument("--precision-hint", choices=PRECISION_HINTS, help="openvino: the precision of the graph's float "
                   f"parts (default {DEFAULT_HINT}; bf16 needs a CPU with AVX-512 BF16 or AMX)")  # fmt: skip
    s.add_argument("--scheduler", help="scheduler for a bare model directory")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_sample)

    i = sub.add_parser(
        "info",
        help="show what a bundle holds",
        description="Verify a bundle and show its groups (as ranges of the calibrated sampler's steps and of "
        "training timesteps), bits, profile, float nodes, files and sizes.",
    )
    i.add_argument("bundle", help="bundle directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument(
        "--plots",
        metavar="DIR",
        help="also write group_map.png, (searched bundles) sigma_evolution.png and (with PTQD statistics) ptqd.png",
    )
    i.set_defaults(func=_info)

    lt = sub.add_parser(
        "lint",
        help="check a bundle's graphs against a target's quantization rules",
        description="Check every group graph of a bundle against the documented rules of an export target "
        "(trt: int8 symmetric Q/DQ with zero point 0, constant scales, per-channel weights on axis 0 (ConvTranspose "
        "1), Q/DQ on every Conv/Gemm/MatMul input and on residual-add inputs, a strongly typed FP16/BF16 graph; "
        "ort-cpu: uint8 activations, a Q on every Conv output) and name each violating node. Exits 1 on violations.",
    )
    lt.add_argument("bundle", help="bundle directory")
    lt.add_argument("--target", help="rules to check: trt, trt-bf16, trt-fp32 or ort-cpu (default: the bundle's)")
    lt.add_argument("--json", action="store_true", help="machine-readable report")
    lt.set_defaults(func=_lint)

    bd = sub.add_parser(
        "build",
        help="build TensorRT engines for a bundle",
        description="Build one TensorRT plan per group graph of a bundle compiled with --target trt (strongly "
        "typed network, one optimization profile over the batch, a timing cache shared by the group builds) into "
        "BUNDLE/engines/trt, and fail when a Q/DQ-annotated layer runs in float. Needs TensorRT and an NVIDIA GPU.",
    )
    bd.add_argument("bundle", help="bundle directory (compiled with --target trt)")
    bd.add_argument("--backend", default="trt", choices=["trt"], help="engine backend (default trt)")
    bd.add_argument("--batch-sizes", metavar="B1,B2", help="engine-call batches the profile spans, increasing; with "
                    "guidance an engine call holds twice the sampling batch (default 1,16,32)")  # fmt: skip
    bd.add_argument("--opt-batch", type=int, help="batch the profile is tuned for (default: the middle entry)")
    bd.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace in MiB (default 4096)")
    bd.add_argument("--timing-cache", metavar="FILE", help="timing cache to start from (default: the bundle's own)")
    bd.add_argument("--verify-int8", action=argparse.BooleanOptionalAction, default=True,
                    help="fail the build when a quantized layer falls back to float (default: on)")  # fmt: skip
    bd.add_argument("--json", action="store_true", help="print the build report as JSON")
    bd.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    bd.set_defaults(func=_build)

    d = sub.add_parser(
        "demo",
        help="compile, sample and compare a model end to end",
        description="On the shipped reference model: compile a W8A8 bundle with APQ-DM timestep groups and "
        "PTQD statistics, sample it (PTQD corrections on) and the full-precision model (FP32 ONNX Runtime) with "
        "identical seeds, and print per-step latency, FD, accuracy and PSNR in one table; writes samples, "
        "comparison.png and report.json.",
    )
    d.add_argument("-o", "--output", default="dqc-demo", help="output directory (default dqc-demo)")
    d.add_argument("-n", type=int, default=200, help="samples per engine, labels cycling 0..9 (default 200)")
    d.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    d.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    d.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model card's)")
    d.add_argument("--groups", type=int, default=8, help="APQ-DM timestep groups (default 8; 1: one scale set)")
    d.add_argument("--group-epochs", type=int, default=4, help="group search epochs (default 4)")
    d.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories (default 32)")
    d.add_argument("--ptqd-samples", type=int, default=256,
                   help="trajectories for the PTQD statistics (default 256; 0: no PTQD)")  # fmt: skip
    d.add_argument("--seed", type=int, default=0, help="noise seed, shared by both engines (default 0)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    e = sub.add_parser(
        "eval",
        help="FD, accuracy and PSNR of a sample file",
        description="Judge samples of the digits reference model (or any 1x8x8 model in [-1, 1]) with the "
        "shipped classifier: Fréchet distance of its penultimate features against the 360 held-out real "
        "digits, accuracy against the requested labels, and PSNR/MSE against a reference file drawn from "
        "the same seeds. FD is biased at small N: compare only equal N and seeds.",
    )
    e.add_argument("samples", help=".npz from dqc sample (arrays: samples, optional labels)")
    e.add_argument("--reference", metavar="REF.npz", help="samples from the same seeds (e.g. full precision)")
    e.add_argument("--labels", help="requested labels (int or comma list, cycled); default: the file's labels")
    e.add_argument("--json", metavar="OUT.json", help="write the report as JSON")
    e.add_argument("--classifier", help="classifier weights (default: the one shipped with the reference model)")
    e.add_argument(
        "--fid-inception",
        action="store_true",
        help="also standard FID with pytorch-fid's Inception-v3, if its weights are local",
    )
    e.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid weights file (pt_inception-2015-12-05)")
    e.set_defaults(func=_eval)

    t = sub.add_parser(
        "train-reference",
        help="train the reference digits diffusion model and classifier",
        description="Train the class-conditional DDPM (EMA weights, save_pretrained layout) and the "
        "digits classifier on the scikit-learn digits training split, seeded, with a loss log. Resumes "
        "from OUTPUT/checkpoint.pt. The shipped model came from the defaults.",
    )
    t.add_argument("-o", "--output", required=True, help="output directory")
    t.add_argument("--part", default="all", choices=["all", "diffusion", "classifier"])
    t.add_argument("--steps", type=int, default=8000, help="diffusion training steps (default 8000)")
    t.add_argument("--batch-size", type=int, default=128, help="diffusion batch size (default 128)")
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_reference)

    b = sub.add_parser(
        "bench",
        help="speed and memory against FP32 and the peers (ORT quantize_static, OpenVINO, OpenVINO + NNCF), or "
        "quality tables (--methods, ...)",
        description="Speed (default): per model (the shipped reference model and the CIFAR-10-shaped UNet with "
        "random weights), compile our W8A8 bundle with one scale set (G = 1) and with 8 timestep groups (G = 8) and "
        "run each on ONNX Runtime and on OpenVINO (-ov); beside them the FP32 graph on ONNX Runtime (fp32) and on "
        "OpenVINO with its default precision hint (ov-fp32, bf16 where the CPU has it), and the peers on the same "
        "calibration inputs: ONNX Runtime's quantize_static (ort-static) and OpenVINO + NNCF INT8 (ov-nncf; "
        "OpenVINO rows need openvino, the NNCF row nncf). Measure per-step latency (median, spread) at each batch "
        "with all engines interleaved in one process, resident memory of each engine in a fresh process, the whole "
        "100-step sampling loop, ORT's optimized op counts, --profile: per-op time on each engine, and (reference "
        "model) every engine's sample quality; print speed-ups against FP32 and each peer, our best engine's among "
        "them, and write OUT/bench.json (with the CPU's int8/bf16 flags, library versions and thread settings) "
        "and OUT/bench.md. --quick: the tiny model, a smoke run. "
        "Quality (--methods): for each method and bit-width compile, sample N images on ONNX Runtime with "
        "the full-precision row's seeds, and report FD, accuracy, PSNR vs FP and calibration time in "
        "OUT/table.md, OUT/table.json and the plot OUT/fd_vs_bits.png; finished cells in OUT are reused.",
    )
    b.add_argument("model", nargs="?", help=MODEL_HELP + " (speed: default reference and cifar10; with --methods: "
                   "reference; with --groups-vs / --ptqd-checks: a bundle)")  # fmt: skip
    b.add_argument("--models", metavar="M1,M2", help="speed: models to measure: reference, cifar10 (35.7 M, "
                   "random weights), tiny or a model directory (default reference,cifar10)")  # fmt: skip
    b.add_argument("--batches", default="1,8", help="speed: batch sizes (default 1,8)")
    b.add_argument("--quick", action="store_true", help="speed: a smoke run on the tiny model (batch 1, 3 reps)")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="speed: also measure resident memory, one fresh process per engine (default: on)")  # fmt: skip
    b.add_argument("--profile", action="store_true", help="speed: also ONNX Runtime's profiler per engine and batch: "
                   "kernel time by op type (where the time goes)")  # fmt: skip
    b.add_argument("--batch", type=int, default=1, help="--groups-vs: batch size (default 1)")
    b.add_argument("--reps", type=int, default=20, help="interleaved timed runs per engine (default 20)")
    b.add_argument("--json", metavar="FILE", help="--groups-vs / --ptqd-checks: write the report as JSON")
    b.add_argument(
        "--groups-vs",
        metavar="BUNDLE1",
        help="group costs (MODEL is then a multi-group bundle): disk and resident memory against the bundle "
        "BUNDLE1 (e.g. its G = 1 counterpart), per-step latency with group switching against one engine",
    )
    q = b.add_argument_group("quality table (--methods)")
    q.add_argument("--methods", metavar="M1,M2", help="methods to compare, e.g. naive,ptq4dm,qdiffusion")
    q.add_argument("--bits", default="W8A8,W6A6,W4A8,W4A4", help="bit-widths (default W8A8,W6A6,W4A8,W4A4)")
    q.add_argument("--out", help="output directory (--methods: one sub-directory per cell, default method_table; "
                   "--ptqd-ablation: default ptqd_ablation; speed: where bench.json and bench.md go)")  # fmt: skip
    q.add_argument("-n", type=int, default=500, help="samples per cell (default 500)")
    q.add_argument("--backend", default="ort", choices=["ort", "openvino"], help="what every cell's samples run "
                   "on (default ort; one backend for all cells, so that they compare calibrations only)")  # fmt: skip
    q.add_argument("--steps", type=int, default=100, help="DDIM steps, calibration and sampling (default 100)")
    q.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    q.add_argument("--seed", type=int, default=0, help="sampling and calibration seed (default 0)")
    q.add_argument("--sample-batch", type=int, default=250, help="sampling batch (default 250)")
    q.add_argument("--adaround-iters", type=int, help="override the presets' reconstruction iterations per block")
    q.add_argument("--act-iters", type=int, help="override the presets' LSQ activation iterations per block")
    q.add_argument("--recon-batch", type=int, help="override the reconstruction batch (default 32)")
    q.add_argument("--calib-samples", type=int, help="override the calibration trajectories (default 64)")
    q.add_argument("--calib-timesteps", type=int, help="override the calibration timesteps (default 20)")
    q.add_argument("--groups", metavar="G1,G2", help="APQ-DM group counts to compare, e.g. 1,4,8,16,per-step")
    q.add_argument("--group-epochs", type=int, help="override the group search epochs (default 10)")
    _objective_flags(q)
    q.add_argument("--timesteps", metavar="S1,S2", help="calibration timestep strategies, e.g. random,normal,active")
    q.add_argument(
        "--calib-sizes",
        metavar="N1,N2",
        help="calibration set sizes (inputs = --calib-samples × timesteps or rounds), e.g. 128,256,512,1024",
    )
    q.add_argument(
        "--fresh-trajectories",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record each calibrated step from its own trajectories (active always does)",
    )
    q.add_argument(
        "--activation-error", action="store_true", help="also measure C-Error / G-Error (APQ-DM Table 1) per cell"
    )
    k = b.add_argument_group("PTQD statistical checks (--ptqd-checks; -n and --seed as above)")
    k.add_argument(
        "--ptqd-checks",
        action="store_true",
        help="on a bundle with PTQD statistics: per step, is the residual noise Gaussian (scipy normaltest on "
        "1000 random elements), its skew and kurtosis, the sign of k_t, and Pearson's R of the error with ε_FP",
    )
    k.add_argument("--fp", metavar="MODEL", help="the bundle's full-precision model (default: its recorded source)")
    a = b.add_argument_group("PTQD ablation (--ptqd-ablation; --bits, -n, --steps, --seed, --out, overrides above)")
    a.add_argument(
        "--ptqd-ablation",
        action="store_true",
        help="per bit-width and sampler, compile with PTQD statistics and sample baseline, +CNC, +CNC+VSC and "
        "+CNC+VSC+BC (PTQD supplement Table B) with the full-precision seeds; FD, accuracy, PSNR vs FP, host "
        "correction time; writes OUT/table.md and OUT/table.json",
    )
    a.add_argument("--samplers", default="ddim-eta1,ddpm,ddim-eta0",
                   help="deployment samplers: ddpm or ddim-eta<eta> (default ddim-eta1,ddpm,ddim-eta0)")  # fmt: skip
    a.add_argument("--method", default="qdiffusion", help="base calibration (default qdiffusion)")
    a.add_argument("--mixed-bits", metavar="BITS", help="also compare step-aware mixed precision with this cheaper "
                   "precision (first --bits and first sampler): PTQD's switch vs all-high vs all-low")  # fmt: skip
    a.add_argument("--ptqd-samples", type=int, default=512, help="trajectories for the statistics (default 512)")
    a.add_argument("--reuse-calibration", action="store_true", help="samplers after the first reuse its calibrated "
                   "bundles and only gather their own PTQD statistics (no second calibration)")  # fmt: skip
    a.add_argument(
        "--regather-samples",
        type=int,
        metavar="N",
        help="with --reuse-calibration: trajectories for the regathered statistics (default --ptqd-samples)",
    )
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except DqcError as e:
        print(f"dqc {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dqc {args.verb}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
