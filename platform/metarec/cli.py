"""The ``metarec`` command. Every subcommand has ``--help``; user errors print one line.

Errors caused by input (``MetarecError``) print ``error: <message>`` to stderr and exit 2,
with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarec import __version__
from metarec.config import SCENARIOS, SOURCES, load_config
from metarec.errors import ConfigError, MetarecError

__all__ = ["main"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States each default once: not where it is None/False, nor where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


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
        formatter_class=HelpFormatter,
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
    p.add_argument(
        "--feedback",
        metavar="DIR",
        help="fold in the ratings logged by `metarec serve` (its feedback directory)",
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
    p.add_argument(
        "--split-seed",
        type=int,
        help="seed of the user split and query draws (data.split_seed; default: --seed). "
        "`evaluate --split-seeds N` rebuilds exactly this split in memory",
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
            "data.feedback": args.feedback,
            "data.scenarios": args.scenarios,
            "data.query_size": args.query_size,
            "data.min_ratings": args.min_ratings,
            "data.max_ratings": args.max_ratings,
            "data.item_cut_year": args.item_cut_year,
            "data.split_seed": args.split_seed,
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


def _add_evaluation_args(p: argparse.ArgumentParser, *, seeds: list[int], scenario: str) -> None:
    """The arguments `evaluate` and `report` share."""
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the results go")
    p.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        metavar="S",
        help=f"scenario to evaluate (repeatable; 'all' = every prepared one; default: {scenario})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=seeds,
        metavar="N",
        help="init seeds within each user split (network init, batching, MF)",
    )
    p.add_argument(
        "--split-seeds",
        type=int,
        nargs="+",
        metavar="N",
        help="re-split the users of each scenario with these seeds (the split `prepare "
        "--split-seed N` would write) and evaluate on every split; results are mean ± std "
        "over splits, differences pooled over their test users (default: the prepared split)",
    )
    p.add_argument(
        "--splits",
        metavar="FILE.json",
        help="evaluate user_cold on a split given from outside (a paper's exact users and "
        "query items; format in README 'Evaluation protocol')",
    )
    p.add_argument(
        "--relevance-threshold",
        type=float,
        metavar="R",
        help="ratings >= R are relevant for P@5, nDCG@5, MRR@5, recall/nDCG@10 "
        "(default: 0.8 x the top rating: 4 on 1-5 and 0.5-5, 8 on 1-10)",
    )
    p.add_argument(
        "--no-tune-adaptation",
        dest="tune_adaptation",
        action="store_false",
        help="score the meta-learner with its trained steps, step size and support prior "
        "instead of choosing them on validation users",
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, metavar="B", help="resamples of the paired CIs"
    )
    p.add_argument(
        "--baselines", default="all", help="comma-separated subset of baselines, 'all' or 'none'"
    )
    p.add_argument("--algorithm", help="meta.algorithm (maml|fomaml|metasgd|anil|reptile)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument(
        "--model",
        metavar="URI",
        help="score this trained model (models:/NAME@ALIAS, runs:/ID/model or a checkpoint "
        "path) instead of meta-training one per seed; its config replaces --config (--set, "
        "--epochs apply on top, to what is trained here). It is scored on every scenario "
        "whose held-out ratings it did not train on; the others meta-train in process with "
        "its config. Results are logged to its MLflow run.",
    )
    p.add_argument(
        "--cross-domain",
        action="store_true",
        help="--model was trained on another dataset: map its features to --data's by name "
        "(genres, years, user features; item ids unseen) and score it as 'transfer' beside "
        "models trained on --data",
    )
    p.add_argument(
        "--source-data",
        metavar="DIR",
        help="--cross-domain: the prepared dataset the model was trained on (for its feature "
        "names; only needed when the checkpoint does not carry them)",
    )
    p.add_argument("--work-dir", default="work", help="where the default MLflow store lives")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (for models:/ and runs:/)")
    _add_config_args(p)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="meta-train (or load a model) and compare against every baseline",
        description="Meta-train in-process with the config's settings for each seed (or load "
        "a trained model with --model), tune the baselines on validation users, and score "
        "every method on test users of each scenario. Writes OUT/results.json and prints "
        "a table.",
        formatter_class=HelpFormatter,
    )
    _add_evaluation_args(p, seeds=[0], scenario="train.scenario")
    p.set_defaults(func=_cmd_evaluate)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="evaluate on every scenario and write report.md with plots",
        description="Everything `evaluate` does (default: every prepared scenario, seeds "
        "0 1 2), plus the shot curve (accuracy vs support ratings per user), the "
        "adaptation-step curve, per-user errors by activity and the learning curves. "
        "Writes OUT/results.json, curves.json, report.md and four PNGs; with a models:/ or "
        "runs:/ --model, logs them to that MLflow run.",
        formatter_class=HelpFormatter,
    )
    _add_evaluation_args(p, seeds=[0, 1, 2], scenario="all")
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=[0, 1, 2, 4, 8, 16, 32],
        metavar="K",
        help="shot curve: support ratings per test user (0: cold start, no adaptation data)",
    )
    p.add_argument(
        "--curve-steps", type=int, default=10, metavar="N", help="step curve: 0..N inner steps"
    )
    p.set_defaults(func=_cmd_report)


@dataclass
class _Evaluation:
    """What `evaluate`/`report` score, resolved from the arguments before any training."""

    cfg: Any  # MetarecConfig (imported lazily: `metarec --help` stays fast)
    ds: Any  # PreparedDataset
    scenarios: list[str] = field(default_factory=list)
    baselines: tuple[str, ...] = ()
    learner: Any = None  # the given model (same dataset)
    history: list[dict[str, float]] | None = None  # its training history
    extra: dict[str, Any] | None = None  # --cross-domain: the transferred model's scorers
    transfer: dict[str, Any] | None = None  # --cross-domain: what was mapped (transfer.json)
    splits: list[Any] | None = None  # (label, dataset) per user split

    def run(self, args: argparse.Namespace, on_seed: Any = None) -> dict[str, dict[str, Any]]:
        from metarec.evaluate import evaluate

        return evaluate(
            self.cfg,
            self.ds,
            scenarios=self.scenarios,
            seeds=args.seeds,
            splits=self.splits,
            baselines=self.baselines,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
            learner=self.learner,
            extra=self.extra,
            on_seed=on_seed,
            threshold=args.relevance_threshold,
            tune_adaptation=args.tune_adaptation,
            resamples=args.bootstrap,
        )


def _evaluation(args: argparse.Namespace, default_scenario: str | None) -> _Evaluation:
    """Resolve config, dataset, scenarios, baselines and the given (or transferred) model."""
    from metarec.data.prepared import open_prepared

    cfg = load_config(
        args.config,
        overrides=args.overrides,
        **{"seed": args.seed, "meta.algorithm": args.algorithm, "train.epochs": args.epochs},
    )
    ds = open_prepared(args.data)
    if args.cross_domain and not args.model:
        raise ConfigError("--cross-domain: got no --model; expected the model to transfer")
    ev = _load_model(args, ds) if args.model else _Evaluation(cfg, ds)
    scenarios = args.scenarios or [default_scenario or ev.cfg.train.scenario]
    ev.scenarios = ds.scenarios if "all" in scenarios else scenarios
    for s in ev.scenarios:
        ds.task_path(s, "test")  # unknown scenario -> clear error before any training
    ev.baselines = _baselines(args.baselines)
    ev.splits = _splits(args, ds, ev.scenarios)
    return ev


def _splits(args: argparse.Namespace, ds: Any, scenarios: list[str]) -> list[Any] | None:
    """``--split-seeds`` / ``--splits``: the user splits to evaluate on (None: the prepared)."""
    from metarec.data.splits import external_split, resplit

    if args.splits and args.split_seeds:
        raise ConfigError("--splits: got it with --split-seeds; expected one or the other")
    if args.bootstrap < 1000:
        raise ConfigError(f"--bootstrap: got {args.bootstrap}; expected at least 1000")
    if args.splits:
        if scenarios != ["user_cold"]:
            raise ConfigError(
                f"--scenario: got {scenarios} with --splits; expected user_cold only (a split "
                "file defines user_cold's users and queries)"
            )
        return [(Path(args.splits).name, external_split(ds, args.splits))]
    if args.split_seeds:
        if len(set(args.split_seeds)) != len(args.split_seeds):
            raise ConfigError(f"--split-seeds: got {args.split_seeds}; expected distinct seeds")
        return [(s, resplit(ds, s)) for s in args.split_seeds]
    return None


def _baselines(arg: str) -> tuple[str, ...]:
    from metarec.evaluate import BASELINES

    if arg in ("all", "none"):
        return BASELINES if arg == "all" else ()
    names = tuple(b.strip() for b in arg.split(",") if b.strip())
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ConfigError(
            f"--baselines: got {unknown[0]!r}; expected a subset of {list(BASELINES)}, "
            "'all' or 'none'"
        )
    return names


def _load_model(args: argparse.Namespace, ds: Any) -> _Evaluation:
    """``--model``: scored as it is on its own dataset, transferred with ``--cross-domain``."""
    from metarec.checkpoint import learner_from_checkpoint, load_checkpoint
    from metarec.config import MetarecConfig
    from metarec.tracking import resolve_checkpoint, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.work_dir)
    ckpt = load_checkpoint(resolve_checkpoint(args.model, uri))
    cfg = _model_config(args, MetarecConfig.from_dict(ckpt["config"], where=args.model))
    learner = learner_from_checkpoint(ckpt)
    if not args.cross_domain:
        if ckpt["dataset_hash"] != ds.manifest["dataset_hash"]:
            raise ConfigError(
                f"--model {args.model}: got a model trained on prepared dataset "
                f"{ckpt['dataset_hash']}; expected one trained on --data "
                f"({ds.manifest['dataset_hash']}). Pass --cross-domain to transfer it."
            )
        return _Evaluation(cfg, ds, learner=learner, history=ckpt["state"]["history"])
    from metarec.evaluate import AdaptedScorer
    from metarec.transfer import transfer_learner

    moved, mapping = transfer_learner(learner, _source_vocab(args, ckpt), ds)
    extra = {"transfer": AdaptedScorer(moved), "transfer_noadapt": AdaptedScorer(moved, steps=0)}
    transfer = {
        "model": args.model,
        "source_dataset_hash": ckpt["dataset_hash"],
        "target": {k: ds.manifest[k] for k in ("dataset_hash", "source")},
        "coverage": mapping.coverage(),
        "missing": mapping.missing,
    }
    return _Evaluation(cfg, ds, extra=extra, transfer=transfer)


def _model_config(args: argparse.Namespace, cfg: Any) -> Any:
    """The model's config, with ``--set``, ``--epochs`` and ``--seed`` on top: they shape
    what is trained here (baselines, fits where the model cannot be scored); ``--algorithm``
    only with ``--cross-domain`` (the given model is scored as what it is)."""
    import yaml

    from metarec.config import apply_overrides

    if args.algorithm and not args.cross_domain:
        raise ConfigError(
            f"--algorithm: got {args.algorithm!r} with --model; expected none (the model's "
            f"own algorithm, {cfg.meta.algorithm}, is what is scored)"
        )
    dotted = {
        key.strip(): yaml.safe_load(raw)
        for key, _, raw in (item.partition("=") for item in args.overrides)
    }
    flags = {"seed": args.seed, "train.epochs": args.epochs, "meta.algorithm": args.algorithm}
    return apply_overrides(cfg, **(dotted | {k: v for k, v in flags.items() if v is not None}))


def _source_vocab(args: argparse.Namespace, ckpt: dict[str, Any]) -> dict[str, list[str]]:
    """The feature names of the model's training data: from its checkpoint, else from
    ``--source-data`` (checked to be the dataset it was trained on)."""
    from metarec.data.prepared import open_prepared

    vocab = (ckpt.get("catalog") or {}).get("vocab")
    if vocab is not None:
        return vocab
    if not args.source_data:
        raise ConfigError(
            f"--source-data: got none; expected the prepared dataset {args.model} was trained "
            "on (its checkpoint carries no feature names)"
        )
    src = open_prepared(args.source_data)
    if src.manifest["dataset_hash"] != ckpt["dataset_hash"]:
        raise ConfigError(
            f"--source-data {args.source_data}: got dataset {src.manifest['dataset_hash']}; "
            f"expected {ckpt['dataset_hash']}, the one the model was trained on"
        )
    return src.manifest["vocab"]


def _finish_evaluation(
    args: argparse.Namespace, ev: _Evaluation, results: dict, files: list[Path]
) -> None:
    """transfer.json (--cross-domain); attach everything to ``--model``'s MLflow run."""
    from metarec.evaluate import write_json_atomic

    if ev.transfer is not None:
        files.append(write_json_atomic(Path(args.out) / "transfer.json", ev.transfer))
    print(f"wrote {args.out}: " + ", ".join(f.name for f in files))
    if not args.model or not args.model.startswith(("models:/", "runs:/")):
        return
    from metarec.tracking import describe_model, log_evaluation, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.work_dir)
    run_id = describe_model(args.model, uri)["run_id"]
    if run_id is None:
        return
    m = ev.ds.manifest
    prefix = "eval"
    if ev.transfer is not None:
        prefix = f"cross_domain/{m['source']['name']}-{m['dataset_hash'][:8]}"
    log_evaluation(uri, run_id, results, files, prefix=prefix)
    print(f"logged to MLflow run {run_id} under {prefix}/")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from metarec.evaluate import format_table, write_results

    ev = _evaluation(args, None)
    results = ev.run(args)
    print(format_table(results))
    _finish_evaluation(args, ev, results, [write_results(results, args.out)])
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from metarec.report import CurveCollector, report_header, write_report

    ev = _evaluation(args, "all")
    collector = CurveCollector(
        shots=args.shots, steps=range(args.curve_steps + 1), history=ev.history
    )
    results = ev.run(args, on_seed=collector)
    title, preamble, notes = report_header(
        ev.ds.manifest,
        ev.cfg,
        results,
        data=args.data,
        model=args.model,
        seeds=args.seeds,
        transfer=ev.transfer,
    )
    files = write_report(
        args.out, results, collector.summary(), title=title, preamble=preamble, notes=notes
    )
    _finish_evaluation(args, ev, results, files)
    print(f"report:     {Path(args.out) / 'report.md'}")
    return 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train on Ray Train, tracked in MLflow -> registered model",
        description="Meta-train on a prepared dataset with Ray Train (data-parallel workers, "
        "a checkpoint every epoch, restart on worker failure), log the run to MLflow and "
        "register the best model with the alias 'candidate'. Uses the Ray cluster in "
        "RAY_ADDRESS (or one started with `ray start`), else starts a local one.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--scenario", help="train.scenario (default: the config's)")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.workers, default 2)")
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per worker (train.use_gpu; default: when CUDA is available)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="logical CPUs per worker (train.cpus_per_worker; default: leave one CPU for "
        "Ray Data, at most 1)",
    )
    p.add_argument("--algorithm", help="meta.algorithm (maml|fomaml|metasgd|anil|reptile)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the interrupted run of this name with its own config; only --epochs "
        "(to train further), --workers, --gpu and --cpus-per-worker may change",
    )
    p.add_argument("--work-dir", default="work", help="Ray results, checkpoints, MLflow store")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under --work-dir)",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)


# Flags that define the experiment. With --resume the run keeps its own config, so these are
# refused (train: see metarec.train.resumed_config; tune: Tuner.restore keeps its space).
_TRAIN_RESUME_REFUSES = {
    "--config": "config",
    "--set": "overrides",
    "--seed": "seed",
    "--algorithm": "algorithm",
    "--scenario": "scenario",
}
_TRAIN_RESUME_HONOURS = ("--epochs", "--workers", "--gpu/--no-gpu", "--cpus-per-worker")
_TUNE_RESUME_REFUSES = {
    "--config": "config",
    "--set": "overrides",
    "--seed": "seed",
    "--epochs": "epochs",
    "--num-samples": "num_samples",
    "--space": "space",
    "--max-concurrent": "max_concurrent",
}


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


def _cmd_train(args: argparse.Namespace) -> int:
    from metarec.evaluate import write_json_atomic
    from metarec.tracking import resolve_tracking_uri
    from metarec.train import resume, train

    if args.resume:
        _refuse_on_resume(
            args, _TRAIN_RESUME_REFUSES, "only " + ", ".join(_TRAIN_RESUME_HONOURS) + " apply"
        )
        out = resume(
            args.resume,
            args.data,
            epochs=args.epochs,
            workers=args.workers,
            use_gpu=args.gpu,
            cpus_per_worker=args.cpus_per_worker,
            work_dir=args.work_dir,
            tracking_uri=args.tracking_uri,
        )
    else:
        cfg = load_config(
            args.config,
            overrides=args.overrides,
            **{
                "seed": args.seed,
                "meta.algorithm": args.algorithm,
                "train.epochs": args.epochs,
                "train.scenario": args.scenario,
                "train.workers": args.workers,
                "train.use_gpu": args.gpu,
                "train.cpus_per_worker": args.cpus_per_worker,
            },
        )
        out = train(cfg, args.data, work_dir=args.work_dir, tracking_uri=args.tracking_uri)
    uri = resolve_tracking_uri(args.tracking_uri, args.work_dir)
    record = {
        "run_name": out.run_name,
        "run_id": out.run_id,
        "model_uri": out.model_uri,
        "checkpoint": str(out.checkpoint),
        "tracking_uri": uri,
    }
    write_json_atomic(Path(args.work_dir) / "last_run.json", record)  # for scripts (make demo)
    print(f"run:        {out.run_name} ({out.epochs_run} epochs, best {out.best_epoch})")
    print(f"valid MAE:  {out.best_valid_mae:.4f}")
    print(f"MLflow run: {out.run_id}")
    print(f"model:      {out.model_uri}")
    print(f"checkpoint: {out.checkpoint}")
    _print_against_champion(uri, out.model_uri, out.run_id)
    print(f"see it:     mlflow ui --backend-store-uri {uri}")
    return 0


def _print_against_champion(uri: str, model: str, run_id: str) -> None:
    """One line: this model against the champion, and the promote command; never moves it."""
    from metarec.tracking import against_champion

    c = against_champion(uri, model, run_id)
    promote = f"metarec promote {c['name']} {c['version']}"
    champ = c["champion"]
    if champ is None:
        print(f"champion:   none yet; serve this one with: {promote}")
    elif champ["version"] == c["version"]:
        print(f"champion:   this version ({c['version']})")
    elif not champ["comparable"] or champ["valid_mae"] is None or c["valid_mae"] is None:
        print(
            f"champion:   version {champ['version']}, validated on other users (another "
            f"scenario): not compared; unchanged. To replace it: {promote}"
        )
    else:
        diff = c["valid_mae"] - champ["valid_mae"]
        verdict = "better" if diff < 0 else "not better"
        print(
            f"champion:   version {champ['version']}, valid MAE {champ['valid_mae']:.4f}; this "
            f"one {c['valid_mae']:.4f} ({diff:+.4f}, {verdict}); champion unchanged. "
            f"To replace it: {promote}"
        )


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune sweep of meta-learning hyperparameters (trials = train runs)",
        description="Search inner/outer learning rates, inner steps, algorithm, ... (the "
        "config's tune.space, or --space) with Ray Tune; every trial is a `metarec train` "
        "run on Ray Train, ASHA stops poor ones on validation MAE, each trial is a nested "
        "MLflow run, and the best trial's model is registered as 'candidate'. Space entries: "
        "KEY=loguniform(lo,hi) | uniform(lo,hi) | randint(lo,hi) | choice(a,b,..) | "
        "grid(a,b,..).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--num-samples", type=int, help="trials (tune.num_samples)")
    p.add_argument(
        "--space",
        action="append",
        metavar="ENTRY",
        help="search-space entry, e.g. 'meta.inner_lr=loguniform(0.05,1)' (repeatable; "
        "replaces tune.space)",
    )
    p.add_argument("--epochs", type=int, help="train.epochs of every trial (ASHA's max_t)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="SWEEP",
        help="continue an interrupted sweep as it was started (default: the last one in "
        "--work-dir)",
    )
    p.add_argument("--work-dir", default="work", help="Ray results, MLflow store")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    _add_config_args(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    import json

    from metarec.tracking import resolve_tracking_uri
    from metarec.tune import tune

    if args.resume:
        _refuse_on_resume(args, _TUNE_RESUME_REFUSES, "the sweep resumes as it was started")
    cfg = load_config(
        args.config,
        overrides=args.overrides,
        **{
            "seed": args.seed,
            "train.epochs": args.epochs,
            "tune.num_samples": args.num_samples,
            "tune.max_concurrent": args.max_concurrent,
            "tune.space": tuple(args.space) if args.space else None,
        },
    )
    resume = args.resume
    if resume == "last":
        last = Path(args.work_dir) / "last_sweep.json"
        if not last.is_file():
            raise ConfigError(f"--resume: no sweep recorded in {last}")
        resume = json.loads(last.read_text())["name"]
    out = tune(
        cfg, args.data, work_dir=args.work_dir, tracking_uri=args.tracking_uri, resume=resume
    )
    keys = [k for k in out.best if k.startswith(("meta.", "model.", "train."))]
    print(f"sweep:      {out.name} ({len(out.table)} trials)")
    for row in out.table[:5]:
        cfgs = ", ".join(
            f"{k.split('.')[-1]}={row[k]:.4g}"
            if isinstance(row[k], float)
            else f"{k.split('.')[-1]}={row[k]}"
            for k in keys
        )
        print(f"  {row['best_valid_mae']:.4f}  {row['status']:<13} {row['epochs']:>3} ep  {cfgs}")
    print(f"MLflow run: {out.parent_run_id} (parent; trials nested)")
    print(f"model:      {out.model_uri}")
    if out.model_uri is not None:
        uri = resolve_tracking_uri(args.tracking_uri, args.work_dir)
        _print_against_champion(uri, out.model_uri, out.best["run_id"])
    return 0


def _promote_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="point a registered model's alias (champion) at a version",
        description="Move an alias of a registered model (default 'champion', what "
        "`metarec serve` loads) to the given version.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", help="registered model name (printed by `metarec train`)")
    p.add_argument("version", help="model version")
    p.add_argument("--alias", default="champion", help="the alias to point at VERSION")
    p.add_argument("--work-dir", default="work", help="where the default MLflow store lives")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.set_defaults(func=_cmd_promote)


def _cmd_promote(args: argparse.Namespace) -> int:
    from metarec.tracking import promote, resolve_tracking_uri

    promote(
        resolve_tracking_uri(args.tracking_uri, args.work_dir), args.name, args.version, args.alias
    )
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve per-user adaptation over HTTP (Ray Serve)",
        description="Run the HTTP API (Ray Serve + FastAPI; OpenAPI at /docs) on a local "
        "Ray, or on the cluster in RAY_ADDRESS, until Ctrl-C. Set METAREC_API_TOKEN to "
        "require 'Authorization: Bearer <token>' on /v1/*. For YAML deployments see "
        "serve/config.yaml.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        help="models:/NAME@ALIAS, runs:/ID/model, or a checkpoint path "
        "(default: models:/<last trained model>@champion)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--work-dir", default="work", help="MLflow store, feedback log")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--feedback-dir", help="feedback log directory (default WORK/feedback)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (processes)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--threads", type=int, help="torch threads per replica")
    p.add_argument("--max-batch-size", type=int, default=32, help="1 = no micro-batching")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="micro-batch wait")
    p.add_argument(
        "--access-log", action="store_true", help="Serve's per-request log line (costs ~30%%)"
    )
    p.add_argument("--steps", type=int, help="inner steps (default: the model's)")
    p.add_argument("--max-sessions", type=int, default=1000, help="session LRU size (~150 KB each)")
    p.add_argument("--max-ratings", type=int, default=200, help="ratings per request/session")
    p.add_argument("--max-k", type=int, default=100, help="largest k")
    p.add_argument("--max-items", type=int, default=1000, help="items per predict/candidates")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from metarec.serving.app import ServeSettings, serve_forever

    settings = ServeSettings(
        model=args.model,
        tracking_uri=args.tracking_uri,
        work_dir=str(Path(args.work_dir).resolve()),
        feedback_dir=str(Path(args.feedback_dir).resolve()) if args.feedback_dir else None,
        steps=args.steps,
        threads=args.threads,
        max_sessions=args.max_sessions,
        limits={"max_ratings": args.max_ratings, "max_k": args.max_k, "max_items": args.max_items},
    )
    serve_forever(
        settings,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        access_log=args.access_log,
    )
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
    _train_parser(sub)
    _tune_parser(sub)
    _evaluate_parser(sub)
    _report_parser(sub)
    _promote_parser(sub)
    _serve_parser(sub)
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
        return args.func(args)
    except MetarecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
