"""Create the examples' Kafka topics before any service uses them.

``python -m examples.topics`` (the docker-compose ``migrate`` service runs it)
creates ``transfers`` and ``transfer-applied`` (or the names in
``EXACTLYONCE_TRANSFER_TOPIC`` / ``EXACTLYONCE_TRANSFER_APPLIED_TOPIC``) with
3 partitions each, unless they exist. Creating them up front, rather than
letting the broker create them on first use, fixes their partition count and
lets the ledger's consumers subscribe before the first event is relayed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from exactlyonce.app import BOOTSTRAP_SERVERS_ENV
from examples.transfer.producer import DEFAULT_PARTITIONS, ensure_topic


def main(argv: Sequence[str] | None = None) -> int:
    """Create the topics that are missing."""
    from examples.transfer.service import APPLIED_TOPIC, TOPIC

    parser = argparse.ArgumentParser(prog="python -m examples.topics", description=main.__doc__)
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    parser.add_argument("--bootstrap-servers", default=os.environ.get(BOOTSTRAP_SERVERS_ENV))
    args = parser.parse_args(argv)
    if not args.bootstrap_servers:
        parser.error(f"pass --bootstrap-servers or set {BOOTSTRAP_SERVERS_ENV}")
    for topic in (TOPIC, APPLIED_TOPIC):
        ensure_topic(args.bootstrap_servers, topic, args.partitions)
        print(f"topic {topic!r}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
