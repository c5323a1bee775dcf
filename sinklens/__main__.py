"""Command line: ``python -m sinklens run [--model NAME] [--params FILE] [-p key=value ...] [--only 01 ...]
[--out DIR] [--ci]`` runs the notebook series (see :mod:`sinklens.runner`)."""

from __future__ import annotations

import argparse
import sys

from . import runner
from .errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sinklens", description="sinklens command line")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the notebook series into a new run folder",
        description="Execute every notebooks/[0-9][0-9]_*.ipynb in order into <out>/<YYYYmmdd-HHMMSS>-<model>/, "
                    "with a manifest.json, and point <out>/latest at it. Exit codes: 0 ok, 1 a notebook failed, "
                    "2 bad arguments (nothing was run).")
    run.add_argument("--model", help=f"model name, checkpoint folder or hub id (default {runner.DEFAULT_MODEL})")
    run.add_argument("--params", metavar="FILE", help="YAML file of parameter values {name: value}")
    run.add_argument("-p", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                     help="set a notebook parameter (repeatable); parsed to the type the notebooks declare")
    run.add_argument("--only", nargs="+", action="extend", metavar="NB",
                     help="run only these notebooks (number such as 01, or name)")
    run.add_argument("--out", metavar="DIR", help="folder that receives run folders and the latest link (default runs/)")
    run.add_argument("--ci", action="store_true",
                     help=f"small parameters for a quick check: {', '.join(f'{k}={v}' for k, v in runner.CI_PARAMS.items())}")
    run.add_argument("--notebooks", metavar="DIR", help="folder of the notebook series (default notebooks/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        overrides = runner.parse_assignments(args.assignments)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return runner.EXIT_INPUT
    return runner.run(notebooks_dir=args.notebooks, model=args.model, overrides=overrides, params_file=args.params,
                      only=args.only, ci=args.ci, out=args.out, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
