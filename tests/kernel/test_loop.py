"""The scheduler: total (time, insertion) order, until/max_events, and the wall-clock mode."""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kernel.loop import CALL, DELIVER, IDLE_POLL_S, TIMER, Scheduler

WAIT_S = 5.0  # every wait on another thread gives up after this, with a message


def _recorder(log: list[Any], stop_after: int | None = None):
    def dispatch(etype: int, node: int, payload: Any) -> bool:
        log.append(payload)
        return stop_after is not None and len(log) >= stop_after

    return dispatch


@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.5]), min_size=1, max_size=40))
def test_events_run_in_time_then_insertion_order(times: list[float]) -> None:
    s = Scheduler()
    for i, t in enumerate(times):
        s.push(t, DELIVER, 0, (t, i))
    log: list[Any] = []
    assert s.run(_recorder(log)) == ("idle", len(times))
    assert log == sorted(log)  # payload (t, i): time first, then insertion index


def test_events_pushed_while_running_keep_the_total_order() -> None:
    s = Scheduler()
    log: list[str] = []

    def dispatch(etype: int, node: int, payload: Any) -> bool:
        log.append(payload)
        if payload == "a":
            s.push(s.now, DELIVER, 0, "a-now")  # due now: after everything already due now
            s.push(1.0, DELIVER, 0, "a-later")  # same time as "c", inserted after it
        return False

    s.push(1.0, DELIVER, 0, "c")
    s.push(0.0, DELIVER, 0, "a")
    s.push(0.0, DELIVER, 0, "b")
    s.push(-3.0, DELIVER, 0, "past")  # in the past: runs now, in insertion order
    s.run(dispatch)
    assert log == ["a", "b", "past", "a-now", "c", "a-later"]
    assert s.now == 1.0


def test_until_stops_before_later_events_and_runs_those_at_until() -> None:
    s = Scheduler()
    for t in (0.5, 1.0, 1.5):
        s.push(t, TIMER, 0, t)
    log: list[float] = []
    assert s.run(_recorder(log), until=1.0) == ("until", 2)
    assert log == [0.5, 1.0] and s.now == 1.0
    assert s.run(_recorder(log), until=1.2) == ("until", 0)
    assert s.now == 1.2
    # An `until` in the past never moves the clock back.
    assert s.run(_recorder(log), until=0.1) == ("until", 0)
    assert s.now == 1.2
    assert s.run(_recorder(log)) == ("idle", 1)
    assert log == [0.5, 1.0, 1.5]


def test_max_events_stops_and_the_rest_runs_later() -> None:
    s = Scheduler()
    for i in range(10):
        s.push(i * 0.1, DELIVER, 0, i)
    log: list[int] = []
    assert s.run(_recorder(log), max_events=3) == ("max_events", 3)
    assert log == [0, 1, 2]
    assert s.run(_recorder(log), max_events=0) == ("max_events", 0)
    assert s.run(_recorder(log), max_events=100) == ("idle", 7)
    assert log == list(range(10))
    assert len(s) == 0 and s.next_time() is None


def test_dispatch_returning_true_stops_at_once() -> None:
    s = Scheduler()
    for i in range(5):
        s.push(0.0, DELIVER, 0, i)
    log: list[int] = []
    assert s.run(_recorder(log, stop_after=2)) == ("finished", 2)
    assert len(s) == 3 and s.next_time() == 0.0


# -- wall clock -----------------------------------------------------------------------------
def test_wall_timers_fire_in_real_time_order_and_not_early() -> None:
    s = Scheduler(wall=True)
    delays = [0.006, 0.002, 0.004, 0.0]
    for d in delays:
        s.push(s.now + d, TIMER, 0, d)
    fired: list[tuple[float, float]] = []

    def dispatch(etype: int, node: int, payload: Any) -> bool:
        fired.append((payload, s.elapsed()))
        return len(fired) == len(delays)

    assert s.run(dispatch, until=WAIT_S)[0] == "finished", "timers did not all fire"
    assert [d for d, _ in fired] == sorted(delays)
    assert all(at >= d for d, at in fired)


def test_wall_events_from_another_thread_are_delivered_in_order() -> None:
    s = Scheduler(wall=True)
    got: list[int] = []
    started = threading.Event()

    def dispatch(etype: int, node: int, payload: Any) -> bool:
        if etype == CALL:
            payload()
            return False
        got.append(payload)
        return len(got) == 50

    def producer() -> None:
        assert started.wait(WAIT_S), "loop never started"
        for i in range(50):
            s.push_threadsafe(DELIVER, 0, i)

    # The producer starts only once the loop runs, so these events arrive while it waits.
    s.push_threadsafe(CALL, -1, started.set)
    th = threading.Thread(target=producer)
    th.start()
    reason, _ = s.run(dispatch, until=WAIT_S)
    th.join(WAIT_S)
    assert reason == "finished", f"only {len(got)} of 50 events from the other thread arrived"
    assert got == list(range(50))


def test_wall_until_stops_an_idle_loop_that_waits_without_spinning() -> None:
    s = Scheduler(wall=True)
    waits: list[float] = []
    until = 2 * IDLE_POLL_S
    reason, n = s.run(_recorder([]), until=until, idle_wait=waits.append)
    assert (reason, n) == ("until", 0)
    assert s.now >= until
    # Waiting on an Event between looks: a handful of looks, not a busy loop's thousands.
    assert 1 <= len(waits) <= 10, f"the idle loop looked {len(waits)} times in {until} s"
    assert all(0 <= w <= IDLE_POLL_S for w in waits)


def test_wall_chatty_events_do_not_starve_input_from_other_threads() -> None:
    s = Scheduler(wall=True)
    seen_outside = threading.Event()

    def dispatch(etype: int, node: int, payload: Any) -> bool:
        if payload == "outside":
            return True
        s.push(s.now, DELIVER, 0, "chatter")  # an endless local exchange
        return False

    s.push(0.0, DELIVER, 0, "chatter")
    def outside() -> None:
        s.push_threadsafe(DELIVER, 0, "outside")
        seen_outside.set()

    th = threading.Thread(target=outside)
    th.start()
    reason, _ = s.run(dispatch, until=WAIT_S)
    th.join(WAIT_S)
    assert seen_outside.is_set()
    assert reason == "finished", "the other thread's event never ran behind the chatter"
