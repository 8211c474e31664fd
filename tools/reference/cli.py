"""`dqc demo`, `eval` and `train-reference`: the shipped reference model, its metrics and its training."""

from __future__ import annotations

import argparse


def _demo(a: argparse.Namespace) -> None:
    from tools.reference.demo import run_demo

    run_demo(a.output, n=a.n, steps=a.steps, eta=a.eta, guidance=a.guidance, calib_samples=a.calib_samples,
             groups=a.groups, group_epochs=a.group_epochs, ptqd_samples=a.ptqd_samples, seed=a.seed,
             progress=not a.quiet, text=a.text)  # fmt: skip


def _eval(a: argparse.Namespace) -> None:
    from tools.deploy.pipeline import check_output_file, write_json
    from tools.reference.metrics import evaluate

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
    from tools.reference.train import (
        ClassifierTrainConfig,
        DiffusionTrainConfig,
        train_classifier,
        train_diffusion,
    )

    if a.text or a.dit:
        from runtime.errors import ConfigError
        from tools.reference.train import DIT_TRAIN, TEXT_TRAIN

        if a.text and a.dit:
            raise ConfigError("--text and --dit train different models; pick one")
        flag, kind, defaults = ("--dit", "dit", DIT_TRAIN) if a.dit else ("--text", "text", TEXT_TRAIN)
        if a.part != "all":
            raise ConfigError(f"--part is for the class model; {flag} trains its model only (it is judged by the "
                              "class model's classifier)")  # fmt: skip
        cfg = DiffusionTrainConfig(steps=a.steps or defaults.steps, batch_size=a.batch_size or defaults.batch_size,
                                   lr=a.lr, seed=a.seed, device=a.device)  # fmt: skip
        out = train_diffusion(a.output, cfg, progress=not a.quiet, kind=kind)
        parts = "transformer/, scheduler/" if a.dit else "unet/, text_encoder/, tokenizer/, scheduler/"
        print(f"{'flow-matching DiT' if a.dit else 'text pipeline'}: {out} ({parts}; EMA weights); "
              f"loss log {out}/train_log.jsonl")  # fmt: skip
        return
    if a.part in ("all", "classifier"):
        meta = train_classifier(a.output, ClassifierTrainConfig(seed=a.seed, device=a.device), progress=not a.quiet)
        acc = meta["test_accuracy"]
        print(f"classifier: {acc:.2%} on the held-out test split -> {a.output}/classifier.safetensors")
    if a.part in ("all", "diffusion"):
        cfg = DiffusionTrainConfig(steps=a.steps or DiffusionTrainConfig.steps,
                                   batch_size=a.batch_size or DiffusionTrainConfig.batch_size, lr=a.lr, seed=a.seed,
                                   device=a.device)  # fmt: skip
        out = train_diffusion(a.output, cfg, progress=not a.quiet)
        print(f"diffusion model: {out}/unet, {out}/scheduler (EMA weights); loss log {out}/train_log.jsonl")


def register(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="compile, sample and compare a model end to end",
        description="On the shipped reference model: compile a W8A8 bundle with APQ-DM timestep groups and "
        "PTQD statistics, sample it (PTQD corrections on) and the full-precision model (FP32 ONNX Runtime) with "
        "identical seeds, and print per-step latency, FD, accuracy and PSNR in one table; writes samples, "
        "comparison.png and report.json. With --text, the same on the shipped text-to-image pipeline "
        "(reference-text): calibrated on its training prompts, sampled on the held-out prompts.",
    )
    d.add_argument("-o", "--output", default="dqc-demo", help="output directory (default dqc-demo)")
    d.add_argument("--text", action="store_true", help="the text-to-image pipeline reference-text instead")
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
        "the same seeds. The requested digits are the file's labels or, for a text pipeline's samples, parsed "
        "from its prompts (a digit word or numeral: 'a handwritten 7', 'the digit seven'). FD is biased at "
        "small N: compare only equal N and seeds.",
    )
    e.add_argument("samples", help=".npz from dqc sample (arrays: samples, optional labels)")
    e.add_argument("--reference", metavar="REF.npz", help="samples from the same seeds (e.g. full precision)")
    e.add_argument("--labels", help="requested labels (int or comma list, cycled); default: the file's labels, "
                   "or the digits its prompts name")  # fmt: skip
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
        help="train the reference digits diffusion models and classifier",
        description="Train the class-conditional DDPM (EMA weights, save_pretrained layout) and the "
        "digits classifier on the scikit-learn digits training split, seeded, with a loss log; with --text, "
        "the text-to-image pipeline `reference-text` instead (UNet2DConditionModel and a CLIP text encoder "
        "trained together on prompts from the training templates, its tokenizer built from them); with --dit, "
        "the diffusion transformer `reference-dit` (a class-conditional DiTTransformer2DModel trained with flow "
        "matching, sampled with the Euler flow solver). Resumes from OUTPUT/checkpoint.pt. The shipped models came "
        "from the defaults.",
    )
    t.add_argument("-o", "--output", required=True, help="output directory")
    t.add_argument("--text", action="store_true", help="train the text pipeline (reference-text)")
    t.add_argument("--dit", action="store_true", help="train the flow-matching diffusion transformer (reference-dit)")
    t.add_argument("--part", default="all", choices=["all", "diffusion", "classifier"])
    t.add_argument("--steps", type=int, help="diffusion training steps (default 8000; --text 6000; --dit 8000)")
    t.add_argument("--batch-size", type=int, help="diffusion batch size (default 128; --text 96)")
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_reference)
