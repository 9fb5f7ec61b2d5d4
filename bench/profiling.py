"""(p) Where the default batch handler's time goes, per message: py-spy samples sorted into stages.

:func:`attach` starts ``py-spy record --format raw`` on a worker process (once
its first record is touched), :func:`detach` stops it (SIGINT: py-spy then
writes its file) when the throughput phase is over. :func:`breakdown` reads
the collapsed stacks (``frame;frame;... count``, root first, each frame
``function (file:line)``) of the worker's main thread (the stacks that pass
through ``bench/worker.py``; kafka-python's heartbeat thread does not) and
puts each sample in the first stage of :data:`STAGES` that any of its frames
matches, else *other*. Idle samples are kept (``--idle``): waiting for a fetch
or for the database's commit is part of a record's time, so the stages add up
to the wall time per record.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

#: Samples per second.
RATE = 200

#: (stage, pattern over one frame "function (path:line)"), the first match wins: the
#: specific stages before the general ones (the handler's SQL is the handler's, a
#: claim's INSERT is the claim's, the DB commit is whatever commits outside them).
_Q = r"^([\w.<>]*\.)?"  # py-spy names a method Class.method (a nested function outer.<locals>.name)
_P = r"\((.*/)?"  # a frame's file: "(exactlyonce/ids.py:12)", relative to its sys.path entry

STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("handler", re.compile(_Q + r"(handle_batch|handle|handle_nothing) " + _P + r"bench/worker\.py")),
    ("claim (storage.store.claim_many)", re.compile(_Q + r"claim_many " + _P + r"exactlyonce/storage/store\.py")),
    ("signature check", re.compile(_P + r"exactlyonce/signing\.py")),
    ("fingerprint", re.compile(_Q + r"(fingerprint|stored_fingerprints) " + _P + r"exactlyonce/")),
    ("ID resolution", re.compile(_P + r"exactlyonce/ids\.py")),
    ("message wrapping (to_message)", re.compile(_Q + r"to_message " + _P + r"exactlyonce/_kafka/")),
    ("counters / booking", re.compile(_Q + r"(write|add|report|fields) " + _P + r"exactlyonce/runtime/booking\.py")),
    ("offset commit", re.compile(_Q + r"(_commit " + _P + r"exactlyonce/runtime/loop\.py"
                                 r"|commit\w* " + _P + r"(kafka/|exactlyonce/_kafka/))")),
    ("DB commit", re.compile(_Q + r"\w*commit\w* " + _P + r"(sqlalchemy|psycopg)/")),
    ("Kafka fetch + decode (kafka.*)", re.compile(_P + r"kafka/")),
]
OTHER = "other"


def available() -> str | None:
    """None when py-spy can run here, else why not."""
    if _py_spy() is None:
        return "py-spy is not installed (pip install py-spy, or the bench extra)"
    return None


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Spy:
    """A running ``py-spy record`` and its output file."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, log: IO[bytes], started: float) -> None:
        self.proc = proc
        self.out = out
        self.log = log
        self.started = started
        self.seconds = 0.0


def attach(pid: int, out: Path, log_path: Path) -> Spy:
    """Start sampling process ``pid`` into ``out`` (raw collapsed stacks)."""
    exe = _py_spy()
    if exe is None:
        raise RuntimeError(available())
    log = log_path.open("ab")
    proc = subprocess.Popen([exe, "record", "--format", "raw", "--idle", "-r", str(RATE), "--pid", str(pid),
                             "-o", str(out)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return Spy(proc, out, log, time.monotonic())


def detach(spy: Spy) -> None:
    """Stop sampling; py-spy writes its file on SIGINT."""
    spy.seconds = time.monotonic() - spy.started
    if spy.proc.poll() is None:
        spy.proc.send_signal(signal.SIGINT)
    try:
        spy.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.proc.kill()
        spy.proc.wait()
    spy.log.close()


def classify(stack: str) -> str:
    """The stage of one collapsed stack (frames joined by ``;``)."""
    frames = stack.split(";")
    for stage, pattern in STAGES:
        if any(pattern.search(frame) for frame in frames):
            return stage
    return OTHER


def breakdown(path: Path, messages: int) -> dict[str, Any]:
    """Samples per stage from py-spy's raw output, as µs per message and % of all samples."""
    counts: dict[str, int] = {stage: 0 for stage, _ in STAGES}
    counts[OTHER] = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit() and "bench/worker.py" in stack:  # the main thread's
            counts[classify(stack)] += int(count)
    total = sum(counts.values())
    if not total or not messages:
        raise RuntimeError(f"no samples in {path}" if not total else "no messages")
    us_per_sample = 1e6 / RATE
    stages = [{"stage": stage, "samples": n, "us_per_message": n * us_per_sample / messages,
               "percent": 100 * n / total} for stage, n in counts.items()]
    return {"samples": total, "messages": messages, "rate_hz": RATE, "stages": stages,
            "us_per_message": total * us_per_sample / messages}
