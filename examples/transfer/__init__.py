"""The money-transfer example: an effectively-once ledger fed from Kafka.

- :mod:`.models`   the example's tables (``accounts``, ``transfers``);
- :mod:`.service`  the exactlyonce ``App`` that applies each transfer once;
- :mod:`.producer` emits transfers and deliberately re-sends some of them;
- :mod:`.verify`   checks that every transfer was applied exactly once;
- :mod:`.demo`     runs it all end to end, killing a worker mid-run
  (``python -m examples.transfer.demo``).
"""
