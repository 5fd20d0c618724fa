import pytest

from metarec.config import SCENARIOS, MetarecConfig, apply_overrides, load_config
from metarec.errors import ConfigError


def test_defaults_round_trip_through_dict():
    cfg = MetarecConfig()
    assert MetarecConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.data.scenarios == SCENARIOS


def test_yaml_then_set_then_flags_override_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ndata:\n  query_size: 5\n  min_ratings: 8\n")
    cfg = load_config(path, overrides=["data.query_size=6", "seed=4"], **{"seed": 5})
    assert (cfg.seed, cfg.data.query_size, cfg.data.min_ratings) == (5, 6, 8)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  querysize: 5\n")
    with pytest.raises(ConfigError, match=r"data\.querysize: unknown config key.*c\.yaml"):
        load_config(path)


def test_wrong_type_is_rejected_not_coerced():
    with pytest.raises(ConfigError, match=r"data\.query_size: got '5'; expected int"):
        load_config(None, **{"data.query_size": "5"})
    with pytest.raises(ConfigError, match="data.download: got 1; expected bool"):
        load_config(None, overrides=["data.download=1"])


def test_closed_choices_list_the_allowed_values():
    with pytest.raises(ConfigError, match=r"data\.source: got 'movielens'; expected one of"):
        load_config(None, **{"data.source": "movielens"})
    with pytest.raises(ConfigError, match=r"data\.scenarios\[1\]: got 'cold'"):
        load_config(None, **{"data.scenarios": "user_cold,cold"})


def test_scenarios_accept_a_comma_list():
    cfg = load_config(None, **{"data.scenarios": "warm, temporal"})
    assert cfg.data.scenarios == ("warm", "temporal")


@pytest.mark.parametrize(
    ("key", "value", "msg"),
    [
        ("data.query_size", 0, "data.query_size: got 0; expected an int >= 1"),
        ("data.min_ratings", 10, "data.min_ratings: got 10; expected an int > data.query_size"),
        ("data.split", [0.5, 0.5, 0.5], "data.split: got"),
        ("data.synthetic.n_items", 5, "data.synthetic.n_items: got 5"),
    ],
)
def test_cross_field_constraints(key, value, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, **{key: value})


def test_apply_overrides_returns_a_validated_copy():
    cfg = apply_overrides(MetarecConfig(), **{"data.query_size": 4})
    assert cfg.data.query_size == 4
    with pytest.raises(ConfigError):
        apply_overrides(cfg, **{"data.query_size": -1})


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)


def test_ridge_solver_needs_a_linear_head_and_a_penalty():
    ridge = {"meta.inner_solver": "ridge", "meta.adapt": "head", "meta.proximal": 0.0}
    with pytest.raises(ConfigError, match="meta.adapt: got 'mlp'; expected 'head'"):
        load_config(None, **{**ridge, "meta.adapt": "mlp"})
    with pytest.raises(
        ConfigError,
        match=r"meta.prior_precision: got 0.0; expected null \(chosen on validation users\) or",
    ):
        load_config(None, **ridge, **{"meta.prior_precision": 0.0})
    with pytest.raises(ConfigError, match="meta.proximal: got 1.0; expected 0 with"):
        load_config(None, **{**ridge, "meta.proximal": 1.0})
    cfg = load_config(None, **ridge, **{"meta.prior_precision": 3.0})
    assert (cfg.meta.inner_solver, cfg.meta.prior_precision) == ("ridge", 3.0)
    with pytest.raises(ConfigError, match="meta.support_prior: got 2"):
        load_config(None, **ridge, **{"meta.support_prior": 2})


def test_factor_head_needs_the_ridge_solver_and_item_embeddings():
    gd = {"meta.inner_solver": "gd", "meta.adapt": "mlp", "model.factor_head": True}
    with pytest.raises(ConfigError, match="meta.inner_solver: got 'gd'; expected 'ridge'"):
        load_config(None, **gd)
    ridge = {"meta.inner_solver": "ridge", "meta.adapt": "head", "meta.proximal": 0.0}
    with pytest.raises(ConfigError, match="model.item_id_embedding: got False"):
        load_config(None, **ridge, **{"model.factor_head": True, "model.item_id_embedding": False})
    with pytest.raises(ConfigError, match="meta.support_prior: got -1"):
        load_config(None, **{"meta.support_prior": -1})
