"""Emit money transfers to Kafka, deliberately re-sending some of them.

A producer that does not get its acknowledgement (a lost ACK, a timeout, a
restarted client) sends the record again. Kafka's idempotent producer only
removes the copies *it* retried within one producer session; a transfer sent
again by the application is a second record, maybe on another partition (the
partition count changed, a different key, an explicit partition), and so maybe
consumed by another worker. This producer imitates that: a share of the
transfers is sent twice, some of the second copies onto another partition.
The transfer service must apply each transfer once anyway.

Records go out through :class:`exactlyonce.Producer`, the sending half of the
link: it re-sends until the broker acknowledges, and stamps each record's
``message-id`` header with the ID given (here the transfer ID, so both copies
carry the same one). Each record: key = the debited account, on the partition
Kafka's default partitioner gives that key (so one account's transfers share a
partition), value = ``{"amount", "from", "to", "transfer_id"}`` (compact JSON
with sorted keys, so the copies are byte-identical; amount in cents).

::

    python -m examples.transfer.producer --count 2000 --resend 0.2 --out sent.json

writes the distinct transfers it sent to ``sent.json`` for
``python -m examples.transfer.verify``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kafka
import kafka.errors
from kafka.partitioner import murmur2
from kafka.structs import TopicPartition

import exactlyonce
from exactlyonce.app import BOOTSTRAP_SERVERS_ENV
from examples.transfer.models import DEFAULT_ACCOUNTS, account_id

DEFAULT_PARTITIONS = 3


@dataclass
class SendReport:
    """What :func:`send_transfers` put in the topic."""

    topic: str
    #: The distinct transfers, in the order they were first sent.
    transfers: list[dict[str, Any]]
    #: Records the broker acknowledged, re-sends included.
    records: int = 0
    #: Transfers sent a second time, and how many of those went to another partition.
    resent: int = 0
    resent_to_other_partition: int = 0

    def save(self, path: str | Path) -> None:
        """Write the report as JSON (read back with :meth:`load`)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SendReport:
        """Read a report written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        data.pop("end_offsets", None)  # written by earlier versions
        return cls(**data)


def make_transfers(
    count: int,
    n_accounts: int = DEFAULT_ACCOUNTS,
    *,
    seed: str,
    max_amount: int = 2_500,
    unknown_share: float = 0.01,
) -> list[dict[str, Any]]:
    """``count`` random transfers between the seeded accounts, with stable IDs.

    The same ``seed`` gives the same transfers and IDs (``t-<seed>-<n>``).
    A share ``unknown_share`` names an account that does not exist (the
    service rejects those with ``unknown-account``).
    """
    if n_accounts < 2:
        raise ValueError("need at least two accounts")
    rng = random.Random(seed)
    result = []
    for n in range(count):
        source, target = rng.sample(range(n_accounts), 2)
        from_account, to_account = account_id(source), account_id(target)
        if rng.random() < unknown_share:
            to_account = f"acct-missing-{n}"
        result.append({
            "transfer_id": f"t-{seed}-{n:06d}",
            "from": from_account,
            "to": to_account,
            "amount": rng.randint(1, max_amount),
        })
    return result


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int = DEFAULT_PARTITIONS,
                 replication_factor: int = 1) -> None:
    """Create ``topic`` with ``partitions`` partitions (and ``replication_factor`` copies) unless it exists."""
    admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": replication_factor}},
            wait_for_metadata=True,
        )
    except kafka.errors.TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def partition_count(bootstrap_servers: str, topic: str) -> int:
    """How many partitions ``topic`` has; raises if it does not exist."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        partitions = consumer.partitions_for_topic(topic)
    finally:
        consumer.close()
    if not partitions:
        raise RuntimeError(f"topic {topic!r} does not exist")
    return len(partitions)


def home_partition(transfer: dict[str, Any], partitions: int) -> int:
    """The partition of the transfer's key (the debited account), as Kafka's default partitioner picks it."""
    return int(murmur2(transfer["from"].encode("utf-8")) & 0x7FFFFFFF) % partitions


def send_transfers(
    bootstrap_servers: str,
    topic: str,
    transfers: Sequence[dict[str, Any]],
    *,
    resend: float = 0.2,
    seed: str = "",
    chunk: int = 100,
    rate: float | None = None,
) -> SendReport:
    """Send ``transfers`` to ``topic``, re-sending a share ``resend`` of them.

    Transfers go out in chunks of ``chunk``; once a chunk is acknowledged, the
    copies of some of its transfers are sent after the *next* chunk, as a
    producer retrying unacknowledged sends would. Half of the copies go to the
    key's partition, half to another partition. ``rate`` (transfers per
    second) spreads the sends over time.

    Every record is acknowledged: :meth:`exactlyonce.Producer.flush` re-sends
    until it is, and raises if the broker stays unreachable.
    """
    rng = random.Random(f"resend-{seed}")
    report = SendReport(topic=topic, transfers=list(transfers))
    partitions = partition_count(bootstrap_servers, topic)
    with exactlyonce.Producer(bootstrap_servers, config={"linger_ms": 5}) as producer:
        started = time.monotonic()
        copies: list[tuple[dict[str, Any], int]] = []
        for start in range(0, len(transfers), chunk):
            batch = transfers[start : start + chunk]
            # The originals, then the copies due from the previous chunk.
            outgoing = [(t, home_partition(t, partitions)) for t in batch] + copies
            for transfer, partition in outgoing:
                producer.send(topic, transfer, key=transfer["from"], message_id=transfer["transfer_id"],
                              partition=partition)
            producer.flush()
            report.records += len(outgoing)
            copies = []
            for transfer in batch:
                if rng.random() >= resend:
                    continue
                partition = home_partition(transfer, partitions)
                if partitions > 1 and rng.random() < 0.5:
                    partition = rng.choice([p for p in range(partitions) if p != partition])
                    report.resent_to_other_partition += 1
                copies.append((transfer, partition))
                report.resent += 1
            rng.shuffle(copies)
            if rate:
                # Pace the originals: chunk k is not sent before k * chunk / rate seconds.
                delay = started + (start + len(batch)) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        for transfer, partition in copies:
            producer.send(topic, transfer, key=transfer["from"], message_id=transfer["transfer_id"],
                          partition=partition)
        report.records += len(copies)
    return report  # leaving the with block flushed the last copies


def end_offsets(bootstrap_servers: str, topic: str, records: int, timeout_s: float = 60.0) -> dict[int, int]:
    """Each partition's end offset, found by reading ``topic`` until ``records`` records have come by.

    A consumer group that has committed these offsets has consumed every
    record sent. They are counted, not asked for: the embedded broker reports
    wrong end offsets when several records go in one produce request. The
    topic must hold only these records (the demo's own topic); if a re-send by
    the stubborn producer added a copy, it is read too, until a poll comes
    back empty.
    """
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                   auto_offset_reset="earliest")
    try:
        assigned = [TopicPartition(topic, p) for p in range(partition_count(bootstrap_servers, topic))]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends: dict[int, int] = {}
        seen = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500)
            for tp, batch in polled.items():
                seen += len(batch)
                ends[tp.partition] = max(ends.get(tp.partition, 0), batch[-1].offset + 1)
            if seen >= records and not polled:
                return ends
        raise RuntimeError(f"read only {seen} of the {records} records sent to {topic!r}")
    finally:
        consumer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Produce transfers (see the module docstring)."""
    # Imported here: the service reads its topic from the environment on import.
    from examples.transfer.service import TOPIC

    parser = argparse.ArgumentParser(
        prog="python -m examples.transfer.producer",
        description="Emit money transfers, re-sending a share of them.",
    )
    parser.add_argument("--count", type=int, default=2000, help="distinct transfers to send")
    parser.add_argument("--resend", type=float, default=0.2,
                        help="share of the transfers sent twice (default 0.2)")
    parser.add_argument("--accounts", type=int, default=DEFAULT_ACCOUNTS,
                        help="accounts acct-0000.. to move money between")
    parser.add_argument("--max-amount", type=int, default=2_500, help="largest amount, in cents")
    parser.add_argument("--unknown", type=float, default=0.01,
                        help="share of transfers to an account that does not exist")
    parser.add_argument("--seed", default=None,
                        help="transfer IDs are t-SEED-N; the same seed re-sends the same transfers "
                             "(default: random)")
    parser.add_argument("--rate", type=float, default=None, help="transfers per second")
    parser.add_argument("--topic", default=TOPIC)
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="partitions of the topic if it has to be created")
    parser.add_argument("--bootstrap-servers", default=os.environ.get(BOOTSTRAP_SERVERS_ENV))
    parser.add_argument("--out", default=None, help="write the sent transfers to this JSON file")
    args = parser.parse_args(argv)
    if not args.bootstrap_servers:
        parser.error(f"pass --bootstrap-servers or set {BOOTSTRAP_SERVERS_ENV}")
    if not 0 <= args.resend <= 1:
        parser.error("--resend must be between 0 and 1")

    seed = args.seed or secrets.token_hex(3)
    ensure_topic(args.bootstrap_servers, args.topic, args.partitions)
    transfers = make_transfers(args.count, args.accounts, seed=seed, max_amount=args.max_amount,
                               unknown_share=args.unknown)
    report = send_transfers(args.bootstrap_servers, args.topic, transfers, resend=args.resend,
                            seed=seed, rate=args.rate)
    if args.out:
        report.save(args.out)
    print(f"sent {len(report.transfers)} transfers as {report.records} records to {args.topic!r} "
          f"({report.resent} re-sent, {report.resent_to_other_partition} onto another partition)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
