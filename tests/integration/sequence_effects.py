"""The business table of the sequence tests, and how their records are numbered."""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from exactlyonce import Message
from tests.integration.helpers import Rec

metadata = sa.MetaData()
#: One row per handler call. ``id`` grows with each insert; the handler of a
#: stream runs under the stream's row lock, so ``id`` order is the order in
#: which each stream's numbers were applied.
seq_effects = sa.Table(
    "seq_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(64), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(32), nullable=False),
)


def stream_and_number(message: Message) -> tuple[str, int]:
    """The ``sequence=`` callable: ``(stream, n)`` from the JSON value."""
    body = message.json()
    return body["stream"], body["n"]


def insert_seq_effect(session: Any, message: Message, worker: str = "") -> None:
    stream, n = stream_and_number(message)
    session.execute(sa.insert(seq_effects).values(stream=stream, n=n, worker=worker))


async def insert_seq_effect_async(session: Any, message: Message, worker: str = "") -> None:
    """:func:`insert_seq_effect` for an async handler (an ``AsyncSession``), after a real await."""
    stream, n = stream_and_number(message)
    await asyncio.sleep(0)
    await session.execute(sa.insert(seq_effects).values(stream=stream, n=n, worker=worker))


def applied(engine: sa.Engine) -> dict[str, list[int]]:
    """Each stream's numbers in the order they were applied."""
    by_stream: dict[str, list[int]] = defaultdict(list)
    with engine.connect() as conn:
        for stream, n in conn.execute(sa.select(seq_effects.c.stream, seq_effects.c.n).order_by(seq_effects.c.id)):
            by_stream[stream].append(n)
    return dict(by_stream)


def record(stream: str, n: int, partition: int | None = None) -> Rec:
    return Rec(value=json.dumps({"stream": stream, "n": n}).encode(), partition=partition)


def scrambled(streams: dict[str, int], partitions: int, rng: random.Random, duplicates: float = 0.3) -> list[Rec]:
    """Every number of every stream, shuffled, a share of them sent twice, on random partitions."""
    records = []
    for stream, count in streams.items():
        for n in range(1, count + 1):
            records.append(record(stream, n, rng.randrange(partitions)))
            if rng.random() < duplicates:
                records.append(record(stream, n, rng.randrange(partitions)))
    rng.shuffle(records)
    return records
