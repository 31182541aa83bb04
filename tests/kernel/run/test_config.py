"""Config loading, overrides, validation of the kernel's sections, and the TOML writer."""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.run.config import (
    DEFAULT_CONFIG_TOML,
    SECTIONS,
    WALL_TIME_LIMIT_S,
    ConfigError,
    apply_overrides,
    default_config,
    dumps,
    load,
    options,
    parse_value,
    validate,
)

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = '[protocol]\nname = "fedavg"\n'


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- loading and defaults ----------------------------------------------------------------------

def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg["run"] == {"seed": 0, "rounds": 5, "progress": True}
    assert cfg["transport"] == {"kind": "inproc"}
    assert cfg["protocol"] == {"name": "fedavg"}
    assert WALL_TIME_LIMIT_S == 600.0


def test_every_run_key_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL + (
        "[run]\nseed = 7\nrounds = 2\ntime_limit = 30\nmax_events = 1000\nprogress = false\n"
    )
    cfg = load(write(tmp_path, text))
    assert cfg["run"] == {"seed": 7, "rounds": 2, "time_limit": 30.0, "max_events": 1000,
                          "progress": False}
    assert isinstance(cfg["run"]["time_limit"], float)


def test_output_section_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL + '[output]\ndir = "somewhere"\nsave_model = false\n'))
    assert cfg["output"] == {"dir": "somewhere", "save_model": False}
    with pytest.raises(ConfigError, match=r"\[output\] has no key 'dri'; did you mean 'dir'\?"):
        load(write(tmp_path, MINIMAL + '[output]\ndri = "x"\n'))


def test_sections_owned_elsewhere_pass_through_untouched(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[workload]\nmodel = "mlp"\n[network.latency]\nkind = "uniform"\nlow = 0.1\n'
        '[codec]\ncompression = "lz4"\n[perf]\nrepeats = 3\n[transport]\nkind = "ray"\nshards = 2\n'
    )
    cfg = load(write(tmp_path, text))
    assert cfg["workload"] == {"model": "mlp"}
    assert cfg["network"] == {"latency": {"kind": "uniform", "low": 0.1}}
    assert cfg["codec"] == {"compression": "lz4"}
    assert cfg["perf"] == {"repeats": 3}
    assert cfg["transport"] == {"kind": "ray", "shards": 2}


def test_module_attribute_names_are_accepted() -> None:
    cfg = validate({"protocol": {"name": "tests.kernel.run.test_runner:build_toy"}})
    assert cfg["protocol"]["name"] == "tests.kernel.run.test_runner:build_toy"


def test_validate_is_idempotent_and_does_not_touch_its_input() -> None:
    given_cfg = {"protocol": {"name": "fedavg"}, "run": {"time_limit": 3}}
    once = validate(given_cfg)
    assert validate(once) == once
    assert given_cfg == {"protocol": {"name": "fedavg"}, "run": {"time_limit": 3}}


def test_default_config_is_workload_w1() -> None:
    w1 = tomllib.loads((ROOT / "perf" / "workloads" / "w1.toml").read_text())
    assert tomllib.loads(DEFAULT_CONFIG_TOML) == w1
    assert default_config(["run.seed=4"])["run"]["seed"] == 4


# -- errors name the key, the value and what is allowed ------------------------------------------

@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("seed = -1", r"\[run\] seed = -1 is not allowed; expected an integer >= 0"),
        ('seed = "x"', r"\[run\] seed = 'x' is a string; expected an integer"),
        ("seed = true", r"\[run\] seed = True is a boolean; expected an integer"),
        ("seed = 1.5", r"\[run\] seed = 1.5 is a number; expected an integer"),
        ("rounds = 0", r"\[run\] rounds = 0 is not allowed; expected an integer >= 1"),
        ("time_limit = 0",
         r"\[run\] time_limit = 0 is not allowed; expected a number of seconds > 0"),
        ('time_limit = "1h"', r"\[run\] time_limit = '1h' is not allowed; expected a number"),
        ("max_events = 0", r"\[run\] max_events = 0 is not allowed; expected an integer >= 1"),
        ("max_events = 2.5", r"\[run\] max_events = 2.5 is not allowed; expected an integer >= 1"),
        ('progress = "yes"', r"\[run\] progress = 'yes' is a string; expected a boolean"),
        ("sead = 1", r"\[run\] has no key 'sead'; did you mean 'seed'\? Allowed keys: "
                     r"checkpoint_every, max_events, progress, rounds, seed, time_limit"),
    ],
)
def test_bad_run_values(tmp_path: Path, line: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(write(tmp_path, MINIMAL + "[run]\n" + line + "\n"))


def test_unknown_section_suggests_the_near_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, MINIMAL + "[netwrk]\nloss = 0.1\n"))
    msg = str(err.value)
    assert "unknown section [netwrk]; did you mean [network]?" in msg
    for section in SECTIONS:
        assert section in msg


def test_top_level_scalar_is_not_a_section() -> None:
    expected = r"top-level key 'run' = 3 is an integer; \[run\] must be a table"
    with pytest.raises(ConfigError, match=expected):
        validate({"run": 3, "protocol": {"name": "fedavg"}})


def test_unknown_transport_kind_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"transport": {"kind": "rya"}, "protocol": {"name": "fedavg"}})
    msg = str(err.value)
    assert "[transport] kind = 'rya' is not a known transport; did you mean 'ray'?" in msg
    assert "grpc, inproc, ray" in msg


def test_transport_kind_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match=r"\[transport\] kind = 3 is not a known transport"):
        validate({"transport": {"kind": 3}, "protocol": {"name": "fedavg"}})


def test_protocol_name_is_required_and_must_be_known() -> None:
    with pytest.raises(ConfigError, match=r"\[protocol\] name is missing; choose one of .*fedavg"):
        validate({})
    with pytest.raises(ConfigError,
                       match=r"\[protocol\] name = 'fedavgg' is not a known protocol; "
                             r"did you mean 'fedavg'\?"):
        validate({"protocol": {"name": "fedavgg"}})


def test_bad_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[run]\nseed = = 3\n", name="broken.toml")
    with pytest.raises(ConfigError, match=r"broken\.toml: invalid TOML: .*line 4"):
        load(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file '.*nope\.toml' does not exist"):
        load(tmp_path / "nope.toml")


def test_options_refuses_unknown_keys_wrong_types_and_choices() -> None:
    defaults = {"lr": 0.1, "opt": "sgd", "extra": None}
    assert options("protocol", {"lr": 1}, defaults) == {"lr": 1.0, "opt": "sgd", "extra": None}
    assert options("protocol", {"extra": [1]}, defaults)["extra"] == [1]
    with pytest.raises(ConfigError, match=r"\[protocol\] has no key 'l'"):
        options("protocol", {"l": 1}, defaults)
    with pytest.raises(ConfigError, match=r"\[protocol\] lr = 'x' is a string; expected a number"):
        options("protocol", {"lr": "x"}, defaults)
    with pytest.raises(ConfigError, match=r"opt = 'adam' is not allowed; choose one of 'sgd'"):
        options("protocol", {"opt": "adam"}, defaults, choices={"opt": ["sgd"]})


# -- overrides ---------------------------------------------------------------------------------

def test_overrides_set_typed_values_at_dotted_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL + "[network]\nloss = 0.0\n"), [
        "transport.kind=ray",
        "run.seed=3",
        "protocol.lr=0.1",
        "network.latency.kind=uniform",
        "network.latency.range=[0.1, 0.2]",
        "run.progress=false",
        'protocol.note="two words"',
        "protocol.label = two words",
        "protocol.name=fedavg",
    ])
    assert cfg["transport"]["kind"] == "ray"
    assert cfg["run"]["seed"] == 3
    assert cfg["protocol"] == {"name": "fedavg", "lr": 0.1, "note": "two words",
                               "label": "two words"}
    assert cfg["network"] == {"loss": 0.0, "latency": {"kind": "uniform", "range": [0.1, 0.2]}}
    assert cfg["run"]["progress"] is False


def test_overridden_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[run\] seed = 'abc' is a string"):
        load(write(tmp_path, MINIMAL), ["run.seed=abc"])
    with pytest.raises(ConfigError, match=r"\[run\] has no key 'sead'; did you mean 'seed'"):
        load(write(tmp_path, MINIMAL), ["run.sead=1"])


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("run.seed", r"override 'run.seed' is not of the form section.key=value"),
        ("=3", r"override '=3' is not of the form"),
        ("run..seed=3", r"override 'run..seed=3' is not of the form"),
        ("seed=3", r"override 'seed=3' sets top-level key 'seed'; .* run\.seed=\.\.\."),
        ("run.seed.x=1", r"override 'run.seed.x=1': run.seed is an integer \(0\), not a table"),
    ],
)
def test_malformed_overrides(item: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"run": {"seed": 0}}, [item])


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("-2", -2), ("0.5", 0.5), ("1e3", 1000.0), ("true", True), ("false", False),
     ("[1, 2]", [1, 2]), ('"ray"', "ray"), ("ray", "ray"), ("1.2.3", "1.2.3"),
     ("{a = 1}", {"a": 1}), ("", ""), ("inf", math.inf)],
)
def test_parse_value(text: str, value: Any) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20))
def test_parse_value_never_fails_and_plain_words_stay_strings(text: str) -> None:
    value = parse_value(text)
    if text.isidentifier() and text not in ("true", "false", "inf", "nan"):
        assert value == text


# -- the TOML writer ---------------------------------------------------------------------------

keys = st.text(min_size=1, max_size=6)
scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.dates()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
tables = st.recursive(
    st.dictionaries(keys, values, max_size=4),
    lambda inner: st.dictionaries(keys, inner | values, max_size=4),
    max_leaves=6,
)


@given(st.dictionaries(keys, tables, max_size=4))
def test_dumps_round_trips_through_tomllib(config: dict[str, Any]) -> None:
    assert tomllib.loads(dumps(config)) == config


def test_dumps_writes_special_floats_and_times() -> None:
    cfg = {"a": {"x": math.inf, "y": -math.inf, "t": dt.datetime(2024, 1, 2, 3, 4, 5)}}
    back = tomllib.loads(dumps(cfg))
    assert back == cfg
    assert math.isnan(tomllib.loads(dumps({"a": {"n": math.nan}}))["a"]["n"])


def test_dumps_leaves_out_none_and_refuses_what_toml_cannot_hold() -> None:
    assert tomllib.loads(dumps({"run": {"seed": 1, "time_limit": None}})) == {"run": {"seed": 1}}
    with pytest.raises(ConfigError, match=r"config value .*object.* TOML cannot hold it"):
        dumps({"run": {"x": object()}})


def test_validated_configs_round_trip(tmp_path: Path) -> None:
    text = MINIMAL + '[run]\ntime_limit = 2\n[network.latency]\nkind = "fixed"\n[codec]\n'
    cfg = load(write(tmp_path, text), ["protocol.lr=0.5"])
    again = load(write(tmp_path, dumps(cfg), name="again.toml"))
    assert again == cfg
