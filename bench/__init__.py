"""Benchmarks: they print figures (a table and JSON), never assert on time."""
