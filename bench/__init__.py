"""Benchmarks for exactlyonce: ``python -m bench.run`` (``--quick`` for a smoke run).

- :mod:`bench.run` orchestrates everything and writes ``bench/results.md`` and
  ``bench/throughput_vs_batch_size.png``;
- :mod:`bench.worker` runs one consumer variant in its own process (so that its
  peak RSS is its own);
- :mod:`bench.proc` is what a worker needs before heavy imports (events, RSS);
  :mod:`bench.common` holds the shared pieces (databases, topics, producing,
  the workload); :mod:`bench.claims` times the dedup claim against a large
  table; :mod:`bench.report` renders the results.
"""
