"""`dqc regress run|update` and `dqc diff`: latency/quality regression verdicts against committed baselines, and
what differs between two bundles."""

from __future__ import annotations

import argparse
import json
import sys

from tools.args import csv_list


def _check_outputs(a: argparse.Namespace) -> None:
    from tools.deploy.pipeline import check_output_file

    for flag in ("json", "junit", "markdown"):
        check_output_file(getattr(a, flag, None), f"--{flag}")


def _run(a: argparse.Namespace) -> int:
    from tools.deploy.pipeline import write_json, write_text
    from tools.regress.run import run_spec
    from tools.regress.verdict import format_markdown, format_text, junit_xml

    _check_outputs(a)
    results = run_spec(a.spec, only=csv_list(a.only), cache=a.cache, progress=not a.quiet)
    print(format_text(results))
    if a.json:
        write_json(a.json, results)
    if a.junit:
        write_text(a.junit, junit_xml(results))
    if a.markdown:
        write_text(a.markdown, format_markdown(results))
    return 1 if results["regressed"] else 0


def _update(a: argparse.Namespace) -> None:
    from tools.deploy.pipeline import write_json
    from tools.regress.run import update_spec

    _check_outputs(a)
    diff, results = update_spec(a.spec, only=csv_list(a.only), dry_run=a.dry_run, cache=a.cache,
                                progress=not a.quiet)  # fmt: skip
    print(diff or f"{a.spec}: the baselines are unchanged")
    if diff:
        print(f"{'would rewrite' if a.dry_run else 'rewrote'} the baselines of {a.spec}")
    if a.json:
        write_json(a.json, results)


def _diff(a: argparse.Namespace) -> None:
    from tools.regress.diff import diff_bundles, format_diff

    report = diff_bundles(a.a, a.b, layers=not a.no_layers, n=a.n, seed=a.seed)
    if a.json:
        json.dump(report, sys.stdout, indent=1, default=float)
        print()
    else:
        print(format_diff(report, top=a.top))


SPEC_HELP = (
    "SPEC is a TOML file: [settings] (cache = directory for bundles, FP samples and runs; latency_rounds, "
    "latency_reps, memory_rounds, bootstrap), then one [cases.NAME] table per case: model = reference | tiny | a "
    "model directory (or bundle = a ready bundle), [cases.NAME.compile] (method, bits, groups, calib_samples, "
    "calib_timesteps, ptqd_samples, ...), [cases.NAME.sample] (n, steps, eta, guidance, seed, backend, "
    "latency_batch) and [cases.NAME.metrics], one inline table per metric: latency_ratio and memory_ratio (the "
    "bundle over the FP32 graph on ONNX Runtime, measured in the same run), fd, accuracy, psnr (vs the FP model's "
    "samples from the same held-out seeds), e.g. psnr = { baseline = 38.1, noise = 0.4, n = 64, seed = 0, "
    'steps = 20, eta = 0.0, guidance = 1.5, tolerance = "auto" }. tolerance: a number in the metric\'s unit, or '
    "auto: 1.96 standard deviations of the difference, from this run's and the baseline's noise (latency: spread "
    "over interleaved rounds; FD, PSNR: bootstrap over the samples; accuracy: binomial). Bundles are reused while "
    "the model, options and the compiler's source hash the same; FP samples are cached by a hash of what made them."
)


def register(sub) -> None:
    r = sub.add_parser(
        "regress",
        help="latency/quality regression tests against committed baselines",
        description="Compile (or reuse) each case's bundle, measure it, and judge each metric against its baseline: "
        "pass, regressed, improved, or inconclusive (the change cannot be told from this run's noise). " + SPEC_HELP,
    )
    rs = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = rs.add_parser("run", help="measure and judge; exit 1 on a regression",
                        description="Measure every case of SPEC and print the verdict per metric; exit 1 when a "
                        "metric regressed. " + SPEC_HELP)  # fmt: skip
    upd = rs.add_parser("update", help="re-measure the baselines and rewrite them in SPEC, showing the diff",
                        description="Measure every case of SPEC, print the diff of the spec file, and rewrite the "
                        "metrics' baselines (value, noise, the conditions they were measured under; tolerances are "
                        "kept). " + SPEC_HELP)  # fmt: skip
    for p in (run, upd):
        p.add_argument("spec", help="the spec file (TOML)")
        p.add_argument("--only", metavar="CASE1,CASE2", help="measure only these cases")
        p.add_argument("--cache", metavar="DIR", help="bundles, FP samples and runs (default: the spec's "
                       "settings.cache, else ./.dqc-regress)")  # fmt: skip
        p.add_argument("--json", metavar="OUT.json", help="write the whole run (values, noise, verdicts) as JSON")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument("--junit", metavar="OUT.xml", help="write a JUnit XML report (a regression is a failure)")
    run.add_argument("--markdown", metavar="OUT.md", help="write the verdict table as markdown")
    run.set_defaults(func=_run)
    upd.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    upd.set_defaults(func=_update)

    d = sub.add_parser(
        "diff",
        help="what differs between two bundles, down to the layer that moved",
        description="Compare two bundles of one model: manifest fields, scales and zero points per quantization "
        "point and group, the group and PTQD tables, and (unless --no-layers) each quantized layer's error of B "
        "against A on shared seeded inputs (ONNX Runtime, one timestep per group), ranked by the error the layer "
        "adds (output error minus input error), so that a regression can be traced to the layer that moved.",
    )
    d.add_argument("a", help="bundle A (the baseline)")
    d.add_argument("b", help="bundle B")
    d.add_argument("--no-layers", action="store_true", help="skip the per-layer error (no engines run)")
    d.add_argument("-n", type=int, default=4, help="seeded inputs per timestep for the per-layer error (default 4)")
    d.add_argument("--seed", type=int, default=0, help="seed of the shared inputs (default 0)")
    d.add_argument("--top", type=int, default=15, help="rows shown per section (default 15; --json: all)")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.set_defaults(func=_diff)
