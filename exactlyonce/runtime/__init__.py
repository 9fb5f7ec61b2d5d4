"""The runtime: what a worker does with each record, one room per step.

- :mod:`~exactlyonce.runtime.loop`: poll, hand each chunk to its path, commit
  offsets of what the database committed, rewind what it did not;
- :mod:`~exactlyonce.runtime.dedup`: handlers deduplicated by message ID
  (claim, handle, bisect on failure);
- :mod:`~exactlyonce.runtime.ordered`: sequenced handlers (streams, parking,
  releases and gaps);
- :mod:`~exactlyonce.runtime.calls`: admitting a record (signature, size),
  deriving its ID, calling its handler;
- :mod:`~exactlyonce.runtime.booking`: one call books an outcome in the
  counters, stats, metrics and log;
- :mod:`~exactlyonce.runtime.deadletter`: the dead-letter record format and
  its publishing;
- :mod:`~exactlyonce.runtime.transient`: transient failures and their retry
  budget.
"""

from exactlyonce.runtime.loop import Runner

__all__ = ["Runner"]
