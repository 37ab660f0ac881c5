"""python -m bench.faults: the fault scenarios of tests/support/faults with larger loads, into
docs/reliability.md."""
