"""Typed configuration: one frozen dataclass tree, resolved once, logged whole.

Resolution order: dataclass defaults, then a YAML file, then ``--set dotted.key=value``
overrides and explicit CLI flags. Unknown keys and mistyped values fail at load, naming the
key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from metarec.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "SCENARIOS",
    "SOURCES",
    "DataConfig",
    "MetarecConfig",
    "SyntheticConfig",
    "apply_overrides",
    "load_config",
]

Scenario = Literal["user_cold", "warm", "item_cold", "user_item_cold", "temporal"]
Algorithm = Literal["maml", "fomaml", "metasgd", "anil", "reptile"]
Adapt = Literal["head", "mlp", "all"]
InnerSolver = Literal["gd", "ridge"]
Dtype = Literal["float32", "float64"]
SearchAlg = Literal["random", "optuna"]
RatingScale = Literal["1-5", "0.5-5", "1-10"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
Source = Literal["synthetic", "ml-100k", "ml-1m", "ml-latest", "ratings"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
SOURCES: tuple[str, ...] = get_args(Source)


DEFAULT_PRIOR_PRECISION = 10.0  # ridge prior precision / ALS penalty when nothing chooses


@dataclass(frozen=True)
class SyntheticConfig:
    """Planted-preference generator; see ``metarec.data.synthetic``."""

    n_users: int = 2000  # users to generate (before the rating-count filter)
    n_items: int = 1000  # catalogue size
    min_ratings_per_user: int = 15  # each user's rating count is uniform in [min, max]
    max_ratings_per_user: int = 80
    latent_dim: int = 8  # rank of the planted user x item preference
    noise: float = 0.35  # std of rating noise, in stars
    drift: float = 1.0  # how far a user's taste moves between first and last rating
    user_features: bool = True  # false: no user table (age still shapes ratings, unseen)
    scale: RatingScale = "1-5"  # whole stars, half stars (MovieLens latest) or 1-10 points
    popularity_zipf: float = 0.0  # 0: log-normal item popularity; a > 0: P(rank r) ~ r^-a


@dataclass(frozen=True)
class DataConfig:
    """How raw ratings become meta-learning tasks (`metarec prepare`)."""

    source: Source = "synthetic"
    input: str | None = None  # local directory (MovieLens) or file (generic ratings)
    items: str | None = None  # generic source only: optional item feature table
    users: str | None = None  # generic source only: optional user feature table
    download: bool = False  # fetch the MovieLens zip from GroupLens when input is missing
    feedback: str | None = None  # a `metarec serve` feedback log directory to fold in
    scenarios: tuple[Scenario, ...] = SCENARIOS
    query_size: int = 10  # ratings to predict per task (MeLU and RecBole-MetaRec use 10)
    min_ratings: int = 13  # users outside [min_ratings, max_ratings] are dropped (MeLU)
    max_ratings: int = 100
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/valid/test share of users
    split_seed: int | None = None  # seeds the user split and query draws; None: the run's seed
    item_cut_year: int | None = None  # items released after this year are "new"; None: auto
    new_item_share: float = 0.2  # auto cut: the year leaving about this share of ratings new
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    """The recommender network (``metarec.model.Recommender``)."""

    embedding_dim: int = 32  # D of every feature embedding (MeLU uses 32)
    hidden: tuple[int, ...] = (64, 64)  # MLP widths
    item_id_embedding: bool = True  # per-item embedding; unseen items fall back to features
    pretrain_items: bool = True  # start item embeddings/biases at ALS matrix-factor values
    user_features: bool = True  # embed user features when the dataset has them
    # the head also weighs q_i (p_u . q_i of MF); None: whenever the ridge solver can use it
    factor_head: bool | None = None


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learning algorithm (``metarec.meta``)."""

    algorithm: Algorithm = "maml"
    adapt: Adapt = "head"  # which parameters adapt per user; anil forces "head"
    inner_steps: int = 5  # gradient steps on a user's support set (0: no adaptation)
    inner_lr: float = 0.5  # step size of those steps (Meta-SGD: its initial value)
    inner_solver: InnerSolver = "ridge"  # ridge: exact head solve; gd: inner_steps steps
    proximal: float = 0.0  # lambda of the inner proximal term lambda/2 |phi - theta|^2
    # ridge: initial precision of the head prior (learned per input from there on); with
    # pretrain_items it is also the ALS penalty, so training starts at MF fold-in. null:
    # penalty and factor count chosen on validation users (the mf_foldin baseline's grid)
    prior_precision: float | None = None
    # kappa: the inner loss is the support's squared-error sum over (n + kappa), not n, so
    # a user with 1 rating takes a step 1/(1 + kappa) the size of a mean-loss step.
    support_prior: float = 0.0
    outer_lr: float = 5e-3  # Adam step size of the meta-update
    weight_decay: float = 0.0  # on the outer (Adam) update
    # outer lr multiplier for item-id embeddings and biases; 0 keeps the ALS-pretrained ones
    item_lr_scale: float = 0.0
    grad_clip: float = 10.0  # max norm of the meta-gradient (guards against rare spikes)
    meta_batch_size: int = 32  # tasks per meta-update
    resample_query: bool = True  # re-split each training user's ratings every epoch
    # share of training tasks per meta-batch whose support is cut to a uniform random
    # fraction (0 included): trains the prior for users with few or no ratings, whom a
    # query loss on whole supports never scores (chosen on validation users: defaults-log §6)
    short_supports: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (in-process here; Ray Train wraps the same loop)."""

    scenario: Scenario = "user_cold"
    epochs: int = 40
    patience: int = 10  # stop after this many epochs without a better valid MAE
    eval_batch_size: int = 256  # tasks adapted at once during validation/evaluation
    device: str = "auto"  # auto | cpu | cuda
    dtype: Dtype = "float32"  # float64: slow, but runs on 1 and N workers then agree to 1e-9
    workers: int = 2  # Ray Train workers (metarec train)
    use_gpu: bool | None = None  # one GPU per worker; None: when CUDA is available
    cpus_per_worker: float | None = None  # None: leave one CPU for Ray Data, at most 1 each


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune sweep (``metarec tune``); each trial is one ``metarec train`` run.

    ``space`` entries are ``"<config key>=<distribution>(<args>)"`` with distributions
    ``loguniform(lo,hi)``, ``uniform(lo,hi)``, ``randint(lo,hi)`` (hi exclusive),
    ``choice(a,b,...)`` (sampled) and ``grid(a,b,...)`` (every value, x num_samples).
    """

    num_samples: int = 8  # trials (with grid entries: repeats of the whole grid)
    space: tuple[str, ...] = (
        "meta.prior_precision=loguniform(2.0,50.0)",
        "meta.outer_lr=loguniform(0.001,0.02)",
        "meta.item_lr_scale=choice(0.0,0.1)",
    )
    search: SearchAlg = "random"  # random (incl. grid entries) | optuna (TPE; if installed)
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 3  # ASHA: keep the best 1/rf of trials at each rung
    max_concurrent: int | None = None  # trials at once; None: as many as the CPUs fit
    workers_per_trial: int = 1  # Ray Train workers inside each trial


@dataclass(frozen=True)
class MetarecConfig:
    """Everything a run needs. Later stages add their sections here."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML, MLflow params and Ray boundaries."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> MetarecConfig:
        return _build(cls, data, where)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def factor_head(self) -> bool:
        """``model.factor_head`` resolved: its ``None`` means on exactly when the ridge
        solver and item-id embeddings are there to carry it."""
        if self.model.factor_head is not None:
            return self.model.factor_head
        return self.meta.inner_solver == "ridge" and self.model.item_id_embedding

    def validate(self) -> MetarecConfig:
        """Check cross-field constraints that types alone cannot express."""
        d = self.data
        _require(d.query_size >= 1, "data.query_size", d.query_size, "an int >= 1")
        _require(
            d.min_ratings > d.query_size,
            "data.min_ratings",
            d.min_ratings,
            f"an int > data.query_size ({d.query_size}) so every task keeps a support set",
        )
        _require(
            d.max_ratings >= d.min_ratings,
            "data.max_ratings",
            d.max_ratings,
            f"an int >= data.min_ratings ({d.min_ratings})",
        )
        _require(
            len(d.split) == 3
            and all(s >= 0 for s in d.split)
            and abs(sum(d.split) - 1) < 1e-6
            and d.split[0] > 0,
            "data.split",
            list(d.split),
            "three non-negative shares summing to 1, train > 0",
        )
        _require(
            0 < d.new_item_share < 1, "data.new_item_share", d.new_item_share, "a float in (0, 1)"
        )
        _require(
            len(d.scenarios) > 0,
            "data.scenarios",
            list(d.scenarios),
            f"a non-empty subset of {list(SCENARIOS)}",
        )
        m, t = self.meta, self.train
        if self.model.factor_head:  # asked for explicitly
            _require(
                m.inner_solver == "ridge",
                "meta.inner_solver",
                m.inner_solver,
                "'ridge' with model.factor_head (the factor head adapts in closed form)",
            )
            _require(
                self.model.item_id_embedding,
                "model.item_id_embedding",
                self.model.item_id_embedding,
                "true with model.factor_head (p_u multiplies the item's embedding q_i)",
            )
        _require(m.inner_steps >= 0, "meta.inner_steps", m.inner_steps, "an int >= 0")
        if m.inner_solver == "ridge":
            _require(
                m.adapt == "head" or m.algorithm == "anil",
                "meta.adapt",
                m.adapt,
                "'head' (or algorithm anil) with meta.inner_solver ridge: only a linear "
                "head has a closed-form inner solution",
            )
            _require(
                m.prior_precision is None or m.prior_precision > 0,
                "meta.prior_precision",
                m.prior_precision,
                "null (chosen on validation users) or a float > 0 with meta.inner_solver ridge",
            )
            _require(
                m.proximal == 0,
                "meta.proximal",
                m.proximal,
                "0 with meta.inner_solver ridge (meta.prior_precision is its penalty)",
            )
            _require(
                m.algorithm != "metasgd",
                "meta.algorithm",
                m.algorithm,
                "not metasgd with meta.inner_solver ridge (there are no steps to learn); "
                "set meta.inner_solver gd to learn step sizes",
            )
        _require(m.inner_lr > 0, "meta.inner_lr", m.inner_lr, "a float > 0")
        _require(m.outer_lr > 0, "meta.outer_lr", m.outer_lr, "a float > 0")
        _require(m.proximal >= 0, "meta.proximal", m.proximal, "a float >= 0")
        _require(m.meta_batch_size >= 1, "meta.meta_batch_size", m.meta_batch_size, "an int >= 1")
        _require(m.support_prior >= 0, "meta.support_prior", m.support_prior, "a number >= 0")
        _require(
            0 <= m.short_supports <= 1, "meta.short_supports", m.short_supports, "a share in [0, 1]"
        )
        _require(
            m.support_prior == 0 or m.inner_solver == "gd",
            "meta.support_prior",
            m.support_prior,
            "0 with inner_solver ridge (its prior precision already plays that role)",
        )
        _require(t.epochs >= 1, "train.epochs", t.epochs, "an int >= 1")
        _require(t.workers >= 1, "train.workers", t.workers, "an int >= 1")
        u = self.tune
        _require(u.num_samples >= 1, "tune.num_samples", u.num_samples, "an int >= 1")
        _require(u.grace_period >= 1, "tune.grace_period", u.grace_period, "an int >= 1")
        _require(
            u.reduction_factor >= 2, "tune.reduction_factor", u.reduction_factor, "an int >= 2"
        )
        _require(
            u.workers_per_trial >= 1, "tune.workers_per_trial", u.workers_per_trial, "an int >= 1"
        )
        _require(
            t.cpus_per_worker is None or t.cpus_per_worker > 0,
            "train.cpus_per_worker",
            t.cpus_per_worker,
            "a float > 0 (or null: automatic)",
        )
        _require(
            t.device in ("auto", "cpu", "cuda"),
            "train.device",
            t.device,
            "one of ['auto', 'cpu', 'cuda']",
        )
        _require(
            len(self.model.hidden) >= 1 and min(self.model.hidden) >= 1,
            "model.hidden",
            list(self.model.hidden),
            "one or more positive widths",
        )
        s = d.synthetic
        _require(s.n_users >= 10, "data.synthetic.n_users", s.n_users, "an int >= 10")
        _require(s.n_items >= 20, "data.synthetic.n_items", s.n_items, "an int >= 20")
        _require(
            1 <= s.min_ratings_per_user <= s.max_ratings_per_user <= s.n_items,
            "data.synthetic.min/max_ratings_per_user",
            [s.min_ratings_per_user, s.max_ratings_per_user],
            f"1 <= min <= max <= n_items ({s.n_items})",
        )
        _require(s.latent_dim >= 1, "data.synthetic.latent_dim", s.latent_dim, "an int >= 1")
        _require(s.noise >= 0, "data.synthetic.noise", s.noise, "a float >= 0")
        _require(s.drift >= 0, "data.synthetic.drift", s.drift, "a float >= 0")
        # Steeper Zipf heads repeat so often that users lose ratings to de-duplication
        # (already ~13% fewer at 1.2), which would quietly change the per-user counts.
        _require(
            0 <= s.popularity_zipf <= 1.2,
            "data.synthetic.popularity_zipf",
            s.popularity_zipf,
            "a float in [0, 1.2] (0: log-normal popularity; 1: classic Zipf long tail)",
        )
        return self


def load_config(
    path: str | Path | None = None, *, overrides: list[str] | None = None, **flags: Any
) -> MetarecConfig:
    """Defaults <- YAML <- ``--set`` overrides <- explicit flags (dotted keys; None = unset)."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: got a {type(data).__name__}; expected a mapping of sections"
            )
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.query_size=5")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    for key, value in flags.items():
        if value is not None:
            _set_dotted(data, key, value)
    return MetarecConfig.from_dict(data, where=where).validate()


def apply_overrides(cfg: MetarecConfig, **dotted: Any) -> MetarecConfig:
    """Return a copy of ``cfg`` with dotted keys replaced (Tune and tests use this)."""
    data = cfg.to_dict()
    for key, value in dotted.items():
        _set_dotted(data, key.replace("__", "."), value)
    return MetarecConfig.from_dict(data).validate()


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}; expected {expected}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: got {data!r}; expected a mapping ({where})")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown config key; expected one of {sorted(names)} ({where})"
        )
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}", where) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str, where: str) -> Any:
    """Check ``value`` against a type hint; the only implicit conversions are int->float and
    list->tuple, the ones YAML and JSON force on us."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(
                f"{name}: got {value!r}; expected one of {list(get_args(hint))} ({where})"
            )
        return value
    if origin is tuple:
        args = get_args(hint)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: got {value!r}; expected a list ({where})")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{name}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: got {list(value)!r}; expected {len(args)} values ({where})")
        return tuple(
            _coerce(a, v, f"{name}[{i}]", where)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{name}: got {value!r}; expected {expected} ({where})")
