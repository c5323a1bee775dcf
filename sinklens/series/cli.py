"""Command line of the notebook series: ``python -m sinklens run | report | headline``.

- ``run [--model NAME] [--params FILE] [-p key=value ...] [--only 01 ...] [--out DIR] [--ci]``: the
  series into a new run folder (:mod:`sinklens.series.runner`).
- ``run --models A B C [--ray [ADDRESS]] ...``: one series per model (as Ray tasks with ``--ray``), then their
  cross-model report (:func:`sinklens.series.runner.run_models`).
- ``compare RUN_DIR... [--out DIR]``: the cross-model report of run folders (:mod:`sinklens.report.compare`).
- ``report RUN_DIR [--no-png]``: write a run folder's ``index.html`` (and missing PNGs) again
  (:mod:`sinklens.series.report`).
- ``headline [RUN_DIR] [--readme README.md]``: rewrite the README's headline block from a successful
  default run of the embedded model (default ``runs/latest``; :mod:`sinklens.series.headline`).

Exit codes: 0 ok, 1 a notebook failed, 2 bad input (one line on stderr; nothing was run or written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import InputError
from . import runner  # light: `run` checks its arguments before torch, pandas or papermill are imported
from .runner import RAY_INSTALL


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sinklens`` argument parser with its three commands."""
    parser = argparse.ArgumentParser(prog="python -m sinklens", description="sinklens command line")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the notebook series into a new run folder",
        description="Execute every notebooks/[0-9][0-9]_*.ipynb in order into <out>/<YYYYmmdd-HHMMSS>-<model>/, "
                    "with a manifest.json and the report index.html, and point <out>/latest at it. Exit codes: 0 ok, "
                    "1 a notebook failed, 2 bad arguments (nothing was run).")
    run.add_argument("--model", help=f"model name, checkpoint folder or hub id (default {runner.DEFAULT_MODEL})")
    run.add_argument("--models", nargs="+", metavar="MODEL",
                     help="several models: one series (run folder) each, then their cross-model report")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="with --models: run each series as a Ray task on the cluster at ADDRESS (host:port; none: "
                          f"a new local cluster). Needs Ray: {RAY_INSTALL}")
    run.add_argument("--params", metavar="FILE", help="YAML file of parameter values {name: value}")
    run.add_argument("-p", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                     help="set a notebook parameter (repeatable); parsed to the type the notebooks declare. The "
                          f"series probe ({', '.join(f'{k}={v}' for k, v in runner.SERIES_PARAMS.items())}) is "
                          "set this way for every notebook at once")
    run.add_argument("--only", nargs="+", action="extend", metavar="NB",
                     help="run only these notebooks (number such as 01, or name)")
    run.add_argument("--out", metavar="DIR",
                     help="folder that receives run folders and the latest link (default runs/ beside the "
                          "notebooks folder)")
    run.add_argument("--ci", action="store_true",
                     help="small parameters for a quick check: "
                          f"{', '.join(f'{k}={v}' for k, v in runner.CI_PARAMS.items())}")
    run.add_argument("--notebooks", metavar="DIR",
                     help="folder of the notebook series (default the notebooks/ folder of the sinklens checkout, "
                          "from any working directory)")
    compare = commands.add_parser(
        "compare", help="write the cross-model report of several run folders",
        description="Compare run folders (however they were made) side by side: sink rate, sink-specialized heads, "
                    "massive dims, sink rate against context length, retention of the best layer set.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    compare.add_argument("--out", metavar="DIR",
                         help="report folder (default <parent of the first run>/<YYYYmmdd-HHMMSS>-compare)")
    report = commands.add_parser("report", help="write the report index.html of an existing run folder again",
                                 description="Write index.html (and PNGs) for an existing run folder.")
    report.add_argument("run_dir", help="run folder, e.g. runs/latest")
    report.add_argument("--no-png", action="store_true", help="skip the PNG copies of the plotly figures")
    headline = commands.add_parser(
        "headline", help="rewrite the README's headline numbers from a default run",
        description="Rewrite the block between <!-- headline:start --> and <!-- headline:end --> of the README from "
                    "a successful default run (whole series, default parameters) of the embedded model.")
    headline.add_argument("run_dir", nargs="?", default="runs/latest", help="run folder (default runs/latest)")
    headline.add_argument("--readme", default="README.md", metavar="FILE", help="README to rewrite (default README.md)")
    return parser


def _report(run_dir: str, png: bool) -> int:
    from .outputs import read_run_manifest
    from .report import write_report

    folder = Path(run_dir).resolve()
    print(f"Report: {write_report(folder, read_run_manifest(folder), png=png)}")
    return 0


def _headline(run_dir: str, readme: str) -> int:
    from .headline import check_reference_run, update_readme_headline
    from .outputs import read_run_manifest

    folder = Path(run_dir).resolve()
    manifest = read_run_manifest(folder)
    check_reference_run(manifest, run_dir)
    changed = update_readme_headline(readme, folder, manifest)
    print(f"{readme}: headline numbers {'updated from ' + folder.name if changed else 'already up to date'}.")
    return 0


def _compare(run_dirs: list[str], out: str | None) -> int:
    import time

    from ..report.compare import write_comparison

    target = out or Path(run_dirs[0]).expanduser().resolve().parent / f"{time.strftime('%Y%m%d-%H%M%S')}-compare"
    print(f"Comparison: {write_comparison(run_dirs, target)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; return the exit code.

    Args:
        argv: the command line after ``python -m sinklens``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args.run_dir, png=not args.no_png)
        if args.command == "headline":
            return _headline(args.run_dir, args.readme)
        if args.command == "compare":
            return _compare(args.run_dirs, args.out)
        overrides = runner.parse_assignments(args.assignments)
        if args.models and args.model:
            raise InputError("Pass --model NAME or --models A B C, not both.")
        if args.ray is not None and not args.models:
            raise InputError("--ray runs several models as Ray tasks: pass them with --models A B C.")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return runner.EXIT_INPUT
    if args.models:
        return runner.run_models(args.models, use_ray=args.ray is not None, ray_address=args.ray or None,
                                 notebooks_dir=args.notebooks, overrides=overrides, params_file=args.params,
                                 only=args.only, ci=args.ci, out=args.out, argv=argv)
    return runner.run(notebooks_dir=args.notebooks, model=args.model, overrides=overrides, params_file=args.params,
                      only=args.only, ci=args.ci, out=args.out, argv=argv)
