"""The sections of the config tree, one frozen pydantic dataclass each (``metarec.config``
assembles, loads and checks them).

Every setting a run, a sweep, an evaluation or a server takes is a field here, with its
default and its bounds: the one place either is stated. CLI flags are generated from these
fields (``metarec.options``), ``serve/config.yaml``'s ``args:`` are the ``serve`` section, and
``--set KEY=VALUE`` reaches every key.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass as _pydantic_dataclass

__all__ = [
    "ALGORITHMS",
    "DEFAULT_NEIGHBOURS",
    "DEFAULT_PRIOR_PRECISION",
    "HARD_MAX_ITEMS",
    "SCENARIOS",
    "SOURCES",
    "DataConfig",
    "EvaluateConfig",
    "LimitsConfig",
    "MetaConfig",
    "ModelConfig",
    "ReportConfig",
    "ServeConfig",
    "SyntheticConfig",
    "TrainConfig",
    "TuneConfig",
]

Scenario = Literal["user_cold", "warm", "item_cold", "user_item_cold", "temporal"]
Algorithm = Literal["maml", "fomaml", "metasgd", "anil", "reptile"]
Adapt = Literal["head", "mlp", "all"]
InnerSolver = Literal["gd", "ridge"]
Dtype = Literal["float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]
Placement = Literal["PACK", "SPREAD", "STRICT_SPREAD"]
SearchAlg = Literal["random", "optuna"]
RatingScale = Literal["1-5", "0.5-5", "1-10"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
Source = Literal["synthetic", "ml-100k", "ml-1m", "ml-latest", "ratings", "events", "interactions"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
SOURCES: tuple[str, ...] = get_args(Source)


def _comma_list(value: Any) -> Any:
    """``--set data.scenarios=warm,temporal``: a comma list where a list is expected."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value) if isinstance(value, list) else value


Scenarios = Annotated[tuple[Scenario, ...], BeforeValidator(_comma_list)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]


def dataclass(cls: type) -> type:
    """A frozen pydantic dataclass that refuses unknown keys and coerces nothing silently."""
    config = ConfigDict(strict=True, extra="forbid")
    return _pydantic_dataclass(frozen=True, config=config)(cls)


DEFAULT_PRIOR_PRECISION = 10.0  # ridge prior precision / ALS penalty when nothing chooses
DEFAULT_NEIGHBOURS = 200  # model.neighbours with the ridge solver


@dataclass
class SyntheticConfig:
    """Planted-preference generator; see ``metarec.data.synthetic``."""

    # users to generate (before the rating-count filter)
    n_users: Annotated[int, Field(ge=10)] = 2000
    n_items: Annotated[int, Field(ge=20)] = 1000  # catalogue size
    min_ratings_per_user: int = 15  # each user's rating count is uniform in [min, max]
    max_ratings_per_user: int = 80
    # a > 0: rating counts follow a power law instead, min x Pareto(a) capped at max (most
    # users rate few items, a few rate thousands: MovieLens' shape)
    activity_pareto: NonNegative = 0.0
    latent_dim: PositiveInt = 8  # rank of the planted user x item preference
    noise: NonNegative = 0.35  # std of rating noise, in stars
    drift: NonNegative = 1.0  # how far a user's taste moves between first and last rating
    user_features: bool = True  # false: no user table (age still shapes ratings, unseen)
    scale: RatingScale = "1-5"  # whole stars, half stars (MovieLens latest) or 1-10 points
    popularity_zipf: float = 0.0  # 0: log-normal item popularity; a > 0: P(rank r) ~ r^-a
    # implicit: a shop's event log (views, carts, purchases; metarec.data.shop) instead of
    # ratings; min/max_ratings_per_user then count the items each user views
    feedback: Literal["explicit", "implicit"] = "explicit"


@dataclass
class DataConfig:
    """How raw ratings become meta-learning tasks (`metarec prepare`)."""

    source: Source = "synthetic"
    input: str | None = None  # local directory (MovieLens) or file (generic ratings)
    items: str | None = None  # generic source only: optional item feature table
    users: str | None = None  # generic source only: optional user feature table
    download: bool = False  # fetch the MovieLens zip from GroupLens when input is missing
    feedback: str | None = None  # a `metarec serve` feedback log directory to fold in
    # events source: an event's weight by name; an interaction's strength is the sum of its
    # events' weights (times their value column, e.g. a play count, where there is one)
    event_weights: dict[str, Positive] = field(
        default_factory=lambda: {"view": 1.0, "cart": 3.0, "purchase": 5.0}
    )
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
    # neighbours per item of the neighbourhood term (item-KNN's estimate from the support,
    # its weight fitted per user by the ridge head); 0: none. None: 200 with the ridge
    # solver, else 0 (chosen on validation users: defaults-log §9, §10)
    neighbours: Annotated[int, Field(ge=0)] | None = None


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
    # ratings: the outer (query) loss is Huber's, squared error within this many standard
    # deviations of the training ratings and linear beyond, so a few far-off ratings do not
    # steer the prior; 0: squared error throughout (chosen on validation users: defaults-log
    # §11). The ridge inner solve stays least squares.
    huber: NonNegative = 1.0
    meta_batch_size: PositiveInt = 32  # tasks per meta-update
    resample_query: bool = True  # re-split each training user's ratings every epoch
    # a training task adapts on at most this many support ratings, a random window of its
    # history drawn again each epoch (with resample_query): heavy users are kept, and cost
    # a meta-batch no more than this. None: whole supports
    support_window: PositiveInt | None = 256
    # share of training tasks per meta-batch whose support is cut to a uniform random
    # fraction (0 included): trains the prior for users with few or no ratings, whom a
    # query loss on whole supports never scores (chosen on validation users: defaults-log §6)
    short_supports: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    # implicit feedback: the inner and outer loss on positives against sampled negatives
    # (bpr chosen on validation users of the synthetic shop: defaults-log §9)
    implicit_loss: Literal["bce", "bpr"] = "bpr"
    negatives: PositiveInt = 100  # negatives drawn per task's support, and again per query
    # share of those drawn by item popularity, the rest uniform over the catalogue (0:
    # uniform, as implicit ALS treats every unobserved item; chosen on validation users of
    # the synthetic shop with the neighbourhood term: defaults-log §9)
    popular_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


@dataclass
class TrainConfig:
    """The training loop (in-process here; Ray Train wraps the same loop)."""

    scenario: Scenario = "user_cold"
    epochs: PositiveInt = 40
    patience: PositiveInt = 10  # stop after this many epochs without a better valid MAE
    eval_batch_size: PositiveInt = 256  # tasks adapted at once during validation/evaluation
    device: Device = "auto"
    dtype: Dtype = "float32"  # float64: slow, but runs on 1 and N workers then agree to 1e-9
    workers: PositiveInt = 2  # Ray Train workers (metarec train)
    use_gpu: bool | None = None  # one GPU per worker; None: when CUDA is available
    cpus_per_worker: Positive | None = None  # None: leave one CPU for Ray Data, at most 1 each
    # Ray's placement of the workers across nodes: STRICT_SPREAD puts each on its own node
    placement: Placement = "PACK"
    # a training item table's gradient across workers: "sparse" sends the rows a meta-batch
    # touched (a union mask, then those rows); "dense" the whole table. Same sums, bit for bit
    item_sync: Literal["sparse", "dense"] = "sparse"


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


Seeds = Annotated[tuple[int, ...], Field(min_length=1)]


@dataclass
class EvaluateConfig:
    """``metarec evaluate`` and ``report``: the seeds, the user splits, the CIs, the baselines."""

    seeds: Seeds = (0,)  # init seeds within each user split (network init, batching, MF)
    # re-split each scenario's users with these seeds (the split `prepare --split-seed N`
    # writes) and evaluate on every split; None: the prepared split
    split_seeds: Seeds | None = None
    bootstrap: Annotated[int, Field(ge=1000)] = 2000  # resamples of the paired CIs
    baselines: str = "all"  # comma-separated subset of metarec.evaluate.BASELINES, all, none
    # ratings >= this are relevant for the ranking metrics; None: 0.8 x the top rating
    relevance_threshold: float | None = None
    # choose the meta-learner's test-time knobs on validation users (False: as trained)
    tune_adaptation: bool = True
    # implicit data: validation and test users adapt on at most this many support
    # interactions (a new customer's first few); their other ones are neither ranked nor
    # positives. None: the whole support
    max_support: PositiveInt | None = None
    # the knobs and every baseline's grid are chosen on validation users holding at most
    # this many ratings in all: on larger data, a random sample of them (per init seed),
    # as MF's grid is compared on a sample of training users. None: every validation user
    tune_ratings: PositiveInt | None = 500_000
    # score test users with Ray Data (map_batches) on this many actors, joining or starting
    # Ray; 0: in this process. Only scoring moves: fits and choices stay in the driver
    workers: NonNegativeInt = 0


@dataclass
class ReportConfig:
    """What ``metarec report`` adds to an evaluation: more seeds, and its curves."""

    seeds: Seeds = (0, 1, 2)  # init seeds within each user split
    # shot curve: support ratings per test user (0: cold start)
    shots: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(min_length=1)] = (
        0,
        1,
        2,
        4,
        8,
        16,
        32,
    )
    curve_steps: Annotated[int, Field(ge=0)] = 10  # step curve: 0..N inner steps


HARD_MAX_ITEMS = 100_000  # no list in a request is longer, whatever the configuration
RequestCap = Annotated[int, Field(ge=1, le=HARD_MAX_ITEMS)]


@dataclass
class LimitsConfig:
    """Request limits the service enforces (a 422 naming the field past them)."""

    max_ratings: RequestCap = 200  # ratings per request and per session
    max_k: RequestCap = 100  # largest k
    max_items: RequestCap = 1000  # /v1/predict items, /v1/recommend candidates


@dataclass
class RetrievalConfig:
    """Two-stage scoring of large catalogues: retrieve candidates by inner product, re-rank
    them with the adapted network (``serving/retrieval.py``; docs/serving.md)."""

    # catalogues up to this size: the network scores every item (exact, no retrieval)
    full_below: NonNegativeInt = 20_000
    # above it, retrieval is a FAISS IVF index instead of an exact blocked matmul
    ann_above: NonNegativeInt = 200_000
    candidates: PositiveInt = 500  # retrieved per user, then re-ranked
    nprobe: PositiveInt = 32  # IVF lists searched per query


@dataclass
class ServeConfig:
    """``metarec serve``, and ``args:`` of ``serve/config.yaml``: the model, each replica's
    settings, and the deployment (address, replicas, micro-batching)."""

    model: str | None = None  # models:/NAME@ALIAS, runs:/..., a checkpoint; None: champion
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in work_dir
    work_dir: str = "work"  # MLflow store and, by default, the feedback log
    feedback_dir: str | None = None  # None: <work_dir>/feedback
    steps: Annotated[int, Field(ge=0, le=100)] | None = None  # inner steps; None: the model's
    device: Device = "auto"
    threads: PositiveInt | None = None  # torch threads per replica; None: torch's default
    max_sessions: PositiveInt = 1000  # session LRU size; each caches one user's fast weights
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    host: str = "127.0.0.1"  # bind address (0.0.0.0: every interface)
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    replicas: PositiveInt = 1  # Serve replicas (processes); sessions live per replica
    num_cpus: Positive = 1.0  # Ray CPUs per replica
    max_batch_size: PositiveInt = 32  # requests adapted together; 1: no micro-batching
    batch_wait_ms: NonNegative = 2.0  # how long a batch waits to fill
    access_log: bool = False  # Serve's per-request log line (slows the HTTP path)
