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
