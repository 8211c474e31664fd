"""`dqc compile`, `sample`, `info`, `lint` and `build`: the verbs that make a bundle and run it."""

from __future__ import annotations

import argparse
import json

from runtime.bundle import BACKENDS
from runtime.openvino import DEFAULT_HINT, PRECISION_HINTS
from tools.args import MODEL_HELP, OBJECTIVE_KEYS, csv_list, default_device, int_list, objective_flags


def _compile(a: argparse.Namespace) -> None:
    from calibration.config import CalibrationConfig
    from tools.deploy.pipeline import compile_model

    cfg = CalibrationConfig.for_method(
        a.method,
        bits=a.bits,
        target=a.target,
        sampler=a.sampler or "ddim",
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
        device=a.device or default_device(),
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
        calib_prompts=a.calib_prompts,
        text_encoder=a.text_encoder,
        w4_linear=a.w4_linear,
        sampler_given=a.sampler is not None,
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


def _engine_words(engine: dict) -> str:
    names = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "trt": "TensorRT", "torch": "torch"}
    words = f"{names.get(engine.get('backend'), engine.get('backend'))} {engine.get('version', '')}".strip()
    return words + (f" ({engine['precision_hint']} float parts)" if "precision_hint" in engine else "")


def _sample(a: argparse.Namespace) -> None:
    from tools.deploy.pipeline import sample_to_file

    run = sample_to_file(
        a.source,
        a.output,
        n=a.n,
        steps=a.steps,
        eta=a.eta,
        sampler=a.sampler,
        seed=a.seed,
        class_label=a.class_label,
        prompts=a.prompt,
        prompts_file=a.prompts_file,
        negative_prompt=a.negative_prompt,
        guidance=a.guidance,
        batch_size=a.batch_size,
        png=a.png,
        scheduler=a.scheduler,
        ptqd=() if a.no_ptqd else tuple(csv_list(a.ptqd) or ()),
        precision=a.precision,
        switch_t=a.switch_t,
        backend=a.backend,
        hint=a.precision_hint,
        ort_engines=a.ort_engines,
        kv_once=a.kv_once,
        progress=not a.quiet,
    )
    for prompt in run.truncated:
        print(f"prompt truncated to the tokenizer's limit: {prompt!r}")
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
        from tools.deploy.pipeline import precision_split

        split = precision_split(run.step_precisions)
        runs = ", ".join(f"{r['bits']} steps {r['step_from']}–{r['step_to']}" for r in split)
        print(f"precisions: {runs}")


def _info(a: argparse.Namespace) -> None:
    from tools.deploy.pipeline import bundle_info

    info = bundle_info(a.bundle)
    if a.plots:
        from tools.deploy.pipeline import group_plots

        for path in group_plots(a.bundle, a.plots):
            print(f"wrote {path}")
    if a.json:
        print(json.dumps(info, indent=1))
        return
    print(f"bundle {info['bundle']}  (format v{info['format_version']}, target {info['target']}, bits {info['bits']})")
    print(f"model  {info['model']['class']}  weights sha256 {info['model']['weight_sha256'][:16]}…")
    print(f"inputs {', '.join(info['inputs'])}")
    parts = info["components"]
    for name in ("text_encoder", "tokenizer", "vae_decoder"):
        if name in parts:
            entry = parts[name]
            where = entry.get("file") or f"{entry.get('folder')}/"
            print(
                f"component {name}: {entry.get('class')} ({where}"
                + (f", {entry['precision']})" if "precision" in entry else ")")
            )
    if parts.get("calibration_prompts"):
        print(f"calibration prompts: {len(parts['calibration_prompts'])}")
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
    print(f"quantized nodes: {info['quantized_nodes']} ({info['shared_input_qdq']} reading another layer's input "
          f"Q/DQ); left in float: {len(info['float_nodes'])}")  # fmt: skip
    w4 = info.get("w4_linear") or {}
    if "MatMulNBits" in w4:
        print(f"4-bit Linear weights packed for ONNX Runtime's MatMulNBits: {w4['MatMulNBits']} layers")
    if "INT4" in w4:
        print(f"4-bit Linear weights as TensorRT INT4 weight-only layers (float activations): {w4['INT4']} layers")
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
        for ids, found in report.get("single_engines", {}).items():
            n = sum(len(v) for v in found.values())
            print(f"one engine for groups {ids}: {'no violations' if not n else f'{n} violations'}")
            for where, violations in found.items():
                for v in violations:
                    print(f"  {'graph' if where == 'graph' else f'as group {where}'}  [{v['rule']}] {v['node']}: "
                          f"{v['message']}")  # fmt: skip
        for ids, verdict in report.get("trt_refit", {}).items():
            print(f"TensorRT, groups {ids}: {verdict}")
        print(f"{report['violations']} violations" if report["violations"] else "no violations")
    return 1 if report["violations"] else 0


def _build(a: argparse.Namespace) -> None:
    from tools.deploy.build import run_build

    sizes = int_list(a.batch_sizes, "--batch-sizes") or None
    report = run_build(a.bundle, backend=a.backend, **({"batch_sizes": sizes} if sizes else {}), opt_batch=a.opt_batch,
                       workspace_mb=a.workspace_mb, timing_cache=a.timing_cache, verify_int8=a.verify_int8,
                       engines=a.trt_engines, progress=not a.quiet)  # fmt: skip
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        how = "refitted per group" if report["mode"] == "refit" else "one per group"
        print(f"built {report['plans']} TensorRT plans ({how}) for {len(report['groups'])} groups in "
              f"{a.bundle}/engines/trt (TensorRT {report['tensorrt_version']}, engine-call batch "
              f"{report['profile']['min']}-{report['profile']['max']})")  # fmt: skip


def register(sub) -> None:
    c = sub.add_parser(
        "compile",
        help="calibrate a model and export a quantized bundle",
        description="Calibrate a diffusers UNet2DModel on full-precision trajectories and export "
        "one Q/DQ ONNX graph per timestep group into a bundle directory.",
    )
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument("-o", "--output", required=True, help="bundle directory to create")
    c.add_argument("--scheduler", help="scheduler directory or scheduler_config.json (bare model directories)")
    c.add_argument("--calib-prompts", metavar="FILE", help="text-to-image pipelines: UTF-8 file, one calibration "
                   "prompt per line, cycled over the calibration trajectories (reference-text: its training "
                   "prompts unless given)")  # fmt: skip
    c.add_argument("--text-encoder", choices=["fp32", "w8a8"], default="fp32",
                   help="text-to-image pipelines: the bundled text encoder in float (default) or W8A8 (int8 "
                   "per-channel weights, uint8 activations, min-max ranges on the calibration prompts)")  # fmt: skip
    c.add_argument("--bits", default="W8A8", help="weight/activation bit-widths, e.g. W8A8 (default)")
    c.add_argument("--w4-linear", choices=["int8", "nbits", "nbits-int8", "int4"], default="int8",
                   help="4-bit weights: every Linear's weights on the 4-bit grid in int8 containers (int8, default: "
                   "the int8 kernels), or, on ort-cpu, packed two per byte for ONNX Runtime's MatMulNBits, "
                   "multiplying in float32 (nbits: exact) or on activations requantized to int8 per block "
                   "(nbits-int8), or, on trt targets, as INT4 tensors for TensorRT's weight-only INT4 GEMMs, whose "
                   "activations stay in the graph's float type (int4)")  # fmt: skip
    c.add_argument(
        "--target",
        default="ort-cpu",
        choices=["ort-cpu", "trt", "trt-bf16", "trt-fp32"],
        help="export profile: ort-cpu (ONNX Runtime integer kernels, default); trt (TensorRT explicit quantization, "
        "strongly typed FP16; then dqc build), trt-bf16, trt-fp32 (the trt placement in FP32, runs on ORT too)",
    )
    c.add_argument("--sampler", choices=["ddim", "ddpm", "euler"],
                   help="deployment sampler (default ddim; euler, the only one, for flow-matching models)")  # fmt: skip
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
        choices=["lp", "naive", "qdiffusion", "ptq4dm", "gac", "apqdm"],
        help="calibration preset (explicit flags override it): lp (default: per-channel L_p weight-range "
        "search, min-max activations, round-to-nearest); naive (min-max ranges, round-to-nearest: what ONNX "
        "Runtime's static quantizer does); qdiffusion (uniform timesteps, BRECQ block reconstruction with "
        "AdaRound, LSQ activation steps, shortcut split); ptq4dm (normal timesteps, the same reconstruction); "
        "gac (qdiffusion with each input's loss weighted by sample weights learned per block to align the "
        "timestep groups' gradients: gradient-aligned calibration, --gac-* flags); "
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
    objective_flags(c)
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
    s.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], help="default: the bundle's calibrated sampler, "
                   "euler for a flow-matching model directory (its Euler flow solver), else ddim")  # fmt: skip
    s.add_argument("--eta", type=float, help="DDIM eta (default: calibrated, else 0)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--class-label", help="label or comma list for class-conditional models (default: cycle classes)")
    s.add_argument("--prompt", action="append", help="text bundles and pipeline directories: a prompt (repeat for "
                   "several; cycled over -n)")  # fmt: skip
    s.add_argument("--prompts-file", metavar="FILE", help="text bundles: UTF-8 file, one prompt per line")
    s.add_argument("--negative-prompt", help="text bundles: the unconditional side of guidance (default: empty)")
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
    s.add_argument("--ort-engines", default="one", choices=["one", "per-group"],
                   help="ONNX Runtime and OpenVINO, bundles with several groups: one engine for all groups of a "
                   "precision (one session / one compiled model, the weights packed once; default) or one per group "
                   "(each with its own packed weights: more memory, and on the models measured in docs/RESULTS.md "
                   "faster per step)")  # fmt: skip
    s.add_argument("--kv-once", action="store_true",
                   help="text bundles: compute the cross-attention keys and values (and a transformer's caption "
                   "projection) once per request and group instead of at every step; same images bit for bit, "
                   "measured no faster on the models in docs/RESULTS.md, so off by default")  # fmt: skip
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
        "ort-cpu: uint8 activations, a Q on every Conv output; both: one Q/DQ per tensor, however many layers read "
        "it) and name each violating node. Exits 1 on violations.",
    )
    lt.add_argument("bundle", help="bundle directory")
    lt.add_argument("--target", help="rules to check: trt, trt-bf16, trt-fp32 or ort-cpu (default: the bundle's)")
    lt.add_argument("--json", action="store_true", help="machine-readable report")
    lt.set_defaults(func=_lint)

    bd = sub.add_parser(
        "build",
        help="build TensorRT engines for a bundle",
        description="Build TensorRT plans for a bundle compiled with --target trt (strongly typed network, one "
        "optimization profile over the batch, a timing cache shared by the builds) into BUNDLE/engines/trt: one "
        "plan per precision whose Q/DQ scales are refitted at each group switch, or one plan per group "
        "(--trt-engines); fail when a Q/DQ-annotated layer runs in float. Needs TensorRT and an NVIDIA GPU.",
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
    bd.add_argument("--trt-engines", choices=["auto", "refit", "per-group"], default="auto",
                    help="refit: one plan per precision whose Q/DQ scales are rewritten at each group switch (one "
                    "copy of the weights on the GPU; checked at build); per-group: a plan per group; auto (default): "
                    "refit where a precision's groups differ only in Q/DQ scales, else per-group")  # fmt: skip
    bd.add_argument("--json", action="store_true", help="print the build report as JSON")
    bd.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    bd.set_defaults(func=_build)
