"""(p) Where the default batch handler's time goes, per message: py-spy samples sorted into stages.

:func:`attach` starts ``py-spy record --format raw`` on a worker process (once
its first record is touched), :func:`detach` stops it (SIGINT: py-spy then
writes its file) when the throughput phase is over. :func:`breakdown` reads
the collapsed stacks (``frame;frame;... count``, root first, each frame
``function (file:line)``) and puts each sample in the first stage of
:data:`STAGES` that any of its frames matches, else *other*. py-spy leaves out
idle samples (threads waiting in ``select`` or on a socket), so the table is
the time the process spent on the CPU or blocked in a non-idle call.
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
STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("handler", re.compile(r"^(handle_batch|handle|handle_nothing) \(.*bench/worker\.py")),
    ("claim (storage.store.claim_many)", re.compile(r"^claim_many \(.*exactlyonce/storage/store\.py")),
    ("signature check", re.compile(r"exactlyonce/signing\.py")),
    ("fingerprint", re.compile(r"^(fingerprint|stored_fingerprints) \(.*exactlyonce/")),
    ("ID resolution", re.compile(r"exactlyonce/ids\.py")),
    ("message wrapping (to_message)", re.compile(r"^to_message \(.*exactlyonce/_kafka/")),
    ("counters / booking", re.compile(r"^(write|add|report|fields) \(.*exactlyonce/runtime/booking\.py")),
    ("offset commit", re.compile(r"^(_commit \(.*exactlyonce/runtime/loop\.py"
                                 r"|commit\w* \(.*(/kafka/|exactlyonce/_kafka/))")),
    ("DB commit", re.compile(r"^\w*commit\w* \(.*(sqlalchemy|psycopg)")),
    ("Kafka fetch + decode (kafka.*)", re.compile(r"\(.*/kafka/")),
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
    proc = subprocess.Popen([exe, "record", "--format", "raw", "-r", str(RATE), "--pid", str(pid),
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
        if stack and count.isdigit():
            counts[classify(stack)] += int(count)
    total = sum(counts.values())
    if not total or not messages:
        raise RuntimeError(f"no samples in {path}" if not total else "no messages")
    us_per_sample = 1e6 / RATE
    stages = [{"stage": stage, "samples": n, "us_per_message": n * us_per_sample / messages,
               "percent": 100 * n / total} for stage, n in counts.items()]
    return {"samples": total, "messages": messages, "rate_hz": RATE, "stages": stages,
            "us_per_message": total * us_per_sample / messages}
