"""Emit money transfers to Kafka, deliberately re-sending some of them.

A producer that does not get its acknowledgement (a lost ACK, a timeout, a
restarted client) sends the record again. Kafka's idempotent producer only
removes the copies *it* retried within one producer session; a transfer sent
again by the application is a second record, maybe on another partition (the
partition count changed, a different key, an explicit partition), and so maybe
consumed by another worker. This producer imitates that: a share of the
transfers is sent twice, some of the second copies onto another partition.
The transfer service must apply each transfer once anyway.

Each record: key = the debited account (so one account's transfers share a
partition), value = ``{"transfer_id", "from", "to", "amount"}`` (JSON, amount
in cents), header ``message-id`` = the transfer ID (what exactlyonce's default
ID strategy reads; the service uses the JSON field).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kafka
import kafka.errors

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
    #: Per partition, the offset after the last record acknowledged: a consumer
    #: group that has committed these has consumed every record sent.
    end_offsets: dict[int, int] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write the report as JSON (read back with :meth:`load`)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SendReport:
        """Read a report written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        data["end_offsets"] = {int(p): o for p, o in data.get("end_offsets", {}).items()}
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


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int = DEFAULT_PARTITIONS) -> None:
    """Create ``topic`` with ``partitions`` partitions unless it exists."""
    admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": 1}},
            wait_for_metadata=True,
        )
    except kafka.errors.TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


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
    producer retrying unacknowledged sends would. Half of the copies are keyed
    as usual (same partition), half go to another partition explicitly.
    ``rate`` (transfers per second) spreads the sends over time.

    Every send is checked: a record the broker did not acknowledge raises.
    The report counts the records from their acknowledgements, not from the
    topic's end offsets, which other producers may move (and which the
    embedded broker under-reports).
    """
    rng = random.Random(f"resend-{seed}")
    report = SendReport(topic=topic, transfers=list(transfers))
    sent: list[Any] = []
    producer = kafka.KafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=5
    )
    try:
        partitions = sorted(producer.partitions_for(topic) or ())
        if not partitions:
            raise RuntimeError(f"topic {topic!r} does not exist")
        started = time.monotonic()
        copies: list[tuple[dict[str, Any], int | None]] = []
        for start in range(0, len(transfers), chunk):
            batch = transfers[start : start + chunk]
            futures = [_send(producer, topic, transfer) for transfer in batch]
            # The copies due from the previous chunk go out after this one.
            copied = [_send(producer, topic, t, partition=p) for t, p in copies]
            sent += futures + copied
            producer.flush()
            copies = []
            for transfer, future in zip(batch, futures, strict=True):
                if rng.random() >= resend:
                    continue
                partition = None
                if len(partitions) > 1 and rng.random() < 0.5:
                    original = future.get(timeout=30).partition
                    partition = rng.choice([p for p in partitions if p != original])
                    report.resent_to_other_partition += 1
                copies.append((transfer, partition))
                report.resent += 1
            rng.shuffle(copies)
            if rate:
                # Pace the originals: chunk k is not sent before k * chunk / rate seconds.
                delay = started + (start + len(batch)) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        sent += [_send(producer, topic, t, partition=p) for t, p in copies]
        producer.flush()
        for future in sent:
            metadata = future.get(timeout=30)  # raises if the broker refused the record
            end = report.end_offsets.get(metadata.partition, 0)
            report.end_offsets[metadata.partition] = max(end, metadata.offset + 1)
        report.records = len(sent)
    finally:
        producer.close(timeout=10)
    return report


def _send(
    producer: kafka.KafkaProducer,
    topic: str,
    transfer: dict[str, Any],
    *,
    partition: int | None = None,
) -> Any:
    transfer_id = transfer["transfer_id"].encode("utf-8")
    return producer.send(
        topic,
        key=transfer["from"].encode("utf-8"),
        value=json.dumps(transfer, separators=(",", ":")).encode("utf-8"),
        headers=[("message-id", transfer_id)],
        partition=partition,
    )


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
