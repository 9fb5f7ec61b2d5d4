"""The storage room: everything exactlyonce keeps in the application's SQL database.

- :mod:`~exactlyonce.storage.schema`: the framework's tables, the only place they are defined;
- :mod:`~exactlyonce.storage.store`: the dedup claim, the per-partition counters, pruning;
- :mod:`~exactlyonce.storage.sequence`: the watermarks and parked messages of sequenced handlers;
- :mod:`~exactlyonce.storage.migrate`: applying the shipped Alembic migrations;
- :mod:`~exactlyonce.storage.engine`: engine creation, error classification, savepoints.

It imports nothing from the rooms above it (the runtime, the app, the CLI).
The modules' former homes (``exactlyonce.schema``, ``exactlyonce.store``,
``exactlyonce.sequence``, ``exactlyonce.migrate``, ``exactlyonce._db``) re-export
them, so code written against those paths keeps working.
"""
