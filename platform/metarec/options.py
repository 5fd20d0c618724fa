"""Every flag of every ``metarec`` subcommand, declared once (``metarec.cli`` dispatches).

Flags that set a config key are generated from the config tree (``config_key``): their type,
choices and default come from there, so each default is stated in one place; the serve
flags are the ``serve`` section's keys like any other.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from metarec.config import config_key

__all__ = [
    "TRAIN_RESUME_HONOURS",
    "TRAIN_RESUME_REFUSES",
    "TUNE_RESUME_REFUSES",
    "add_parsers",
    "configured",
]

# (--flag, dotted config key, help), and argparse settings where the type alone is not enough
Flag = tuple[str, str, str] | tuple[str, str, str, dict[str, Any]]
ALGORITHM: Flag = ("--algorithm", "meta.algorithm", "the meta-learning algorithm")
EPOCHS: Flag = ("--epochs", "train.epochs", "meta-training epochs")
# With --resume a run keeps its own config: these flags are refused (flag -> dest).
TRAIN_RESUME_REFUSES = {
    "--config": "config",
    "--set": "overrides",
    "--seed": "seed",
    "--algorithm": "meta.algorithm",
    "--scenario": "train.scenario",
}
TRAIN_RESUME_HONOURS = {  # flag -> keyword of metarec.train.resume
    "--epochs": ("train.epochs", "epochs"),
    "--workers": ("train.workers", "workers"),
    "--gpu/--no-gpu": ("train.use_gpu", "use_gpu"),
    "--cpus-per-worker": ("train.cpus_per_worker", "cpus_per_worker"),
    "--placement": ("train.placement", "placement"),
}
TUNE_RESUME_REFUSES = {
    **{f: d for f, d in TRAIN_RESUME_REFUSES.items() if f in ("--config", "--set", "--seed")},
    "--epochs": "train.epochs",
    "--num-samples": "tune.num_samples",
    "--space": "tune.space",
    "--max-concurrent": "tune.max_concurrent",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States each default once: not where it is None/False, nor where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_flags(p: argparse.ArgumentParser, *flags: Flag, seed: bool = True) -> None:
    """``--config``, ``--set``, ``--seed`` and ``flags``, each stored under its config key."""
    p.add_argument("--config", metavar="YAML", help="experiment config (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.query_size=5 (repeatable)",
    )
    if seed:
        flags = (("--seed", "seed", "random seed"), *flags)
    for flag, key, text, *extra in flags:
        hint, default = config_key(key)
        kw = _kind(key, hint) | (extra[0] if extra else {})
        p.add_argument(flag, help=_help(key, text, default), **kw)
    p.set_defaults(
        config_keys=[f[1] for f in flags], flag_names={f[1]: f[0].split("/")[0] for f in flags}
    )


def _kind(key: str, hint: Any) -> dict[str, Any]:
    """argparse settings of a config key's flag, from its type hint (``Annotated`` already
    stripped by ``config_key``): choices, a switch, a number, or a list of ints; unset flags
    stay None, so only given ones override the config."""
    kw: dict[str, Any] = {"dest": key, "default": None}
    nullable = get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in get_args(hint) if a is not type(None)) if nullable else hint
    if get_origin(base) is Literal:
        kw["choices"] = get_args(base)
    elif base is bool:
        kw["action"] = argparse.BooleanOptionalAction if nullable else "store_true"
    elif base in (int, float):
        kw.update(type=base, metavar="N")
    elif get_origin(base) is tuple and get_args(base)[0] is int:
        kw.update(type=int, nargs="+", metavar="N")
    else:
        kw["metavar"] = key.rsplit(".", 1)[-1].upper()
    return kw


def _help(key: str, text: str, default: Any) -> str:
    """The flag's help, naming its key and (unless the text does) its default."""
    if default is not None and default is not False and "default" not in text:
        return f"{text} ({key}, default {_shown(default)})"
    return f"{text} ({key})"


def configured(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given as flags (None: not given)."""
    return {key: getattr(args, key) for key in args.config_keys}


def store_flags(p: argparse.ArgumentParser, work: str, *, data: bool = True) -> None:
    if data:
        p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--work-dir", default="work", help=work)
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under --work-dir)",
    )


Command = Callable[[argparse.Namespace], Any]


def add_parsers(sub: Any, commands: dict[str, Command]) -> None:
    """One parser per entry of ``commands`` (name -> what runs it)."""

    def parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
        p.set_defaults(func=commands[name], config_keys=[])
        return p

    p = parser(
        "prepare",
        "raw ratings -> prepared task dataset",
        "Read raw ratings (MovieLens, a generic CSV/Parquet, or the built-in synthetic "
        "generator), validate them, build per-user tasks for every scenario, and write a "
        "prepared dataset directory atomically.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="prepared dataset directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    config_flags(
        p,
        ("--source", "data.source", "where ratings come from"),
        ("--input", "data.input", "MovieLens: unpacked directory; ratings: CSV/TSV/Parquet"),
        ("--download", "data.download", "download the MovieLens zip if --input is missing"),
        ("--item-features", "data.items", "ratings source: item table (item[,title,genres,year])"),
        ("--user-features", "data.users", "ratings source: user table (user[,age,gender,...])"),
        ("--feedback", "data.feedback", "fold in the ratings `metarec serve` logged (its dir)"),
        ("--scenarios", "data.scenarios", "comma-separated subset of the scenarios"),
        ("--query-size", "data.query_size", "query ratings per task"),
        ("--min-ratings", "data.min_ratings", "drop users with fewer ratings"),
        ("--max-ratings", "data.max_ratings", "drop users with more ratings"),
        ("--item-cut-year", "data.item_cut_year", "items released later are new; unset: auto"),
        (
            "--split-seed",
            "data.split_seed",
            "seed of the user split and query draws; unset: "
            "--seed. `evaluate --split-seeds N` rebuilds exactly this split in memory",
        ),
        ("--users", "data.synthetic.n_users", "synthetic: number of users"),
        ("--items", "data.synthetic.n_items", "synthetic: number of items"),
    )

    p = parser(
        "info",
        "print a prepared dataset's manifest summary",
        "Print the manifest summary of a prepared dataset directory.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")

    p = parser(
        "train",
        "meta-train on Ray Train, tracked in MLflow -> registered model",
        "Meta-train on a prepared dataset with Ray Train (data-parallel workers, a checkpoint "
        "every epoch, restart on worker failure), log the run to MLflow and register the best "
        "model with the alias 'candidate'. Uses the Ray cluster in RAY_ADDRESS (or one started "
        "with `ray start`), else starts a local one.",
    )
    store_flags(p, "Ray results, checkpoints, MLflow store")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the interrupted run of this name "
        "with its own config; only " + ", ".join(TRAIN_RESUME_HONOURS) + " may change",
    )
    config_flags(
        p,
        ("--scenario", "train.scenario", "the scenario to train on"),
        ("--workers", "train.workers", "Ray Train workers"),
        ("--gpu", "train.use_gpu", "one GPU per worker; unset: when CUDA is available"),
        (
            "--cpus-per-worker",
            "train.cpus_per_worker",
            "logical CPUs per worker; unset: leave one CPU for Ray Data, at most 1",
        ),
        (
            "--placement",
            "train.placement",
            "workers across nodes: PACK, SPREAD, or STRICT_SPREAD (one node each)",
        ),
        ALGORITHM,
        EPOCHS,
    )

    p = parser(
        "tune",
        "Ray Tune sweep of meta-learning hyperparameters (trials = train runs)",
        "Search the config's tune.space (or --space) with Ray Tune; every trial is a `metarec "
        "train` run on Ray Train, ASHA stops poor ones on validation MAE, each trial is a "
        "nested MLflow run, and the best trial's model is registered as 'candidate'. Space "
        "entries: KEY=loguniform(lo,hi) | uniform(lo,hi) | randint(lo,hi) | choice(a,b,..) | "
        "grid(a,b,..).",
    )
    store_flags(p, "Ray results, MLflow store")
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="SWEEP",
        help="continue an interrupted sweep as it was started (no value: the last one in "
        "--work-dir)",
    )
    config_flags(
        p,
        ("--num-samples", "tune.num_samples", "trials"),
        ("--max-concurrent", "tune.max_concurrent", "trials at once; unset: what fits"),
        ("--epochs", "train.epochs", "epochs of every trial (ASHA's max_t)"),
        (
            "--space",
            "tune.space",
            "search-space entry, e.g. 'meta.inner_lr=loguniform(0.05,1)' (repeatable; the "
            "entries given replace the whole space)",
            {"action": "append", "metavar": "ENTRY"},
        ),
    )

    _evaluation_parser(
        parser(
            "evaluate",
            "meta-train (or load a model) and compare against every baseline",
            "Meta-train in-process with the config's settings for each seed (or "
            "load a trained model with --model), tune the baselines on validation users, and score "
            "every method on test users of each scenario. Writes OUT/results.json and prints a "
            "table.",
        ),
        ("--seeds", "evaluate.seeds", "init seeds within each user split"),
        scenario="train.scenario",
    )
    _evaluation_parser(
        parser(
            "report",
            "evaluate on every scenario and write report.md with plots",
            "Everything `evaluate` does (default: every prepared scenario, seeds 0 1 2), plus "
            "the shot curve (accuracy vs support ratings per user), the adaptation-step curve, "
            "per-user errors by activity and the learning curves. Writes OUT/results.json, "
            "curves.json, report.md and four PNGs; with a models:/ or runs:/ --model, logs them "
            "to that MLflow run.",
        ),
        ("--seeds", "report.seeds", "init seeds within each user split"),
        ("--shots", "report.shots", "shot curve: support size per test user (0: cold start)"),
        ("--curve-steps", "report.curve_steps", "step curve: 0..N inner steps"),
        scenario="all",
    )

    p = parser(
        "promote",
        "point a registered model's alias (champion) at a version",
        "Move an alias of a registered model (default 'champion', what `metarec serve` loads) "
        "to the given version.",
    )
    p.add_argument("name", help="registered model name (printed by `metarec train`)")
    p.add_argument("version", help="model version")
    p.add_argument("--alias", default="champion", help="the alias to point at VERSION")
    store_flags(p, "where the default MLflow store lives", data=False)

    _serve_parser(
        parser(
            "serve",
            "serve per-user adaptation over HTTP (Ray Serve)",
            "Run the HTTP API (Ray Serve + FastAPI; OpenAPI at /docs) on a local Ray, or on the "
            "cluster in RAY_ADDRESS, until Ctrl-C. Set METAREC_API_TOKEN to require "
            "'Authorization: Bearer <token>' on /v1/*. For YAML deployments see "
            "serve/config.yaml.",
        )
    )


def _evaluation_parser(p: argparse.ArgumentParser, *flags: Flag, scenario: str) -> None:
    """The flags `evaluate` and `report` share, and ``flags``, their own."""
    store_flags(p, "where the default MLflow store lives")
    p.add_argument("--out", required=True, metavar="DIR", help="where the results go")
    p.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        metavar="S",
        help=f"scenario to evaluate (repeatable; 'all' = every prepared one; default: {scenario})",
    )
    p.add_argument(
        "--splits",
        metavar="FILE.json",
        help="evaluate user_cold on a split given from outside (a paper's exact users and query "
        "items; see docs/guide.md)",
    )
    p.add_argument(
        "--model",
        metavar="URI",
        help="score this trained model (models:/NAME@ALIAS, runs:/ID/model or a checkpoint path) "
        "instead of meta-training one per seed; its config replaces --config (--set, --epochs "
        "apply on top, to what is trained here). It is scored on every scenario whose "
        "held-out ratings it did not train on; the others meta-train in process with its "
        "config. Results are logged to its MLflow run.",
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
        help="--cross-domain: the prepared dataset the model was trained on (only needed when the "
        "checkpoint lacks its feature names)",
    )
    config_flags(
        p,
        *flags,
        (
            "--split-seeds",
            "evaluate.split_seeds",
            "re-split the users of each scenario with these seeds (the split `prepare "
            "--split-seed N` would write) and evaluate on every split; results are mean ± std "
            "over splits, differences pooled over their test users (unset: the prepared split)",
        ),
        (
            "--relevance-threshold",
            "evaluate.relevance_threshold",
            "ratings >= R are relevant for P@5, nDCG@5, MRR@5, recall/nDCG@10 (unset: 0.8 x "
            "the top rating: 4 on 1-5 and 0.5-5, 8 on 1-10)",
            {"metavar": "R"},
        ),
        (
            "--no-tune-adaptation",
            "evaluate.tune_adaptation",
            "score the meta-learner with its trained adaptation instead of choosing its "
            "test-time knobs on validation users",
            {"action": "store_false"},
        ),
        ("--bootstrap", "evaluate.bootstrap", "resamples of the paired CIs", {"metavar": "B"}),
        ("--baselines", "evaluate.baselines", "comma-separated subset of baselines, all, none"),
        (
            "--workers",
            "evaluate.workers",
            "score test users with Ray Data across this many workers, joining or starting Ray "
            "(0: in this process)",
            {"metavar": "N"},
        ),
        ALGORITHM,
        EPOCHS,
    )


def _serve_parser(p: argparse.ArgumentParser) -> None:
    config_flags(
        p,
        (
            "--model",
            "serve.model",
            "models:/NAME@ALIAS, runs:/ID/model, or a checkpoint path "
            "(default: models:/<last trained model>@champion)",
        ),
        ("--work-dir", "serve.work_dir", "MLflow store and feedback log"),
        (
            "--tracking-uri",
            "serve.tracking_uri",
            "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under --work-dir)",
        ),
        ("--host", "serve.host", "bind address (0.0.0.0 = all)"),
        ("--port", "serve.port", "HTTP port"),
        ("--replicas", "serve.replicas", "Serve replicas (processes)"),
        ("--num-cpus", "serve.num_cpus", "Ray CPUs per replica"),
        ("--max-batch-size", "serve.max_batch_size", "1 = no micro-batching"),
        ("--batch-wait-ms", "serve.batch_wait_ms", "micro-batch wait"),
        ("--access-log", "serve.access_log", "Serve's per-request log line (slows the HTTP path)"),
        ("--feedback-dir", "serve.feedback_dir", "feedback log directory"),
        ("--threads", "serve.threads", "torch threads per replica"),
        ("--steps", "serve.steps", "inner steps; unset: the model's"),
        ("--max-sessions", "serve.max_sessions", "session LRU size"),
        ("--max-ratings", "serve.limits.max_ratings", "ratings per request/session"),
        ("--max-k", "serve.limits.max_k", "largest k"),
        ("--max-items", "serve.limits.max_items", "items per predict/candidates"),
        seed=False,
    )
