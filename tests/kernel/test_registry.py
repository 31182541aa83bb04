"""Names in configs resolve only to what was declared: a 'module:attr' that names anything
else is refused with one line before it is called, for every group."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import registry
from kernel.registry import GROUPS, NotDeclared, UnknownName, declare


@declare("aggregators")
def declared_aggregator(updates: Any) -> Any:
    return updates


class DeclaredBase:
    pass


declare("models")(DeclaredBase)


class Subclass(DeclaredBase):
    """Inherits the marker attribute, but was not declared itself."""


calls: list[str] = []


def undeclared(*args: Any, **kwargs: Any) -> None:
    calls.append("called")


# Callables an attacker might name: none of them declares itself.
DANGEROUS = ["subprocess:getoutput", "builtins:exec", "builtins:eval", "os:system",
             "os.path:join", "shutil:rmtree", "importlib:import_module",
             "protocols.fedavg:np.random.default_rng", "kernel.registry:load",
             f"{__name__}:undeclared", f"{__name__}:Subclass"]


@pytest.fixture
def audit() -> Iterator[list[str]]:
    seen: list[str] = []
    armed = [True]

    def hook(event: str, args: Any) -> None:
        if armed[0] and event in ("exec", "os.system", "subprocess.Popen", "os.exec",
                                  "os.posix_spawn", "os.spawn"):
            seen.append(f"{event} {args!r:.80}")

    sys.addaudithook(hook)
    yield seen
    armed[0] = False


@settings(max_examples=40)
@given(st.sampled_from(DANGEROUS), st.sampled_from(GROUPS))
def test_an_undeclared_module_attr_is_refused_before_it_is_called(name: str,
                                                                    group: str) -> None:
    with pytest.raises(NotDeclared, match=rf"{group[:-1]} '{name}' is not declared as one"):
        registry.load(group, name)
    assert calls == []


def test_loading_dangerous_names_runs_no_command(audit: list[str]) -> None:
    import numpy.random  # noqa: F401  (fedloom modules and what they import: allowed code)

    import protocols.fedavg  # noqa: F401

    audit.clear()
    for name in DANGEROUS:
        with pytest.raises(UnknownName):
            registry.load("protocols", name)
    assert audit == []


@pytest.mark.parametrize("name", ["antigravity:x", "this:x", "subprocess:getoutput",
                                  "os.path:join", "idlelib.idle:main"])
def test_standard_library_names_are_refused_without_importing_them(name: str) -> None:
    module = name.partition(":")[0]
    before = module in sys.modules
    with pytest.raises(NotDeclared, match="is a standard-library module"):
        registry.load("protocols", name)
    assert (module in sys.modules) == before


def test_declared_objects_load_only_for_their_group() -> None:
    name = f"{__name__}:declared_aggregator"
    assert registry.load("aggregators", name) is declared_aggregator
    with pytest.raises(NotDeclared):
        registry.load("protocols", name)
    assert registry.load("models", f"{__name__}:DeclaredBase") is DeclaredBase


def test_entry_point_targets_count_as_declared() -> None:
    from protocols import compression

    assert registry.load("protocols", "protocols.compression:fedavg_ef") is compression.fedavg_ef
    assert registry.load("protocols", "fedavg_ef") is compression.fedavg_ef


@pytest.mark.parametrize("name", ["os:", ":system", "os:a b", "os:__import__('x')", ".evil:x",
                                  "a..b:x", "protocols.:build", "protocols.fedavg:build.",
                                  "pro tocols:x"])
def test_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(UnknownName):
        registry.load("protocols", name)


def test_the_cli_refuses_an_undeclared_protocol_in_one_line(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from kernel.run.cli import EXIT_ERROR, main

    cfg = tmp_path / "evil.toml"
    cfg.write_text('[protocol]\nname = "subprocess:getoutput"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not declared as one" in err


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from(list(".:_ab1 ()'-")), max_size=12)
       | st.sampled_from(["os", "sys", "kernel"]).map(lambda m: m + ":" + "x"))
def test_any_name_is_a_loaded_object_or_one_of_the_errors_the_runner_reports(name: str) -> None:
    # The runner turns UnknownName (one line), ImportError and AttributeError into messages;
    # anything else would be a traceback.
    with contextlib.suppress(UnknownName, ImportError, AttributeError):
        registry.load("protocols", name)
