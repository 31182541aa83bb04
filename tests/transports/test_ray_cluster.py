"""What the ray transport decides about a cluster before asking Ray anything: which address,
the sizing rule, whether a placement can ever fit, what to ship, and which failure a message
names. Pure functions on plain data: no Ray is started here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("ray")

from kernel.options import ConfigError  # noqa: E402
from transports import ray_cluster as rc  # noqa: E402
from transports.ray import check_options  # noqa: E402


@pytest.mark.parametrize(("option", "env", "want"), [
    ("", None, "local"),
    ("", "10.0.0.1:6379", "10.0.0.1:6379"),  # as under `ray job submit`
    ("auto", "10.0.0.1:6379", "10.0.0.1:6379"),
    ("auto", None, "auto"),
    ("local", "10.0.0.1:6379", "local"),  # an explicit local Ray ignores RAY_ADDRESS
    ("10.0.0.2:6379", "10.0.0.1:6379", "10.0.0.2:6379"),  # the option wins, as for ray.init
    ("ray://h:10001", None, "ray://h:10001"),
])
def test_address_follows_ray_init_rules(monkeypatch: pytest.MonkeyPatch, option: str,
                                        env: str | None, want: str) -> None:
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert rc.target(option) == want
    if env and option in ("", "auto"):
        assert "RAY_ADDRESS" in rc.joined_from(option)


@pytest.mark.parametrize(("given_opts", "named"), [
    ({"log_to_driver": "sometimes"}, "log_to_driver"),
    ({"placement_timeout": 0}, "placement_timeout"),
    ({"runtime_env": {"pip": ["x"]}}, "runtime_env.pip"),
    ({"runtime_env": {"working_dir": "/no/such/folder"}}, "working_dir"),
    ({"runtime_env": {"py_modules": "x"}}, "py_modules"),
    ({"runtime_env": {"py_modules": ["/no/such/module"]}}, "py_modules entry"),
    ({"runtime_env": {"env_vars": {"A": 1}}}, "env_vars"),
    ({"address": "10.0.0.1:6379", "temp_dir": "/tmp/x"}, "temp_dir"),
])
def test_bad_cluster_options_name_the_key(given_opts: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        check_options(given_opts)


def test_cluster_options_are_normalised(tmp_path: Path) -> None:
    o = check_options({"runtime_env": {"working_dir": str(tmp_path), "env_vars": {"A": "1"}}})
    assert o["log_to_driver"] == "errors"
    assert o["runtime_env"] == {"working_dir": str(tmp_path.resolve()), "env_vars": {"A": "1"}}
    assert check_options({"log_to_driver": True})["log_to_driver"] is True
    assert check_options({"log_to_driver": "none"})["log_to_driver"] is False


def _node(cpu: float, gpu: float = 0.0) -> dict[str, Any]:
    total = {"CPU": cpu, "memory": 1e9}
    if gpu:
        total["GPU"] = gpu
    return {"id": "n", "ip": "127.0.0.1", "total": total}


@pytest.mark.parametrize(("bundle", "shards", "strategy", "nodes", "says"), [
    ({"CPU": 1.0, "GPU": 0.5}, 1, "PACK", [_node(2)], "no node has a GPU"),
    ({"CPU": 4.0}, 1, "PACK", [_node(2), _node(2)], "largest alive node has CPU 2"),
    ({"CPU": 1.0}, 3, "STRICT_PACK", [_node(2), _node(2)], "STRICT_PACK needs {CPU: 3}"),
    ({"CPU": 1.0}, 3, "STRICT_SPREAD", [_node(4), _node(4)], "needs 3 distinct nodes"),
    ({"CPU": 1.5}, 3, "PACK", [_node(2), _node(2)], "room for 2"),
    ({"CPU": 1.0}, 1, "PACK", [], "no alive node"),
])
def test_placements_that_can_never_fit_say_why(bundle: dict[str, float], shards: int,
                                               strategy: str, nodes: list[dict[str, Any]],
                                               says: str) -> None:
    why = rc.shortfall(bundle, shards, strategy, nodes)
    assert why is not None and says in why


@given(cpus=st.lists(st.integers(0, 8), min_size=1, max_size=5),
       cps=st.sampled_from([0.5, 1.0, 2.0]), shards=st.integers(1, 12),
       strategy=st.sampled_from(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]))
def test_shortfall_is_none_exactly_when_a_greedy_assignment_exists(
        cpus: list[int], cps: float, shards: int, strategy: str) -> None:
    """Invariant: a placement is called feasible iff the bundles can be assigned to the nodes
    by the strategy's rule (checked here by direct counting)."""
    nodes = [_node(float(c)) for c in cpus]
    per = [int(c / cps + 1e-9) for c in cpus]
    if strategy == "STRICT_PACK":
        ok = any(c + 1e-9 >= cps * shards for c in cpus)
    elif strategy == "STRICT_SPREAD":
        ok = sum(1 for p in per if p >= 1) >= shards
    else:
        ok = sum(per) >= shards
    assert (rc.shortfall({"CPU": cps}, shards, strategy, nodes) is None) == ok


def test_named_user_modules_are_found_and_installed_ones_are_not(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    pkg = tmp_path / "myproto"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "algo.py").write_text("def build(config):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"protocol": {"name": "myproto.algo:build", "aggregator": "mean"},
              "workload": {"model": "numpy.random:default_rng", "data": "a/b:c"}}
    assert rc.named_modules(config) == ["myproto.algo", "numpy.random"]
    assert rc.not_installed("myproto.algo") == pkg
    assert rc.not_installed("numpy.random") is None  # installed: every node has its own
    assert rc.not_installed("protocols.fedavg") is None  # fedloom itself: installed per node
    assert rc.not_installed("no_such_module_anywhere") is None


@pytest.mark.parametrize(("message", "names"), [
    ("Version mismatch: The cluster was started with:\n Ray: 2.59.0\n Python: 3.11.7\n"
     "This process on node 10.0.0.1 was started with:\n Ray: 2.60.0\n Python: 3.11.7",
     "version mismatch"),
    ("AuthenticationError: Token authentication is enabled but no authentication token was "
     "found", "RAY_AUTH_MODE"),
    ("Failed to connect to Ray cluster at 10.0.0.9:6379", "`ray status --address"),
])
def test_join_failures_name_the_cause_and_never_advise_ray_stop(
        monkeypatch: pytest.MonkeyPatch, message: str, names: str) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    opts = check_options({"address": "10.0.0.9:6379"})
    text = rc.explain(RuntimeError(message), "10.0.0.9:6379", opts)
    assert names in text and "Fix" in text and "\n" not in text
    assert "ray stop`" not in text.replace("never `ray stop`", "")
    local = rc.explain(OSError("No space left on device"), "local", check_options({}))
    assert "never `ray stop`" in local and "transport.temp_dir" in local


def test_refused_token_advice_names_where_the_token_came_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "has it off (RAY_AUTH_MODE=<unset>)" in rc.auth_advice()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 32)
    assert "read from RAY_AUTH_TOKEN" in rc.auth_advice()


def test_dashboard_without_its_packages_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    if importlib.util.find_spec("aiohttp") is not None:
        pytest.skip("Ray's dashboard packages are installed here")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"fedloom\[ray-dashboard\]") as err:
        rc.init(check_options({"dashboard": True}))
    assert "ray stop" not in str(err.value)


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_binds_loopback_and_its_url_is_printed(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Only where the ray-dashboard extra is installed (`pip install 'fedloom[ray-dashboard]'`)."""
    pytest.importorskip("aiohttp")
    import urllib.request

    import psutil
    import ray

    from kernel.registry import load as registry_load
    from tests.transports import ray_protocols as rp
    from transports.base import Job
    from transports.ray import RayTransport

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    config = {"run": {"seed": 0, "rounds": 3},
              "protocol": {"name": rp.TICKER, "nodes": 4, "gap": 0.2}}
    tr = RayTransport({"dashboard": True, "num_cpus": 2, "temp_dir": "/tmp/fl-dash-test"})
    seen: dict[str, Any] = {}

    def on_metric(row: dict[str, Any]) -> None:
        if row["name"] == "round" and row["value"] == 1 and "status" not in seen:
            url = tr.info["dashboard"]
            seen["url"] = url
            seen["status"] = urllib.request.urlopen(url, timeout=10).status
            port = int(url.rsplit(":", 1)[1].strip("/"))
            seen["bound"] = {c.laddr.ip for c in psutil.net_connections("tcp")
                             if c.status == "LISTEN" and c.laddr.port == port}
        if row["name"] == "status":
            seen.setdefault("lines", []).append(row["value"])

    dep = registry_load("protocols", rp.TICKER)(config)
    try:
        tr.run(Job(config=config, deployment=dep, seed=0, until=120.0, on_metric=on_metric))
    finally:
        tr.close()
    assert seen["url"].startswith("http://127.0.0.1:") and seen["status"] == 200
    assert seen["bound"] == {"127.0.0.1"}
    assert "dashboard http://127.0.0.1:" in seen["lines"][0]
