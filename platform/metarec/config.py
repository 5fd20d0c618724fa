"""Typed configuration: one frozen tree of pydantic dataclasses, resolved once, logged whole.

Resolution order: defaults, then a YAML file, then ``--set dotted.key=value`` overrides and
explicit CLI flags (``load_config``, the one place all three meet). Unknown keys and mistyped
values fail at load, naming the key and the file, so a typo never silently falls back to a
default. Validation is pydantic's, in strict mode over JSON-shaped input: the only implicit
conversions are the ones YAML forces (int -> float, list -> tuple); ``validate`` adds the
constraints that span several keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from metarec.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "SCENARIOS",
    "SOURCES",
    "DataConfig",
    "MetarecConfig",
    "SyntheticConfig",
    "apply_overrides",
    "config_key",
    "field_default",
    "load_config",
    "parse_overrides",
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


def _comma_list(value: Any) -> Any:
    """``--set data.scenarios=warm,temporal``: a comma list where a list is expected."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value) if isinstance(value, list) else value


Scenarios = Annotated[tuple[Scenario, ...], BeforeValidator(_comma_list)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]


def dataclass(cls: type) -> type:
    """A frozen pydantic dataclass that refuses unknown keys and coerces nothing silently."""
    config = ConfigDict(strict=True, extra="forbid")
    return _pydantic_dataclass(frozen=True, config=config)(cls)


DEFAULT_PRIOR_PRECISION = 10.0  # ridge prior precision / ALS penalty when nothing chooses


@dataclass
class SyntheticConfig:
    """Planted-preference generator; see ``metarec.data.synthetic``."""

    # users to generate (before the rating-count filter)
    n_users: Annotated[int, Field(ge=10)] = 2000
    n_items: Annotated[int, Field(ge=20)] = 1000  # catalogue size
    min_ratings_per_user: int = 15  # each user's rating count is uniform in [min, max]
    max_ratings_per_user: int = 80
    latent_dim: PositiveInt = 8  # rank of the planted user x item preference
    noise: NonNegative = 0.35  # std of rating noise, in stars
    drift: NonNegative = 1.0  # how far a user's taste moves between first and last rating
    user_features: bool = True  # false: no user table (age still shapes ratings, unseen)
    scale: RatingScale = "1-5"  # whole stars, half stars (MovieLens latest) or 1-10 points
    popularity_zipf: float = 0.0  # 0: log-normal item popularity; a > 0: P(rank r) ~ r^-a


@dataclass
class DataConfig:
    """How raw ratings become meta-learning tasks (`metarec prepare`)."""

    source: Source = "synthetic"
    input: str | None = None  # local directory (MovieLens) or file (generic ratings)
    items: str | None = None  # generic source only: optional item feature table
    users: str | None = None  # generic source only: optional user feature table
    download: bool = False  # fetch the MovieLens zip from GroupLens when input is missing
    feedback: str | None = None  # a `metarec serve` feedback log directory to fold in
    scenarios: Scenarios = SCENARIOS
    query_size: PositiveInt = 10  # ratings to predict per task (MeLU and RecBole-MetaRec use 10)
    min_ratings: int = 13  # users outside [min_ratings, max_ratings] are dropped (MeLU)
    max_ratings: int = 100
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/valid/test share of users
    split_seed: int | None = None  # seeds the user split and query draws; None: the run's seed
    item_cut_year: int | None = None  # items released after this year are "new"; None: auto
    # auto cut: the year leaving about this share of ratings new
    new_item_share: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The recommender network (``metarec.model.Recommender``)."""

    embedding_dim: PositiveInt = 32  # D of every feature embedding (MeLU uses 32)
    hidden: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (64, 64)  # MLP widths
    item_id_embedding: bool = True  # per-item embedding; unseen items fall back to features
    pretrain_items: bool = True  # start item embeddings/biases at ALS matrix-factor values
    user_features: bool = True  # embed user features when the dataset has them
    # the head also weighs q_i (p_u . q_i of MF); None: whenever the ridge solver can use it
    factor_head: bool | None = None


@dataclass
class MetaConfig:
    """The meta-learning algorithm (``metarec.meta``)."""

    algorithm: Algorithm = "maml"
    adapt: Adapt = "head"  # which parameters adapt per user; anil forces "head"
    # gradient steps on a user's support set (0: no adaptation)
    inner_steps: Annotated[int, Field(ge=0)] = 5
    inner_lr: Positive = 0.5  # step size of those steps (Meta-SGD: its initial value)
    inner_solver: InnerSolver = "ridge"  # ridge: exact head solve; gd: inner_steps steps
    proximal: NonNegative = 0.0  # lambda of the inner proximal term lambda/2 |phi - theta|^2
    # ridge: initial precision of the head prior (learned per input from there on); with
    # pretrain_items it is also the ALS penalty, so training starts at MF fold-in. null:
    # penalty and factor count chosen on validation users (the mf_foldin baseline's grid)
    prior_precision: float | None = None
    # kappa: the inner loss is the support's squared-error sum over (n + kappa), not n, so
    # a user with 1 rating takes a step 1/(1 + kappa) the size of a mean-loss step.
    support_prior: NonNegative = 0.0
    outer_lr: Positive = 5e-3  # Adam step size of the meta-update
    weight_decay: float = 0.0  # on the outer (Adam) update
    # outer lr multiplier for item-id embeddings and biases; 0 keeps the ALS-pretrained ones
    item_lr_scale: float = 0.0
    grad_clip: float = 10.0  # max norm of the meta-gradient (guards against rare spikes)
    meta_batch_size: PositiveInt = 32  # tasks per meta-update
    resample_query: bool = True  # re-split each training user's ratings every epoch
    # share of training tasks per meta-batch whose support is cut to a uniform random
    # fraction (0 included): trains the prior for users with few or no ratings, whom a
    # query loss on whole supports never scores (chosen on validation users: defaults-log §6)
    short_supports: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0


@dataclass
class TrainConfig:
    """The training loop (in-process here; Ray Train wraps the same loop)."""

    scenario: Scenario = "user_cold"
    epochs: PositiveInt = 40
    patience: PositiveInt = 10  # stop after this many epochs without a better valid MAE
    eval_batch_size: PositiveInt = 256  # tasks adapted at once during validation/evaluation
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Dtype = "float32"  # float64: slow, but runs on 1 and N workers then agree to 1e-9
    workers: PositiveInt = 2  # Ray Train workers (metarec train)
    use_gpu: bool | None = None  # one GPU per worker; None: when CUDA is available
    cpus_per_worker: Positive | None = None  # None: leave one CPU for Ray Data, at most 1 each


@dataclass
class TuneConfig:
    """A Ray Tune sweep (``metarec tune``); each trial is one ``metarec train`` run.

    ``space`` entries are ``"<config key>=<distribution>(<args>)"`` with distributions
    ``loguniform(lo,hi)``, ``uniform(lo,hi)``, ``randint(lo,hi)`` (hi exclusive),
    ``choice(a,b,...)`` (sampled) and ``grid(a,b,...)`` (every value, x num_samples).
    """

    num_samples: PositiveInt = 8  # trials (with grid entries: repeats of the whole grid)
    space: tuple[str, ...] = (
        "meta.prior_precision=loguniform(2.0,50.0)",
        "meta.outer_lr=loguniform(0.001,0.02)",
        "meta.item_lr_scale=choice(0.0,0.1)",
    )
    search: SearchAlg = "random"  # random (incl. grid entries) | optuna (TPE; if installed)
    grace_period: PositiveInt = 2  # ASHA: epochs every trial runs before it can be stopped
    # ASHA: keep the best 1/rf of trials at each rung
    reduction_factor: Annotated[int, Field(ge=2)] = 3
    max_concurrent: int | None = None  # trials at once; None: as many as the CPUs fit
    workers_per_trial: PositiveInt = 1  # Ray Train workers inside each trial


@dataclass
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
        if not isinstance(data, dict):
            raise ConfigError(f"config: got {data!r}; expected a mapping ({where})")
        try:  # JSON mode: strict types, yet sections as mappings and lists as tuples
            return _ADAPTER.validate_json(json.dumps(data))
        except ValidationError as e:
            raise ConfigError(_describe(e.errors()[0], where)) from None

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
        """Check the constraints that span several keys (single keys check themselves)."""
        d = self.data
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
            all(s >= 0 for s in d.split) and abs(sum(d.split) - 1) < 1e-6 and d.split[0] > 0,
            "data.split",
            list(d.split),
            "three non-negative shares summing to 1, train > 0",
        )
        _require(
            len(d.scenarios) > 0,
            "data.scenarios",
            list(d.scenarios),
            f"a non-empty subset of {list(SCENARIOS)}",
        )
        m = self.meta
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
        _require(
            m.support_prior == 0 or m.inner_solver == "gd",
            "meta.support_prior",
            m.support_prior,
            "0 with inner_solver ridge (its prior precision already plays that role)",
        )
        s = d.synthetic
        _require(
            1 <= s.min_ratings_per_user <= s.max_ratings_per_user <= s.n_items,
            "data.synthetic.min/max_ratings_per_user",
            [s.min_ratings_per_user, s.max_ratings_per_user],
            f"1 <= min <= max <= n_items ({s.n_items})",
        )
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
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(data, key, value)
    for key, value in flags.items():
        if value is not None:
            _set_dotted(data, key, value)
    return MetarecConfig.from_dict(data, where=where).validate()


def config_key(key: str) -> tuple[Any, Any]:
    """(type hint, default) of a dotted config key: what the CLI generates its flags from."""
    *sections, name = key.split(".")
    node = _section(sections)
    fields = {f.name: f for f in dataclasses.fields(node)}
    if name not in fields:
        raise KeyError(key)
    return get_type_hints(node)[name], field_default(fields[name])


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default, from its factory where it has one."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``{dotted key: YAML value}`` (the one parser of them)."""
    dotted: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.query_size=5")
        dotted[key.strip()] = yaml.safe_load(raw)
    return dotted


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


_ADAPTER = TypeAdapter(MetarecConfig)
_KIND = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}
_BOUND = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _describe(error: dict[str, Any], where: str) -> str:
    """One pydantic error as ``key: got value; expected what (file)``."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    if kind == "unexpected_keyword_argument":
        section = _section(loc[:-1])
        known = sorted(f.name for f in dataclasses.fields(section))
        return f"{name}: unknown config key; expected one of {known} ({where})"
    if kind in _KIND:
        expected = _KIND[kind]
    elif kind == "literal_error":
        expected = f"one of [{ctx['expected'].replace(' or ', ', ')}]"
    elif kind in ("dataclass_type", "dataclass_args_type"):
        expected = "a mapping"
    elif kind in ("tuple_type", "list_type", "too_short"):
        expected = "a list" if kind != "too_short" else "a non-empty list"
    elif set(ctx) & set(_BOUND):
        bounds = {k: v for k, v in ctx.items() if k in _BOUND}
        noun = "a float" if any(isinstance(v, float) for v in bounds.values()) else "an int"
        expected = " and ".join(f"{noun} {_BOUND[k]} {v:g}" for k, v in bounds.items())
    else:
        expected = error["msg"]
    return f"{name or 'config'}: got {value!r}; expected {expected} ({where})"


def _section(path: list[Any]) -> Any:
    """The config dataclass at ``path`` (a list of section names)."""
    node: Any = MetarecConfig
    for part in path:
        node = get_type_hints(node)[part]
    return node
