"""The run's own settings (dmlrun/settings.py and each task's schema): every setting of
every schema'd group, given a value of the wrong type, out of range or not among its
choices, stops the run with one message naming the key, before any data loads; the
command exits 2."""

import dataclasses
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import open_dict

from dmlrun import settings as schema
from dmlrun.errors import ConfigError
from dmlrun.run import run
from dmlrun.semi.task import SemiSettings, ViewsSettings
from tests.conftest import compose_cfg, run_cli

# (group, schema, the overrides that make the group's settings count)
GROUPS = [
    ("trainer", schema.TrainerSettings, []),
    ("evaluation", schema.EvaluationSettings, []),
    ("dataset", schema.DatasetSettings, []),
    ("scheduler", schema.SchedulerSettings, ["scheduler=cosine_steps"]),
    ("semi", SemiSettings, ["experiment=semi_propagation"]),
    ("semi.views", ViewsSettings, ["experiment=semi_views"]),
]
# no data anywhere: a run that got as far as loading data would fail differently
NO_DATA = ["paths.data_dir=/nonexistent/dmlrun-data", "dataset.download=false"]


def bad_values(f: dataclasses.Field, kind: Any) -> list[tuple[str, str]]:
    """(override value, what is wrong) for one setting: a wrong type, and each bound or
    choice crossed."""
    m, members = f.metadata, schema._members(kind)
    out = []
    if m.get("choices") is not None:
        out.append(("no_such_choice", "choice"))
    elif int in members or float in members:
        out.append(("abc", "type"))
    elif bool in members:
        out.append(("maybe", "type"))
    elif str in members:
        out.append(("[1,2]", "type"))
    elif any(typing.get_origin(k) is list for k in members):
        out.append(("abc", "type"))
    if m.get("minimum") is not None:
        out.append((str(m["minimum"] - 1), "range"))
    for bound in ("above", "below"):
        if m.get(bound) is not None:
            out.append((str(m[bound]), "range"))
    if m.get("check") is not None:
        out.append(("0", "check"))
    return out


def cases() -> list[tuple[list[str], str, str, str]]:
    found = []
    for group, cls, base in GROUPS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is Any:
                continue  # a node with a _target_: its signature checks it
            # an optional setting may be absent from the YAML: added with ++
            add = "++" if f.default is None else ""
            found += [(base, f"{add}{group}.{f.name}", value, why)
                      for value, why in bad_values(f, hints[f.name])]
    found.append(([], "seed", "abc", "type"))
    return found


CASES = cases()


def test_every_setting_of_every_schema_has_bad_values():
    keys = {key.lstrip("+") for _, key, _, _ in CASES}
    for group, cls, _ in GROUPS:
        hints = typing.get_type_hints(cls)
        wanted = {f"{group}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is not Any}
        assert wanted <= keys
    assert {"semi.graph", "semi.refresh_every", "trainer.max_epochs"} <= keys
    assert len(CASES) > 50


def _refused(overrides: list[str], key: str, tmp_path) -> str:
    cfg = compose_cfg([*NO_DATA, *overrides])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run")
    message = str(err.value)
    assert key in message, message
    assert "\n" not in message.strip() and len(message) < 400
    assert not (tmp_path / "run" / "summary.json").exists()
    return message


@pytest.mark.parametrize("base, key, value, why", CASES,
                         ids=[f"{k}={v}" for _, k, v, _ in CASES])
def test_a_bad_value_is_one_message_naming_its_key_before_data(base, key, value, why,
                                                              tmp_path):
    _refused([*base, f"{key}={value}"], key.lstrip("+"), tmp_path)


INT_BOUNDS = [("++" + group if f.default is None else group, f.name, f.metadata["minimum"],
               base) for group, cls, base in GROUPS
              for f in dataclasses.fields(cls) if f.metadata.get("minimum") is not None
              and int in schema._members(typing.get_type_hints(cls)[f.name])]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(INT_BOUNDS), st.integers(min_value=-10**6, max_value=-1),
       st.sampled_from(["", ".5"]))
def test_any_number_below_a_minimum_is_refused(tmp_path, bound, below, fraction):
    group, name, minimum, base = bound
    value = f"{minimum + below}{fraction}"  # an integer below the minimum, or not an integer
    _refused([*base, f"{group}.{name}={value}"], f"{group.lstrip('+')}.{name}", tmp_path)


def test_unknown_keys_and_missing_ones_name_the_key(tmp_path):
    message = _refused(["+trainer.max_epoch=3"], "trainer", tmp_path)
    assert "max_epochs" in message  # the near miss is suggested
    with pytest.raises(ConfigError, match="trainer.max_epochs has no value"):
        cfg = compose_cfg(NO_DATA)
        with open_dict(cfg):
            del cfg.trainer["max_epochs"]
        schema.read_settings(cfg)


def test_good_values_are_read_with_their_types():
    s = schema.read_settings(compose_cfg(["trainer.warmup_epochs=1", "trainer.ema_decay=0.5",
                                          "scheduler=cosine_steps"]))
    assert s.trainer.warmup_epochs == 1.0 and isinstance(s.trainer.warmup_epochs, float)
    assert s.trainer.ema_decay == 0.5 and s.scheduler.anneal == "cosine"
    assert s.dataset.labeled_per_class is None and s.seed == 0


@pytest.mark.parametrize("override, key", [
    ("semi.graph=umap", "semi.graph"), ("semi.refresh_every=0", "semi.refresh_every"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
])
def test_the_command_exits_2_with_one_line(override, key, tmp_path):
    res = run_cli(["experiment=semi_propagation", override, *NO_DATA,
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and key in lines[0], res.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
