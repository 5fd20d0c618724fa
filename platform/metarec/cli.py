"""The ``metarec`` command: parses arguments and dispatches, nothing else.

The flags are declared in ``metarec.options``; what each subcommand does lives in
``metarec.commands`` and ``metarec.evaluation_job``. Errors caused
by input (``MetarecError``) print ``error: <message>`` to stderr and exit 2, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from metarec import __version__
from metarec.config import load_config
from metarec.errors import ConfigError, MetarecError
from metarec.options import (
    TRAIN_RESUME_HONOURS,
    TRAIN_RESUME_REFUSES,
    TUNE_RESUME_REFUSES,
    Command,
    add_parsers,
    configured,
)

__all__ = ["build_parser", "main"]


def _load(args: argparse.Namespace) -> Any:
    return load_config(
        args.config, overrides=args.overrides, flag_names=args.flag_names, **configured(args)
    )


def _refuse_on_resume(args: argparse.Namespace, refused: dict[str, str], honoured: str) -> None:
    """Name the first flag given on the command line that ``--resume`` cannot honour."""
    for flag, dest in refused.items():
        value = getattr(args, dest)
        if value is None or value == []:
            continue
        shown = value[0] if isinstance(value, list) else value
        raise ConfigError(
            f"{flag}: got {shown!r} with --resume; expected none: a resumed run keeps its own "
            f"config ({honoured}). Start a new run to change it."
        )


def _prepare(args: argparse.Namespace) -> None:
    from metarec.commands import prepare_command

    prepare_command(_load(args), args.out, progress=not args.no_progress)


def _info(args: argparse.Namespace) -> None:
    from metarec.commands import info_command

    info_command(args.data)


def _promote(args: argparse.Namespace) -> None:
    from metarec.commands import promote_command

    promote_command(
        args.name, args.version, args.alias, work_dir=args.work_dir, tracking_uri=args.tracking_uri
    )


def _train(args: argparse.Namespace) -> None:
    from metarec.commands import train_command

    store = {"work_dir": args.work_dir, "tracking_uri": args.tracking_uri}
    if not args.resume:
        return train_command(_load(args), args.data, **store)
    _refuse_on_resume(
        args, TRAIN_RESUME_REFUSES, "only " + ", ".join(TRAIN_RESUME_HONOURS) + " apply"
    )
    settings = {kw: getattr(args, key) for key, kw in TRAIN_RESUME_HONOURS.values()}
    train_command(None, args.data, resume=args.resume, resume_settings=settings, **store)


def _tune(args: argparse.Namespace) -> None:
    from metarec.commands import tune_command

    if args.resume:
        _refuse_on_resume(args, TUNE_RESUME_REFUSES, "the sweep resumes as it was started")
    store = {"work_dir": args.work_dir, "tracking_uri": args.tracking_uri}
    tune_command(_load(args), args.data, resume=args.resume, **store)


def _evaluation(report: bool) -> Command:
    def run(args: argparse.Namespace) -> None:
        from dataclasses import fields

        from metarec.evaluation_job import EvaluationRequest, evaluate_command, report_command

        names = {f.name for f in fields(EvaluationRequest)} - {"flags"}
        given = {k: v for k, v in vars(args).items() if k in names}
        req = EvaluationRequest(**given, flags=configured(args))
        (report_command if report else evaluate_command)(req)

    return run


def _serve(args: argparse.Namespace) -> None:
    from metarec.commands import serve_command

    serve_command(_load(args).serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarec", description="Meta-learned personalization on Ray: users as tasks."
    )
    parser.add_argument("--version", action="version", version=f"metarec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(
        sub,
        {
            "prepare": _prepare,
            "info": _info,
            "train": _train,
            "tune": _tune,
            "evaluate": _evaluation(report=False),
            "report": _evaluation(report=True),
            "promote": _promote,
            "serve": _serve,
        },
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # MLflow's store set-up chatter is not the user's business
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow loads
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # if it already has
    try:
        args.func(args)
    except MetarecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
