"""Pieces of the serving benchmark (benchmarks.serving_bench): replay loops, metrics, baselines."""
