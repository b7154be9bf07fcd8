"""Helpers shared by the tests and benchmarks (model folders, engine comparisons)."""
