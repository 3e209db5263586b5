"""Baselines the benchmarks compare manylora against, built on the engine's interfaces."""
