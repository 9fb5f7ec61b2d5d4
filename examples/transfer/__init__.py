"""The money-transfer example: an effectively-once ledger fed from Kafka.

- :mod:`.models`   the example's tables (``accounts``, ``transfers``);
- :mod:`.service`  the exactlyonce ``App`` that applies each transfer once and
  publishes its two statement entries through the transactional outbox;
- :mod:`.producer` emits transfers through :class:`exactlyonce.Producer` and
  deliberately re-sends some of them;
- :mod:`.verify`   checks that every transfer was applied exactly once;
- :mod:`.demo`     runs it all end to end with the ledger service
  (:mod:`examples.ledger`), killing a worker of each service mid-run
  (``python -m examples.transfer.demo``).
"""
