"""The benchmarks of `make bench` (bench/bench.py runs them all)."""
