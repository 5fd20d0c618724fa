"""The config tree: every section (``metarec.sections``) under one root, resolved once, logged
whole.

Resolution order: defaults, then a YAML file, then ``--set dotted.key=value`` overrides and
explicit CLI flags (``load_config``, the one place all three meet). Unknown keys and mistyped
values fail at load, naming the key and where it came from (the file, ``--set`` or the flag),
so a typo never silently falls back to a default. Validation is pydantic's, in strict mode
over JSON-shaped input: the only implicit conversions are the ones YAML forces (int ->
float, list -> tuple); ``validate`` adds the constraints that span several keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

from metarec.errors import ConfigError
from metarec.sections import (
    ALGORITHMS,
    DEFAULT_NEIGHBOURS,
    DEFAULT_PRIOR_PRECISION,
    SCENARIOS,
    SOURCES,
    DataConfig,
    EvaluateConfig,
    MetaConfig,
    ModelConfig,
    ReportConfig,
    ServeConfig,
    SyntheticConfig,
    TrainConfig,
    TuneConfig,
    dataclass,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_PRIOR_PRECISION",
    "SCENARIOS",
    "SOURCES",
    "DataConfig",
    "MetaConfig",
    "MetarecConfig",
    "ServeConfig",
    "SyntheticConfig",
    "apply_overrides",
    "config_key",
    "field_default",
    "load_config",
    "parse_overrides",
    "section_from_dict",
]

Where = str | Callable[[str], str]  # where a key's value came from (a file, --set, a flag)


@dataclass
class MetarecConfig:
    """Everything a run, a sweep, an evaluation or a server needs, one section each."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML, MLflow params and Ray boundaries."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: Where = "config") -> MetarecConfig:
        """Validate a nested mapping; ``where`` names the source (or maps a key to it)."""
        source = where if callable(where) else lambda key: where
        if not isinstance(data, dict):
            raise ConfigError(f"config: got {data!r}; expected a mapping ({source('')})")
        try:  # JSON mode: strict types, yet sections as mappings and lists as tuples
            return _ADAPTER.validate_json(json.dumps(data))
        except ValidationError as e:
            raise ConfigError(_describe(e.errors()[0], source)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def factor_head(self) -> bool:
        """``model.factor_head`` resolved: its ``None`` means on exactly when the ridge
        solver and item-id embeddings are there to carry it."""
        if self.model.factor_head is not None:
            return self.model.factor_head
        return self.meta.inner_solver == "ridge" and self.model.item_id_embedding

    @property
    def neighbours(self) -> int:
        """``model.neighbours`` resolved: its ``None`` means on exactly when the ridge
        solver is there to fit the term's weight."""
        if self.model.neighbours is not None:
            return self.model.neighbours
        return DEFAULT_NEIGHBOURS if self.meta.inner_solver == "ridge" else 0

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
        _require(
            not self.model.neighbours or m.inner_solver == "ridge",
            "model.neighbours",
            self.model.neighbours,
            "0 or null with meta.inner_solver gd (the ridge head fits the neighbour weight)",
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
        seeds = self.evaluate.split_seeds or ()
        _require(
            len(set(seeds)) == len(seeds),
            "evaluate.split_seeds",
            list(seeds),
            "distinct seeds",
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
    path: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    flag_names: Mapping[str, str] | None = None,
    **flags: Any,
) -> MetarecConfig:
    """Defaults <- YAML <- ``--set`` overrides <- explicit flags (dotted keys; None = unset).

    An error names the key and its source: the file, ``--set``, or the flag that set it
    (``flag_names`` maps a dotted key to its flag)."""
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
    sources: dict[str, str] = {}
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(data, key, value)
        sources[key] = f"--set {key}"
    for key, value in flags.items():
        if value is not None:
            _set_dotted(data, key, value)
            sources[key] = (flag_names or {}).get(key, key)

    def source(key: str) -> str:
        return next(
            (sources[k] for k in sources if key == k or key.startswith((k + ".", k + "["))), where
        )

    return MetarecConfig.from_dict(data, where=source).validate()


def section_from_dict(name: str, data: Any, *, where: str) -> Any:
    """One section from a mapping (``serve/config.yaml``'s ``args:``, a replica's settings),
    checked as the whole tree is: errors name ``<section>.<key>`` and ``where``."""
    return getattr(MetarecConfig.from_dict({name: data}, where=where), name)


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


def _describe(error: dict[str, Any], where: Callable[[str], str]) -> str:
    """One pydantic error as ``key: got value; expected what (where it came from)``."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    if kind == "unexpected_keyword_argument":
        section = _section(loc[:-1])
        known = sorted(f.name for f in dataclasses.fields(section))
        return f"{name}: unknown config key; expected one of {known} ({where(name)})"
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
    return f"{name or 'config'}: got {value!r}; expected {expected} ({where(name)})"


def _section(path: list[Any]) -> Any:
    """The config dataclass at ``path`` (a list of section names)."""
    node: Any = MetarecConfig
    for part in path:
        node = get_type_hints(node)[part]
    return node
