"""Quiet under attack, on real shard processes and real gRPC on 127.0.0.1: a flood of
unauthenticated calls is refused and logged as one line per interval (and a last count when
the shard exits), not one warning each; a malformed control request from an authenticated
peer is answered with an error and logged as one line, never a traceback."""

from __future__ import annotations

import grpc
import msgpack
import pytest

from kernel.api import RunError
from tests.transports.test_grpc import WAIT_S, make_job, sha, sum_config
from transports.grpc import CONTROL, Cluster, RefusalLog, call_metadata, validate_options

pytestmark = pytest.mark.grpc
STRANGERS = 40


def test_a_flood_of_strangers_is_one_log_line_and_bad_control_requests_one_line_each(
        capfd: pytest.CaptureFixture[str]) -> None:
    cfg = sum_config()
    cluster = Cluster(make_job(cfg), validate_options({}))
    try:
        cluster.launch()
        cluster.connect()
        shard = cluster.shards[0]
        with grpc.insecure_channel(shard.address) as channel:
            control = channel.unary_unary(CONTROL)
            for _ in range(STRANGERS):
                with pytest.raises(grpc.RpcError) as info:
                    control(msgpack.packb({"op": "ping"}),
                            metadata=call_metadata("0" * 32, "stranger"), timeout=WAIT_S)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for bad, why in (({"op": "peers", "peers": 5}, "AttributeError"),
                         ({"op": "peers", "peers": {"x": "y"}}, "ValueError")):
            with pytest.raises(RunError, match=f"grpc shard 0 .*: {why}"):
                cluster.control(shard, bad)
        out = cluster.run()  # the shard serves on
    finally:
        cluster.close()
    assert out.result is not None and sha(out)
    err = capfd.readouterr().err
    refused = [line for line in err.splitlines() if "unauthenticated" in line]
    # The first refusal at once, the rest in the line the shard writes when it exits.
    assert len(refused) == 2, err
    assert "refused 1 unauthenticated call(s)" in refused[0]
    assert f"refused {STRANGERS - 1} unauthenticated call(s) since the last report " \
           f"({STRANGERS} in all); latest from stranger at" in refused[1]
    control_lines = [line for line in err.splitlines() if "control request from" in line]
    assert len(control_lines) == 2 and "Traceback" not in err, err
    assert "AttributeError" in control_lines[0] and "ValueError" in control_lines[1]
    assert out.shards[0]["refused"] == STRANGERS


def test_refusals_are_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(interval=3600.0)
    with caplog.at_level("WARNING", logger="fedloom.grpc"):
        for i in range(100):
            log.note(f"peer {i}", "wrong")
        log.flush()
        log.flush()  # nothing new: no line
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "refused 1 unauthenticated call(s) since the last report (1 in all)",
        "refused 99 unauthenticated call(s) since the last report (100 in all)"]
    assert log.total == 100
