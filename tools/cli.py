"""The `dqc` command line: one parser; each verb lives beside the code it drives (`tools/<purpose>/cli.py`) and
registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from runtime.errors import DqcError

# the verbs in the order `dqc --help` lists them
VERB_MODULES = ("tools.deploy.cli", "tools.reference.cli", "tools.bench.cli", "tools.regress.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dqc",
        description="Diffusion quantization compiler: calibrate a diffusers "
        "model, export quantized ONNX bundles, and sample them.",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
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
