"""Inputs are bounded and outputs never go through a planted symlink: a config or checkpoint
path that is a device, FIFO or directory, or too large, is refused at once with one line;
any TOML the parser chokes on is one ConfigError line; sizes that cannot fit are refused
before anything is allocated; an atomic write replaces a symlink instead of following it."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError, options
from kernel.run import checkpoint as ckpt
from kernel.run.config import load, loads
from kernel.run.files import InputError, read_regular, write_atomic
from kernel.run.runner import execute


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "pipe.toml"
    os.mkfifo(p)
    return p


def test_devices_fifos_directories_and_large_files_are_refused_without_blocking(
        tmp_path: Path, fifo: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    cases = {"/dev/zero": "is not a regular file", str(fifo): "is not a regular file",
             str(tmp_path): "is a directory", str(big): "is 101 bytes; the limit is 100",
             str(tmp_path / "none"): "does not exist"}
    for path, why in cases.items():
        with pytest.raises(InputError, match=why):
            read_regular(path, 100, "config file")
    assert read_regular(big, 101, "x") == b"x" * 101


def test_config_and_checkpoint_paths_that_are_not_regular_files_are_refused(
        tmp_path: Path, fifo: Path) -> None:
    for p in ("/dev/zero", fifo):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load(p)
        with pytest.raises(ckpt.CheckpointError, match="is not a regular file"):
            ckpt.read(p)
    with pytest.raises(ckpt.CheckpointError, match="is not a regular file"):
        (tmp_path / "run").mkdir()
        os.symlink("/dev/zero", tmp_path / "run" / "checkpoint.fl")
        execute(None, resume=tmp_path / "run", quiet=True)


toml_text = st.text(alphabet=st.sampled_from(list("[]{}=.,\"'#\n abc19_-+:eE")), max_size=80)


@settings(max_examples=200)
@given(st.one_of(toml_text, st.integers(1, 3000).map(lambda n: "a = " + "[" * n + "]" * n),
                 st.integers(1, 3000).map(lambda n: "a = " + "{b = " * n + "1" + "}" * n),
                 st.integers(4000, 20000).map(lambda n: "[run]\nseed = " + "7" * n)))
def test_any_toml_text_is_a_config_or_one_config_error_line(text: str) -> None:
    try:
        loads(text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400


finite = st.floats(allow_nan=False, allow_infinity=False)
non_finite = st.sampled_from([math.inf, -math.inf, math.nan])


@settings(max_examples=60)
@given(st.recursive(finite | non_finite, lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=2), c, max_size=3), max_leaves=8))
def test_options_refuse_any_non_finite_number_anywhere_in_a_value(value: Any) -> None:
    def has_non_finite(x: Any) -> bool:
        if isinstance(x, float):
            return not math.isfinite(x)
        items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        return any(has_non_finite(v) for v in items)

    if has_non_finite(value):
        with pytest.raises(ConfigError, match=r"\[s\] k = .*not a finite number"):
            options("s", {"k": value}, {"k": None})
    else:
        assert options("s", {"k": value}, {"k": None})["k"] == value


def test_an_infinity_is_accepted_only_where_the_default_is_one() -> None:
    assert options("c", {"restart": math.inf}, {"restart": math.inf})["restart"] == math.inf
    with pytest.raises(ConfigError, match="not a finite number"):
        options("c", {"restart": math.nan}, {"restart": math.inf})
    with pytest.raises(ConfigError, match=r"\[workload\] lr = inf: not a finite number"):
        execute({"protocol": {"name": "fedavg"}, "workload": {"lr": math.inf}}, quiet=True)


@pytest.mark.parametrize("config, what", [
    ({"protocol": {"name": "fedavg"}, "workload": {"clients": 10**9}},
     r"\[workload\] clients = 1000000000, model 'mlp' \(203264 parameters\) needs at least "
     r"[\d,.]+ GiB of memory; this machine has [\d,.]+ [GM]iB available"),
    ({"protocol": {"name": "fedavg"}, "workload": {"model": "flat", "flat_size": 10**13}},
     r"model 'flat' \(10000000000000 parameters\) needs at least"),
    ({"protocol": {"name": "gossip", "nodes": 10**9}}, r"\[protocol\] nodes = 1000000000"),
])
def test_sizes_that_cannot_fit_are_refused_up_front_with_an_estimate(
        config: dict[str, Any], what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        execute(config, quiet=True)


def test_an_atomic_write_replaces_a_planted_symlink_and_never_writes_through_it(
        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "result.json"
    os.symlink(victim, link)
    write_atomic(link, ["{}", "\n"])
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "{}\n"
    assert sorted(os.listdir(tmp_path)) == ["result.json", "victim"]


def test_concurrent_atomic_writes_leave_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    barrier = threading.Barrier(2, timeout=10)

    def write(b: bytes) -> None:
        barrier.wait()
        write_atomic(target, [b * 1000])

    # Each writer has its own temporary file: the target is one writer's bytes, never a mix.
    threads = [threading.Thread(target=write, args=(c,)) for c in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert target.read_bytes() in (b"a" * 1000, b"b" * 1000)
