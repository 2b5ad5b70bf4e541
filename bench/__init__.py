"""Benchmarks of fastattn: `python -m bench.run` (see run.py) and the pytest-benchmark CPU suite."""
