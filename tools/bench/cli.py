"""`dqc bench`: speed and memory against the peers, and the quality tables."""

from __future__ import annotations

import argparse

from runtime.errors import ConfigError
from tools.args import MODEL_HELP, calibration_overrides, csv_list, int_list, objective_flags


def _bench(a: argparse.Namespace) -> None:
    if a.ptqd_ablation:
        from tools.bench.ptqd_ablation import run_ptqd_ablation

        run_ptqd_ablation(
            a.model or "reference",
            bits=csv_list(a.bits),
            samplers=csv_list(a.samplers),
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
            calibration=calibration_overrides(a),
            backend=a.backend,
            progress=not a.quiet,
        )
        return
    if a.ptqd_checks:
        from tools.bench.ptqd_checks import run_ptqd_checks

        if not a.model:
            raise ConfigError("--ptqd-checks: give the bundle as MODEL")
        run_ptqd_checks(a.model, model_dir=a.fp, n=a.n, seed=a.seed, json_out=a.json, progress=not a.quiet)
        return
    if a.groups_vs:
        from tools.bench.group_bench import run_group_bench

        if not a.model:
            raise ConfigError("--groups-vs: give the multi-group bundle as MODEL")
        run_group_bench(a.model, a.groups_vs, batch=a.batch, reps=a.reps, json_out=a.json, progress=not a.quiet)
        return
    if a.methods:
        from tools.bench.method_table import run_method_table

        run_method_table(
            a.model or "reference",
            methods=csv_list(a.methods),
            bits=csv_list(a.bits),
            out_dir=a.out or "method_table",
            n=a.n,
            steps=a.steps,
            eta=a.eta,
            seed=a.seed,
            batch_size=a.sample_batch,
            calibration=calibration_overrides(a)
            | dict(fresh_trajectories=a.fresh_trajectories, activation_error=a.activation_error or None),
            groups=csv_list(a.groups),
            timesteps=csv_list(a.timesteps),
            calib_sizes=[int(v) for v in csv_list(a.calib_sizes) or []] or None,
            backend=a.backend,
            ptqd_samples=a.ptqd_samples if a.with_ptqd else None,
            progress=not a.quiet,
        )
        return
    from tools.bench.speed import BenchPlan, run_bench

    if a.quick:
        import dataclasses

        plan = dataclasses.replace(BenchPlan.quick(), memory=a.memory, profile=a.profile, w4=a.w4,
                                   attention=bool(a.attention_products),
                                   groups=tuple(int_list(a.groups, "--groups")) if a.groups else (1, 8))  # fmt: skip
    else:
        models = tuple(csv_list(a.models) or ([a.model] if a.model else ["reference", "cifar10"]))
        batches = int_list(a.batches, "--batches")
        plan = BenchPlan(models=models, batches=batches, reps=a.reps, loop_steps=a.loop_steps, memory=a.memory,
                         profile=a.profile, w4=a.w4, attention=bool(a.attention_products),
                         groups=tuple(int_list(a.groups, "--groups")) if a.groups else (1, 8))  # fmt: skip
    run_bench(plan, out_dir=a.out, progress=not a.quiet)


def register(sub) -> None:
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
                   "random weights), tiny, dit-s2 / dit-xl2 (DiT-S/2- and DiT-XL/2-shaped transformers, 32x32x4 "
                   "latents, random weights), tiny-text / sd15 (text UNets: a tiny one and Stable Diffusion 1.5's, "
                   "32x32x4 latents, random weights, guidance 7.5 so batch 2 per sample) or a model directory "
                   "(default reference,cifar10)")  # fmt: skip
    b.add_argument("--w4", action="store_true", help="speed: also W4A8 bundles (G = 1) with the Linear weights in "
                   "int8 containers (dqc-W4) and packed for ONNX Runtime's MatMulNBits (dqc-W4-nbits, float32 "
                   "compute; -int8: int8 compute; -ov: on OpenVINO), with their sizes on disk")  # fmt: skip
    b.add_argument("--batches", default="1,8", help="speed: batch sizes (default 1,8)")
    b.add_argument("--quick", action="store_true", help="speed: a smoke run on the tiny model (batch 1, 3 reps)")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="speed: also measure resident memory, one fresh process per engine (default: on)")  # fmt: skip
    b.add_argument("--profile", action="store_true", help="speed: also ONNX Runtime's profiler per engine and batch: "
                   "kernel time by op type (where the time goes)")  # fmt: skip
    b.add_argument("--batch", type=int, default=1, help="--groups-vs: batch size (default 1)")
    b.add_argument("--reps", type=int, default=20, help="interleaved timed runs per engine (default 20)")
    b.add_argument("--loop-steps", type=int, default=100, help="speed: DDIM steps of the whole-loop timing and of "
                   "the per-step latency's timesteps (default 100; fewer keeps large models' runs short)")  # fmt: skip
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
    q.add_argument("--with-ptqd", action="store_true", help="compile every cell with PTQD statistics (--ptqd-samples "
                   "trajectories) and sample with its corrections on; cells get the suffix _ptqd, and one whose "
                   "cell without PTQD is in --out reuses that calibration")  # fmt: skip
    q.add_argument("--adaround-iters", type=int, help="override the presets' reconstruction iterations per block")
    q.add_argument("--act-iters", type=int, help="override the presets' LSQ activation iterations per block")
    q.add_argument("--recon-batch", type=int, help="override the reconstruction batch (default 32)")
    q.add_argument("--calib-samples", type=int, help="override the calibration trajectories (default 64)")
    q.add_argument("--calib-timesteps", type=int, help="override the calibration timesteps (default 20)")
    q.add_argument(
        "--groups",
        metavar="G1,G2",
        help="APQ-DM group counts to compare, e.g. 1,4,8,16,per-step; "
        "on the speed path, which of our bundles to build: 1, 8 or 1,8 (default; G = 8 on a "
        "DiT-XL/2-sized model does not fit in 24 GiB)",
    )
    q.add_argument("--group-epochs", type=int, help="override the group search epochs (default 10)")
    objective_flags(q)
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
