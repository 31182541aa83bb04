"""The host: timers, stopping, errors that name where they happened, counting, routing, and the
wall-clock entry points transports use."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from kernel.api import Context, Deployment, Protocol, RunError
from kernel.host import Host
from kernel.messages import Message
from transports.netmodel import NetworkModel

WAIT_S = 5.0


class Scripted(Protocol):
    """A node whose handlers are functions given per test; it logs what happens to it."""

    def __init__(self, log: list[tuple[Any, ...]], **handlers: Callable[..., None]) -> None:
        self.log = log
        self.h = handlers

    def on_start(self, ctx: Context) -> None:
        self.log.append(("start", ctx.id, ctx.now))
        if "start" in self.h:
            self.h["start"](ctx)

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.log.append(("msg", ctx.id, ctx.now, msg.kind, msg.src))
        if "message" in self.h:
            self.h["message"](ctx, msg)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.log.append(("timer", ctx.id, ctx.now, key))
        if "timer" in self.h:
            self.h["timer"](ctx, key)

    def on_stop(self, ctx: Context) -> None:
        self.log.append(("stop", ctx.id))
        if "stop" in self.h:
            self.h["stop"](ctx)


def _host(n: int, log: list[Any], network: Any = None, **handlers: Any) -> Host:
    dep = Deployment(list(range(n)), lambda i: Scripted(log, **handlers))
    return Host(dep, range(n), seed=3, network=network)


def _timers(log: list[Any]) -> list[tuple[float, Any]]:
    return [(e[2], e[3]) for e in log if e[0] == "timer"]


# -- timers ---------------------------------------------------------------------------------
def test_timers_fire_in_time_order_and_replacing_or_cancelling_works() -> None:
    def start(ctx: Context) -> None:
        if ctx.id:
            return
        ctx.set_timer(3.0, "b")
        ctx.set_timer(1.0, "a")
        ctx.set_timer(2.0, "replaced")
        ctx.set_timer(5.0, "replaced")  # replaces: fires once, at 5
        ctx.set_timer(4.0, "cancelled")
        ctx.cancel_timer("cancelled")
        ctx.cancel_timer("never-set")  # ignored
        ctx.set_timer(2.0, ("tuple", 1))

    log: list[Any] = []
    h = _host(2, log, start=start)
    h.start()
    assert h.run() == "idle"
    assert _timers(log) == [(1.0, "a"), (2.0, ("tuple", 1)), (3.0, "b"), (5.0, "replaced")]
    assert h.sched.now == 5.0


def test_a_timer_can_set_itself_again_and_equal_times_keep_insertion_order() -> None:
    def start(ctx: Context) -> None:
        ctx.set_timer(1.0, "tick")

    def timer(ctx: Context, key: Hashable) -> None:
        if ctx.now < 3.0:
            ctx.set_timer(1.0, key)

    log: list[Any] = []
    h = _host(3, log, start=start, timer=timer)
    h.start()
    h.run()
    fired = [(e[2], e[1]) for e in log if e[0] == "timer"]
    # Nodes set their timers in id order at every tick, so each tick fires them in id order.
    assert fired == [(t, node) for t in (1.0, 2.0, 3.0) for node in range(3)]


def test_negative_timer_delay_is_an_error_naming_node_and_key() -> None:
    log: list[Any] = []
    h = _host(1, log, start=lambda ctx: ctx.set_timer(-1.0, "k"))
    h.start()
    with pytest.raises(RunError, match=r"node 0 .*on_start.*delay >= 0, got -1.0"):
        h.run()


# -- stopping -------------------------------------------------------------------------------
def _echo(ctx: Context, msg: Message) -> None:
    ctx.send(msg.src, "echo")


def test_until_and_max_events_stop_a_run_that_can_go_on() -> None:
    net = NetworkModel.from_config({"latency": 1.0}, 0, range(2))
    log: list[Any] = []
    h = _host(2, log, network=net, start=lambda ctx: ctx.send(1 - ctx.id, "echo"), message=_echo)
    h.start()
    assert h.run(until=3.5) == "until"
    assert h.sched.now == 3.5
    assert [e[2] for e in log if e[0] == "msg"] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert h.run(max_events=3) == "max_events"
    assert h.stats["events"] == 9
    assert h.sched.now == 5.0


def test_finish_ends_the_run_with_the_first_result() -> None:
    def message(ctx: Context, msg: Message) -> None:
        ctx.finish({"by": ctx.id})
        ctx.finish({"by": "ignored"})

    log: list[Any] = []
    h = _host(4, log, start=lambda ctx: ctx.send((ctx.id + 1) % 4, "x"), message=message)
    h.start()
    assert h.run() == "finished"
    assert h.result == {"by": 1} and h.finished_by == 1
    assert h.stats["events"] == 1
    h.stop()
    assert [e for e in log if e[0] == "stop"] == [("stop", i) for i in range(4)]


def test_finish_inside_on_start_ends_the_run_before_other_nodes_start() -> None:
    log: list[Any] = []
    h = _host(3, log, start=lambda ctx: ctx.finish({"ok": True}) if ctx.id == 1 else None)
    h.start()
    assert h.run() == "finished"
    assert [e[1] for e in log if e[0] == "start"] == [0, 1]


# -- errors ---------------------------------------------------------------------------------
def test_a_raising_handler_is_a_run_error_naming_node_handler_kind_and_time() -> None:
    def message(ctx: Context, msg: Message) -> None:
        if ctx.id == 2:
            raise KeyError("boom")

    net = NetworkModel.from_config({"latency": 0.25}, 0, range(3))
    log: list[Any] = []
    h = _host(3, log, network=net, start=lambda ctx: ctx.send(2, "grad") if ctx.id == 1 else None,
              message=message)
    h.start()
    with pytest.raises(RunError) as info:
        h.run()
    text = str(info.value)
    assert re.search(r"node 2 \(Scripted\) raised KeyError in on_message handling 'grad' "
                     r"from node 1 at t=0\.25", text), text
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("where", ["on_start", "on_timer", "on_stop"])
def test_errors_in_other_handlers_name_them(where: str) -> None:
    def boom(*_: Any) -> None:
        raise ValueError("bad")

    handlers: dict[str, Any] = {where[3:]: boom}
    if where == "on_timer":
        handlers["start"] = lambda ctx: ctx.set_timer(0.5, "t")
    log: list[Any] = []
    h = _host(1, log, **handlers)
    h.start()
    with pytest.raises(RunError, match=rf"node 0 \(Scripted\) raised ValueError in {where}"):
        h.run()
        h.stop()


def test_sending_to_an_unknown_node_names_it() -> None:
    log: list[Any] = []
    h = _host(2, log, start=lambda ctx: ctx.send(7, "x"))
    h.start()
    with pytest.raises(RunError, match=r"unknown node\(s\) \[7\]; this run's nodes are 0\.\.1"):
        h.run()


# -- counting and routing -------------------------------------------------------------------
def test_stats_count_one_message_per_destination_and_sizes_when_asked() -> None:
    def start(ctx: Context) -> None:
        if ctx.id == 0:
            ctx.multicast([1, 2, 3], "m", x=1)
            ctx.multicast([], "nothing")
            ctx.send(1, "s")

    dep = Deployment(list(range(4)), lambda i: Scripted([], start=start))
    h = Host(dep, range(4), seed=0, sizer=lambda body: 10 + len(body))
    h.start()
    h.run()
    assert h.stats == {"messages": 4, "bytes": 3 * 11 + 10, "events": 4, "dropped": 0, "lost": 0}


def test_a_multicast_shares_one_body_and_each_copy_names_its_destination() -> None:
    got: list[Message] = []
    dep = Deployment(list(range(3)), lambda i: Scripted(
        [], start=lambda ctx: ctx.multicast([1, 2], "m", x=[1]) if ctx.id == 0 else None,
        message=lambda ctx, msg: got.append(msg)))
    h = Host(dep, range(3), seed=0)
    h.start()
    h.run()
    assert [(m.src, m.dst, m.kind, m.seq) for m in got] == [(0, 1, "m", 1), (0, 2, "m", 1)]
    assert got[0].body is got[1].body


class _Outbox:
    def __init__(self) -> None:
        self.posted: list[tuple[Message, list[int]]] = []

    def post(self, msg: Message, dsts: Any) -> None:
        self.posted.append((msg, list(dsts)))


def test_sends_to_other_hosts_go_to_the_outbox_and_deliver_hands_them_in() -> None:
    log: list[Any] = []

    def start(ctx: Context) -> None:
        ctx.multicast([1, 2, 3], "m", v=ctx.id)

    dep = Deployment(list(range(4)), lambda i: Scripted(log, start=start))
    a, b = _Outbox(), _Outbox()
    ha = Host(dep, [0, 1], seed=0, outbox=a)
    hb = Host(dep, [2, 3], seed=0, outbox=b)
    ha.start()
    hb.start()
    assert [(m.src, d) for m, d in a.posted] == [(0, [2, 3]), (1, [2, 3])]
    for msg, dsts in a.posted:
        hb.deliver(msg, dsts)
    for msg, dsts in b.posted:
        ha.deliver(msg, dsts)
    ha.run()
    hb.run()
    received = sorted((e[1], e[4]) for e in log if e[0] == "msg")
    assert received == sorted((d, s) for s in range(4) for d in (1, 2, 3))
    with pytest.raises(RunError, match="for node 0, which this host does not run"):
        hb.deliver(a.posted[0][0], [0])


def test_wall_mode_host_takes_messages_and_calls_from_other_threads() -> None:
    log: list[Any] = []
    calls: list[str] = []

    def message(ctx: Context, msg: Message) -> None:
        if msg.kind == "last":
            ctx.finish({"n": len([e for e in log if e[0] == "msg"])})

    dep = Deployment([0, 1], lambda i: Scripted(log, message=message))
    h = Host(dep, [0], seed=0, wall=True, outbox=_Outbox())
    h.start()

    def receiver() -> None:
        for i in range(20):
            h.deliver(Message(1, 0, "m", {"i": i}, 0.0, i + 1), [0], threadsafe=True)
        h.call_soon_threadsafe(lambda: calls.append(threading.current_thread().name))
        h.deliver(Message(1, 0, "last", {}, 0.0, 21), [0], threadsafe=True)

    th = threading.Thread(target=receiver, name="receiver")
    th.start()
    reason = h.run(until=WAIT_S)
    th.join(WAIT_S)
    assert reason == "finished", "the other thread's messages never arrived"
    assert h.result == {"n": 21}
    assert calls == [threading.current_thread().name]  # ran on the loop's thread
    assert [e[3] for e in log if e[0] == "msg"] == ["m"] * 20 + ["last"]


def test_a_raising_transport_callback_is_a_run_error() -> None:
    dep = Deployment([0], lambda i: Scripted([]))
    h = Host(dep, [0], seed=0, wall=True)
    h.start()
    def boom() -> None:
        raise ZeroDivisionError("division by zero")

    h.call_soon_threadsafe(boom)
    with pytest.raises(RunError, match="callback .* raised ZeroDivisionError"):
        h.run(until=WAIT_S)


# -- crashes, restarts and computation (host side of the network model) ----------------------
def test_a_crashed_node_receives_nothing_its_timers_die_and_it_restarts_fresh() -> None:
    instances: list[int] = []
    log: list[Any] = []

    class Node(Scripted):
        def __init__(self, i: int) -> None:
            super().__init__(log)
            instances.append(i)

        def on_start(self, ctx: Context) -> None:
            super().on_start(ctx)
            if ctx.id == 1:
                ctx.set_timer(1.5, "during-down")  # would fire at 1.5 (+ restart time)
                ctx.set_timer(5.0, "after-restart")
            else:
                ctx.set_timer(0.5, "tick")

        def on_timer(self, ctx: Context, key: Hashable) -> None:
            super().on_timer(ctx, key)
            if ctx.id == 0 and ctx.now < 6:
                ctx.send(1, "ping")
                ctx.set_timer(0.5, "tick")

    net = NetworkModel.from_config(
        {"latency": 0.1, "crashes": [{"node": 1, "at": 1.0, "restart": 3.0}]}, 0, range(2))
    h = Host(Deployment([0, 1], Node), [0, 1], seed=0, network=net)
    h.start()
    h.run()
    got = [e[2] for e in log if e[0] == "msg"]
    assert got and not any(1.0 <= t < 3.0 for t in got)
    assert min(t for t in got if t > 1.0) == pytest.approx(3.1)
    assert instances == [0, 1, 1]
    assert [e[2] for e in log if e[0] == "start" and e[1] == 1] == [0.0, 3.0]
    # The first life's timers (1.5 and 5.0) died with it; the second life set its own.
    assert [(t, k) for t, k in _timers(log) if k != "tick"] == [
        (4.5, "during-down"), (8.0, "after-restart")]
    assert h.stats["dropped"] == 4  # pings sent at 1.0, 1.5, 2.0, 2.5 (arriving +0.1)


def test_compute_delays_departures_and_holds_arrivals_until_done() -> None:
    log: list[Any] = []
    sent: list[Message] = []

    def start(ctx: Context) -> None:
        if ctx.id == 0:
            ctx.compute(2.0)  # busy until 2.0
            ctx.send(1, "after-work")
            ctx.set_timer(0.5, "t")  # counts from the end of the work: 2.5
        else:
            ctx.send(0, "early-a")
            ctx.send(0, "early-b")

    def message(ctx: Context, msg: Message) -> None:
        sent.append(msg)

    net = NetworkModel.from_config({"latency": 0.1, "compute": {"per_unit": 1.0}}, 0, range(2))
    h = Host(Deployment([0, 1], lambda i: Scripted(log, start=start, message=message)),
             [0, 1], seed=0, network=net)
    h.start()
    h.run()
    by_kind = {m.kind: m for m in sent}
    assert by_kind["after-work"].sent_at == 2.0
    handled = [(e[3], e[2]) for e in log if e[0] in ("msg", "timer")]
    # Arrivals at 0.1 wait for the work to end at 2.0 and keep their order; the reply departs
    # at 2.0 and arrives at 2.1; the timer fires at 2.5.
    assert handled == [("early-a", 2.0), ("early-b", 2.0), ("after-work", 2.1), ("t", 2.5)]


def test_compute_is_free_without_a_compute_model() -> None:
    seen: list[float] = []
    log: list[Any] = []
    h = _host(1, log, start=lambda ctx: seen.append(ctx.compute(5.0)))
    h.start()
    h.run()
    assert seen == [0.0]


def test_a_busy_nodes_mailbox_keeps_arrival_order_against_later_arrivals_at_the_same_time() -> None:
    log: list[Any] = []

    def start(ctx: Context) -> None:
        if ctx.id == 0:
            ctx.compute(2.0)  # busy until 2.0
        else:
            ctx.send(0, f"from-{ctx.id}")

    # "from-1" arrives at 1.0 and waits; "from-2" arrives exactly when the work ends, but it was
    # queued (at t=0) before the wake-up was (at 1.0): it must still run after "from-1".
    net = NetworkModel.from_config(
        {"latency": 9.0, "compute": {"per_unit": 1.0}, "links": [
            {"src": 1, "dst": 0, "latency": 1.0}, {"src": 2, "dst": 0, "latency": 2.0}]},
        0, range(3))
    h = Host(Deployment([0, 1, 2], lambda i: Scripted(log, start=start)), [0, 1, 2], seed=0,
             network=net)
    h.start()
    h.run()
    assert [(e[3], e[2]) for e in log if e[0] == "msg"] == [("from-1", 2.0), ("from-2", 2.0)]
