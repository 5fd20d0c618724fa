"""The ``metarec`` command. Every subcommand has ``--help``; user errors print one line.

Errors caused by input (``MetarecError``) print ``error: <message>`` to stderr and exit 2,
with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from metarec import __version__
from metarec.config import SCENARIOS, SOURCES, load_config
from metarec.errors import ConfigError, MetarecError

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="experiment config (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.query_size=5 (repeatable)",
    )
    p.add_argument("--seed", type=int, help="random seed (config: seed)")


def _prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="raw ratings -> prepared task dataset",
        description="Read raw ratings (MovieLens, a generic CSV/Parquet, or the built-in "
        "synthetic generator), validate them, build per-user tasks for every "
        "scenario, and write a prepared dataset directory atomically.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", choices=SOURCES, help="where ratings come from (data.source)")
    p.add_argument(
        "--input",
        metavar="PATH",
        help="MovieLens: unpacked directory; ratings: CSV/TSV/Parquet file",
    )
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download the MovieLens zip from GroupLens if --input is missing",
    )
    p.add_argument(
        "--item-features",
        metavar="PATH",
        help="ratings source: item table (item[,title,genres,year])",
    )
    p.add_argument(
        "--user-features",
        metavar="PATH",
        help="ratings source: user table (user[,age,gender,occupation,zip])",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument(
        "--scenarios",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--query-size", type=int, help="query ratings per task (default 10)")
    p.add_argument("--min-ratings", type=int, help="drop users with fewer ratings (default 13)")
    p.add_argument("--max-ratings", type=int, help="drop users with more ratings (default 100)")
    p.add_argument(
        "--item-cut-year", type=int, help="items released after this year are new (default: auto)"
    )
    p.add_argument("--users", type=int, help="synthetic: number of users")
    p.add_argument("--items", type=int, help="synthetic: number of items")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_args(p)
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from metarec.data.prepare import prepare
    from metarec.data.prepared import summarize

    cfg = load_config(
        args.config,
        overrides=args.overrides,
        **{
            "seed": args.seed,
            "data.source": args.source,
            "data.input": args.input,
            "data.download": args.download,
            "data.items": args.item_features,
            "data.users": args.user_features,
            "data.scenarios": args.scenarios,
            "data.query_size": args.query_size,
            "data.min_ratings": args.min_ratings,
            "data.max_ratings": args.max_ratings,
            "data.item_cut_year": args.item_cut_year,
            "data.synthetic.n_users": args.users,
            "data.synthetic.n_items": args.items,
        },
    )
    ds = prepare(cfg, args.out, progress=not args.no_progress)
    print(summarize(ds.manifest))
    print(f"wrote {ds.root}")
    return 0


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print a prepared dataset's manifest summary",
        description="Print the manifest summary of a prepared dataset directory.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from metarec.data.prepared import open_prepared, summarize

    print(summarize(open_prepared(args.data).manifest))
    return 0


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="meta-train and compare against every baseline -> results.json",
        description="Meta-train in-process with the config's settings for each seed, tune the "
        "baselines on validation users, and score every method on test users of each "
        "scenario. Writes OUT/results.json and prints a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json goes")
    p.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        metavar="S",
        help="scenario to evaluate (repeatable; 'all' = every prepared one; "
        "default: train.scenario)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="training seeds; results are mean ± std over them",
    )
    p.add_argument(
        "--baselines", default="all", help="comma-separated subset of baselines, 'all' or 'none'"
    )
    p.add_argument("--algorithm", help="meta.algorithm (maml|fomaml|metasgd|anil|reptile)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    _add_config_args(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from metarec.data.prepared import open_prepared
    from metarec.evaluate import BASELINES, evaluate, format_table, write_results

    cfg = load_config(
        args.config,
        overrides=args.overrides,
        **{"seed": args.seed, "meta.algorithm": args.algorithm, "train.epochs": args.epochs},
    )
    ds = open_prepared(args.data)
    scenarios = args.scenarios or [cfg.train.scenario]
    if "all" in scenarios:
        scenarios = ds.scenarios
    for s in scenarios:
        ds.task_path(s, "test")  # unknown scenario -> clear error before any training
    if args.baselines == "all":
        baselines = BASELINES
    elif args.baselines == "none":
        baselines = ()
    else:
        baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(
                f"--baselines: got {unknown[0]!r}; expected a subset of "
                f"{list(BASELINES)}, 'all' or 'none'"
            )
    results = evaluate(
        cfg,
        ds,
        scenarios=scenarios,
        seeds=args.seeds,
        baselines=baselines,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    path = write_results(results, args.out)
    print(format_table(results))
    print(f"\nwrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarec", description="Meta-learned personalization on Ray: users as tasks."
    )
    parser.add_argument("--version", action="version", version=f"metarec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _prepare_parser(sub)
    _info_parser(sub)
    _evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except MetarecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
