"""Fault injection against real coordinator and node processes on loopback (bounded in time).

Each scenario injects one fault under a bounded load and returns a ``FaultRecord`` of counts:
requests sent, failed (not the expected answer), 4xx / 5xx / 500 answers, async jobs accepted and
lost. ``tests/faults/`` runs the scenarios with small loads and asserts the counts;
``python -m bench.faults`` runs them with larger loads and writes ``docs/reliability.md``.

- ``common``: the small demo model, reference answers, records, bounded loads, rings;
- ``ring``: nodes killed, hung or restarted with other bytes; the coordinator killed with jobs
  queued; unsigned, forged and replayed internal calls;
- ``storage``: the result cache's map full or folder removed, a tampered segment file, a full
  disk during export;
- ``inputs``: malformed requests of every kind among good ones.
- ``clients``: slow, silent and never-reading clients beside a good one;
- ``flood``: thousands of idle connections, and the descriptor limit reached;
- ``loadgen`` and ``overload``: an open-loop load at twice capacity, its admission and recovery.
"""
