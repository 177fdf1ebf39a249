"""Benchmarks of ExpertWeave's headline comparisons: `make bench` / `make bench-quick` (perf/run.py)."""
