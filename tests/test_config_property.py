"""Property-based: random mixes of valid and invalid overrides. Every invalid one is caught
before any data loads with one ConfigError; every valid one composes and builds."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmlrun.assemble import validate_config
from dmlrun.errors import ConfigError
from tests.conftest import compose_cfg

# value -> is it valid on its own?
VALUES = {
    "model.embedding_dim": {-1: False, 0: False, 2: True, 64: True},
    "sampler.p": {1: False, 2: True, 10: True, 11: False},
    "sampler.k": {1: False, 2: True, 25: True},
    "optimizer.lr": {-0.1: False, 0.001: True},
    "trainer.max_epochs": {0: False, 1: True, 4: True},
    "trainer.nonfinite": {"stop": True, "skip": True, "sometimes": False},
    "trainer.monitor": {"precision_at_1": True, "map_at_r": True, "accuracy": False},
    "trainer.amp": {"auto": True, "true": True, "fast": False},
    "evaluation.knn_k": {0: False, 5: True},
}
GROUPS = {"loss": ["contrastive", "triplet", "lifted"], "miner": ["none", "hard", "semihard"],
          "distance": ["euclidean", "squared"]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({k: st.sampled_from(list(v)) for k, v in VALUES.items()}),
       st.fixed_dictionaries({k: st.sampled_from(v) for k, v in GROUPS.items()}))
def test_invalid_overrides_are_caught_and_valid_ones_build(values, groups):
    overrides = [f"{k}={v}" for k, v in {**groups, **values}.items()]
    cfg = compose_cfg(overrides)
    invalid = [k for k, v in values.items() if not VALUES[k][v]]
    if invalid:
        with pytest.raises(ConfigError) as err:
            validate_config(cfg)
        message = str(err.value)
        assert "\n" not in message.strip() and len(message) < 600
    else:
        parts = validate_config(cfg)
        assert parts.loss is not None and parts.sampler is not None


@pytest.mark.parametrize("override,match", [
    ("model.embedding_dim=0", "model=.*embedding_dim"), ("loss.margin=-1", "margin"),
    ("sampler.p=1", "p >= 2"), ("sampler.p=11", "sampler.p=11"), ("sampler.k=1", "k >= 2"),
    ("optimizer.lr=-1", "optimizer=.*learning rate"), ("trainer.max_epochs=0", "max_epochs"),
    ("evaluation.knn_k=0", "knn_k"), ("dataset.labeled_per_class=1", "labeled_per_class"),
])
def test_each_invalid_value_names_its_setting(override, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(compose_cfg([override]))


def test_compile_modes_are_checked():
    with pytest.raises(ConfigError, match="trainer.compile must be one of"):
        validate_config(compose_cfg(["trainer.compile=fast"]))
    validate_config(compose_cfg(["trainer.compile=reduce-overhead"]))
