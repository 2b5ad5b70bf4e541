"""The benchmark runners' CPU timing of implementations that are compared (bench/run.py interleaved_times_ms)."""
import time

import torch

from bench.run import interleaved_times_ms


def test_interleaved_rounds_run_every_call_equally_often_in_rotated_order():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    timed = interleaved_times_ms(calls, torch.device("cpu"), quick=True, min_rounds=4, min_total_s=0.0)
    assert set(timed) == {"a", "b", "c"}
    warmup, rounds = log[:6], log[6:]
    assert warmup == ["a", "a", "b", "b", "c", "c"]
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # each round one of each, rotated
    for median, fastest in timed.values():
        assert 0.0 <= fastest <= median


def test_interleaved_times_measure_each_call():
    calls = {"slow": lambda: time.sleep(0.004), "fast": lambda: None}
    timed = interleaved_times_ms(calls, torch.device("cpu"), quick=True, min_rounds=3, min_total_s=0.0)
    assert timed["slow"][0] >= 3.5 and timed["fast"][0] < 1.0


def test_a_slow_call_does_not_lengthen_the_run():
    """Rounds stop after about min_total_s per call of elapsed time, not when the fastest call has had that much."""
    n = {"slow": 0, "fast": 0}

    def slow():
        n["slow"] += 1
        time.sleep(0.02)

    def fast():
        n["fast"] += 1
    interleaved_times_ms({"slow": slow, "fast": fast}, torch.device("cpu"), quick=True, min_rounds=5,
                         min_total_s=0.05, max_rounds=1000)
    assert n["slow"] == n["fast"] and n["slow"] <= 2 + 10


def test_time_group_fills_rows_and_reports_a_failure_as_their_note():
    from types import SimpleNamespace

    from bench.run import time_group
    rows = {name: SimpleNamespace(time_ms=None, time_ms_min=None, note=None) for name in ("a", "b", "skipped")}
    rows["skipped"].note = "skipped: too large"
    time_group(rows, {"a": lambda: None, "b": lambda: None}, torch.device("cpu"), quick=True)
    assert rows["a"].time_ms is not None and rows["b"].time_ms_min is not None and rows["skipped"].time_ms is None
    state = {"calls": 0}

    def flaky():  # passes its warm-up, then fails while timed
        state["calls"] += 1
        if state["calls"] > 2:
            raise RuntimeError("out of memory")
    rows = {name: SimpleNamespace(time_ms=None, time_ms_min=None, note=None) for name in ("ok", "flaky")}
    time_group(rows, {"ok": lambda: None, "flaky": flaky}, torch.device("cpu"), quick=True)
    assert all(r.time_ms is None and "out of memory" in r.note for r in rows.values())
