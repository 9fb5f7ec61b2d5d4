"""Render the results: a Markdown report and the batch-size plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DB_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite", None: "none"}


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _mib(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.0f}"


def _ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None) -> str:
    if not ok(top) or not ok(bottom):
        return "-"
    assert top and bottom
    return f"{top['rate'] / bottom['rate']:.2f}x"


def find(results: dict[str, Any], key: str, db: str | None) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = results.get("variants", [])
    return next((row for row in rows if row["key"] == key and row["db"] == db), None)


def ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and row.get("status", "ok") == "ok" and bool(row.get("rate"))  # type: ignore[union-attr]


def _rate_ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None) -> float | None:
    return top["rate"] / bottom["rate"] if ok(top) and ok(bottom) else None  # type: ignore[index]


def _why_missing(*rows: tuple[str, dict[str, Any] | None]) -> str:
    for name, row in rows:
        if row is None:
            return f"{name} not run"
        if row.get("status", "ok") != "ok":
            return f"{name} {row['status']}"
    return "-"


def _target(what: str, measured: list[tuple[str, float | None, str]], goal: float, *,
            below: bool = False, informational: bool = False) -> str:
    """One Targets row: each measured value (or why there is none), met when every value reaches ``goal``."""
    parts = [f"{name}: {value:,.2f}" if value is not None and not math.isnan(value) else f"{name}: {why}"
             for name, value, why in measured]
    values = [v for _, v, _ in measured]
    if not values or any(v is None or math.isnan(v) for v in values):
        verdict = "not measured"
    elif informational:
        verdict = "reported"
    elif all((v <= goal) if below else (v >= goal) for v in values):  # type: ignore[operator]
        verdict = "**met**"
    else:
        verdict = "not met"
    return f"| {what} | {'; '.join(parts) or '-'} | {verdict} |"


def targets(results: dict[str, Any]) -> list[str]:
    """The "Targets" table: each target of the throughput issue, its ratio(s), met or not."""
    dbs = [db for db in ("postgresql", "sqlite") if any(r["db"] == db for r in results.get("variants", []))]
    raw = find(results, "a", None)
    out = ["## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]

    def ratios(top: str, bottom: str | None) -> list[tuple[str, float | None, str]]:
        rows = []
        for db in dbs:
            t, b = find(results, top, db), (find(results, bottom, db) if bottom else raw)
            rows.append((f"{DB_NAMES[db]} ({top})/({bottom or 'a'})", _rate_ratio(t, b),
                         _why_missing((f"({top})", t), (f"({bottom or 'a'})", b))))
        return rows

    if results.get("variants"):
        out.append(_target("1. batch handler, defaults, >= 0.5x raw kafka-python", ratios("d", None), 0.5))
        out.append(_target("1'. the batch handler's statements alone, no Kafka, no exactlyonce / raw kafka-python "
                           "(informational: a reference for 1 and 3, one connection, 500 records/txn)",
                           ratios("d-sql", None), 0.5, informational=True))
        out.append(_target("2. ordinary handler, defaults, >= 5x hand-written 1 txn/record",
                           ratios("c", "b"), 5.0))
        out.append(_target("2'. what batching commits gives the same statements by hand: hand-written "
                           "100 records/txn / 1 txn/record (informational: a reference for 2)",
                           ratios("b100", "b"), 5.0, informational=True))
        out.append(_target("2''. the ordinary handler's statements alone, no Kafka, no exactlyonce, 100 "
                           "records/txn / hand-written 1 txn/record (informational: the same statements with "
                           "nothing around them, a reference for 2)",
                           ratios("c-sql", "b"), 5.0, informational=True))
        out.append(_target('3. batch handler, kafka_client="confluent", >= 1.0x raw kafka-python',
                           ratios("d-c", None), 1.0))
        out.append(_target("4. crc32c: (a) and (d) with C CRC / pure-Python CRC (informational, > 1 = faster)",
                           [("(a)/(a-nocrc)", _rate_ratio(raw, find(results, "a-nocrc", None)),
                             _why_missing(("(a)", raw), ("(a-nocrc)", find(results, "a-nocrc", None)))),
                            ("PostgreSQL (d)/(d-nocrc)", _rate_ratio(find(results, "d", "postgresql"),
                                                                     find(results, "d-nocrc", "postgresql")),
                             _why_missing(("(d)", find(results, "d", "postgresql")),
                                          ("(d-nocrc)", find(results, "d-nocrc", "postgresql"))))], 1.0,
                           informational=True))
    soak = results.get("soak")
    if soak and soak.get("samples"):
        first, last = soak["samples"][0], soak["samples"][-1]
        out.append(_target(f"5a. RSS flat over {soak['count']:,} records: last / first sample <= 1.10",
                           [("RSS last/first", last["rss_kb"] / first["rss_kb"], "-")], 1.10, below=True))
    d_pg = find(results, "d", "postgresql")
    if d_pg and d_pg.get("p99_ms") is not None:
        out.append(f"| 5b. p99 commit latency at {results['meta']['latency_rate']:g} msg/s, (d) PostgreSQL "
                   f"(no fixed goal: compare with the last run) | {d_pg['p99_ms']:.1f} ms | reported |")
    for db, data in (results.get("claims") or {}).items():
        for kind in ("uuid4", "uuid7"):
            if kind in data:
                e, f = data[kind]["empty"]["claim_many_p50_ms"], data[kind]["full"]["claim_many_p50_ms"]
                # The target is for time-ordered IDs (the Producer's UUIDv7); random
                # uuid4s, which land all over the index, are reported beside them.
                note = " (random IDs, reported: the target is for time-ordered ones)" if kind == "uuid4" else ""
                out.append(_target(f"5c. claim_many(500) p50 at {data['rows']:,} rows <= 1.2x empty, "
                                   f"{DB_NAMES[db]}, {kind}{note}",
                                   [("full/empty", f / e if e else None, "-")],
                                   1.2, below=True, informational=kind == "uuid4"))
    for case, what in (
        ("hot", "6. hot rows: throughput never collapses to zero (lowest rate over a window of 3 of the run's "
         "median commit intervals, within 1 s and 2 s, > 0 msgs/s)"),
        ("hot-unbounded", "6'. the same with lock waits not bounded below lock_timeout (informational: the "
                          "reference for 6, deadlocks found by PostgreSQL's 1 s check)"),
    ):
        rows = [r for r in results.get("scaling", []) if r.get("case") == case]
        if rows:
            mins = [(f"{r['workers']} workers min {r.get('window_s', 1.0):.1f} s rate (longest pause "
                     f"{r.get('longest_pause_s', math.nan):.1f} s)", r.get("min_window_rate"),
                     r.get("status", "ok") if r.get("status", "ok") != "ok" else "run shorter than the window")
                    for r in rows]
            out.append(_target(what, mins, 1e-9, informational=case != "hot"))
    prof = results.get("profile")
    if prof:
        text = (f"{prof['us_per_message']:.0f} µs/msg sampled; see Profile" if "stages" in prof
                else f"not available: {prof['unavailable']}")
        out.append(f"| 7. profile of (d) on PostgreSQL | {text} | {'reported' if 'stages' in prof else '-'} |")
    failed = [r for r in results.get("variants", []) if r.get("status", "ok").startswith("FAILED")]
    failed += [r for r in results.get("scaling", []) if r.get("status", "ok").startswith("FAILED")]
    out.append(f"| 8. every variant's self-check (applied exactly once, balance conserved) | "
               f"{len(failed)} failed | {'**met**' if not failed else 'not met'} |")
    out.append("")
    return out


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out: list[str] = ["# exactlyonce benchmark", ""]
    out.append(f"Run {meta['started']} on {meta['machine']}; Python {meta['python']}, "
               f"kafka-python {meta['kafka_python']}, SQLAlchemy {meta['sqlalchemy']}, "
               f"psycopg {meta['psycopg']}, PostgreSQL {meta['postgres']}, SQLite {meta['sqlite']}; "
               f"**broker: {meta['broker']}**. Command: `{meta['command']}`.")
    out.append("")
    out.append(f"Sizes: main topic {meta['messages']:,} records ({meta['partitions']} partitions; a variant stops "
               f"after all of them or {meta['max_seconds']} s); latency phase {meta['latency_messages']:,} records "
               f"at {meta['latency_rate']:g}/s; scaling {meta['scaling_messages']:,} records (batch handler) and "
               f"{meta['hot_messages']:,} (ordinary handler, hot rows); RSS soak {meta['soak_messages']:,} records; "
               f"claim latency at {meta['dedup_rows']:,} dedup rows.")
    out.append("")
    out += targets(results)
    out.append(f"Workload: JSON transfers (~{meta['payload_bytes']} bytes) between {meta['accounts']:,} accounts; "
               "each applied transfer is two balance UPDATEs and one `transfers` row, committed with its "
               "dedup row. Every variant reads the same pre-filled topic with a fresh consumer group "
               "and a fresh database, each in its own process; before (a), the topic is read once the way (a) "
               "reads it, unrecorded, so that (a), the first variant measured, does not pay the broker's "
               "warm-up.")
    out.append("")
    out.append("- **(a)** kafka-python `KafkaConsumer` (group, `enable_auto_commit=False`) JSON-decoding every "
               "record; **(a-nocrc)** the same with `import crc32c` blocked in its process (kafka-python then "
               "checks CRCs in pure Python); **(a-c)** confluent-kafka's `Consumer` (librdkafka) JSON-decoding "
               "every record, committing after each `consume()`; **(b)** the kafka-python consumer and, per record, "
               "one transaction: `INSERT ... ON CONFLICT DO NOTHING RETURNING` into a one-column dedup table, then "
               "the example's `apply_transfer` (locking SELECT, two UPDATEs, one INSERT), commit; **(b100)** the "
               "same statements 100 records a transaction (what batching commits alone gives them); **(c)** "
               "exactlyonce running the same `apply_transfer` as an ordinary handler with default settings (no "
               "`batch_size`); **(c-sql)** (c)'s statements alone, 100 records a transaction (a multi-row dedup "
               "INSERT, then `record_transfer` record by record), on records read from Kafka beforehand: no "
               "Kafka while timed and no exactlyonce; **(d)** exactlyonce with a batch handler (`batch=True`, "
               "default settings): one "
               "`executemany` of the 2 UPDATEs per transfer (in account order) and one multi-row INSERT; "
               "**(d100)** the same with `batch_size=100` (the default before 2026-12-02); **(d0)** the same "
               "with a handler that writes nothing "
               "(exactlyonce's own cost); **(d-sql)** (d)'s statements alone, 500 records a transaction (a "
               "multi-row dedup INSERT, the UPDATEs, the INSERT), on records read from Kafka beforehand: no Kafka "
               "while timed and no exactlyonce; **(d-c)** (d) with `kafka_client=\"confluent\"` and librdkafka-style "
               "`consumer_config`; **(d-nocrc)** (d) with `crc32c` blocked. (a), (a-c) and (b) commit offsets "
               "after each poll, as exactlyonce does. (b), (c) and (d) use the same engine settings "
               "(`exactlyonce._db.create_engine`).")
    out.append(f"- Consumer settings for all: `session_timeout_ms={meta['session_timeout_ms']}`, "
               "`fetch_max_wait_ms=10` (`session.timeout.ms`, `fetch.wait.max.ms` for confluent-kafka).")
    out.append("- **check**: after its throughput phase every variant checks its own result: raw consumers, that "
               "every decoded ID is distinct; database variants, that dedup rows == records committed == "
               "transfer rows == distinct transfer IDs and that the sum of balances is unchanged. A variant "
               "failing it is shown as FAILED, without numbers. *not available*: the variant cannot run here "
               "(an optional client missing, or the App refusing `kafka_client`), with the reason.")
    out.append("- **msgs/s**: records done / time from the first record touched to the last one committed "
               "(decoded, for raw); the group join is not included. **CRC**: the CRC-32C kafka-python used in "
               "that process. **peak RSS**: `VmHWM` of the variant's process at its end.")
    out.append(f"- **latency**: a separate phase after the throughput run: {meta['latency_messages']:,} "
               f"records sent at {meta['latency_rate']:g}/s to an empty topic the caught-up consumer "
               "reads; from the `sent_at` stamped at send to the database commit of the record "
               "(to decoding, for raw). Measured for (a), (b), (c) and (d).")
    out.append("")
    out += _variants(results)
    out += _profile(results)
    out += _batch_sizes(results)
    out += _scaling(results)
    out += _claims(results)
    out += _soak(results)
    if results.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def _variants(results: dict[str, Any]) -> list[str]:
    if not results.get("variants"):
        return []
    out = ["## Throughput, memory and latency", "",
           "| variant | database | records | msgs/s | peak RSS MiB | p50 ms | p99 ms | transient retries | CRC |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in results["variants"]:
        if row.get("status", "ok") != "ok":
            out.append(f"| {row['label']} | {DB_NAMES[row['db']]} | {row['status']} | | | | | | |")
            continue
        out.append(f"| {row['label']} | {DB_NAMES[row['db']]} | {row['count']:,} | {_num(row['rate'])} | "
                   f"{_mib(row.get('peak_rss_kb'))} | {_num(row.get('p50_ms'), 1)} | "
                   f"{_num(row.get('p99_ms'), 1)} | {row.get('retries', 0)} | {row.get('crc', '-')} |")
    out.append("")
    dbs = [db for db in ("postgresql", "sqlite") if any(r["db"] == db for r in results["variants"])]
    raw = find(results, "a", None)
    out += ["| ratio | " + " | ".join(DB_NAMES[db] for db in dbs) + " |", "| --- |" + " ---: |" * len(dbs)]
    for top, bottom, text in (("c", "b", "(c)/(b): ordinary handler, defaults / hand-written loop"),
                              ("b100", "b", "(b100)/(b): hand-written loop, 100 records/txn / 1 txn/record"),
                              ("c", "b100", "(c)/(b100): ordinary handler / hand-written loop, 100 records/txn"),
                              ("c-sql", "b", "(c-sql)/(b): (c)'s statements alone / hand-written loop"),
                              ("c", "c-sql", "(c)/(c-sql): ordinary handler / its statements alone"),
                              ("d", None, "(d)/(a): batch handler, defaults / raw kafka-python"),
                              ("d100", None, "(d100)/(a): batch handler, batch_size=100 / raw kafka-python"),
                              ("d0", None, "(d0)/(a): batch handler writing nothing / raw kafka-python"),
                              ("d-sql", None, "(d-sql)/(a): (d)'s statements alone / raw kafka-python"),
                              ("d", "d-sql", "(d)/(d-sql): batch handler / its statements alone"),
                              ("d-c", None, "(d-c)/(a): batch handler on confluent-kafka / raw kafka-python"),
                              ("d", "c", "(d)/(c): batch handler / ordinary handler")):
        out.append(f"| {text} | " + " | ".join(
            _ratio(find(results, top, db), find(results, bottom, db) if bottom else raw) for db in dbs) + " |")
    out.append("| (a-c)/(a): raw confluent-kafka / raw kafka-python | "
               + " | ".join(_ratio(find(results, "a-c", None), raw) for _ in dbs) + " |")
    out.append("")
    return out


def _profile(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    out = ["## Profile: the default batch handler on PostgreSQL, per message", ""]
    if "stages" not in prof:
        return [*out, f"Not available: {prof['unavailable']}.", ""]
    out.append(f"py-spy (`record --format raw --idle -r {prof['rate_hz']}`) attached to the worker of a run like (d) "
               f"from its first record to the end of its throughput phase: {prof['samples']:,} samples over "
               f"{prof['messages']:,} records ({_num(prof['rate'])} msgs/s while sampled). Each sample goes to "
               "the first stage any frame of its stack matches (the handler's own SQL is *handler*, the claim's "
               "INSERT is *claim*, commits outside them are *DB commit*; `bench/profiling.py` has the rules). "
               "Only the worker's main thread is counted, idle samples included (waiting for a fetch or a "
               "commit is part of a record's time), so the total is about the wall time per record; py-spy "
               "pauses the process for each sample, which slows it somewhat.")
    out += ["", "| stage | µs per message | % |", "| --- | ---: | ---: |"]
    for stage in prof["stages"]:
        out.append(f"| {stage['stage']} | {stage['us_per_message']:,.1f} | {stage['percent']:.1f} |")
    out.append(f"| **total** | {prof['us_per_message']:,.1f} | 100 |")
    out.append("")
    return out


def _batch_sizes(results: dict[str, Any]) -> list[str]:
    if not results.get("batch_sizes"):
        return []
    out = ["## Throughput against batch size (ordinary handler, PostgreSQL)", "",
           "![throughput against batch size](throughput_vs_batch_size.png)", "",
           "| batch_size | records | msgs/s |", "| ---: | ---: | ---: |"]
    for row in results["batch_sizes"]:
        out.append(f"| {row['batch_size']} | {row['count']:,} | {_num(row['rate'])} |")
    out.append("")
    return out


def _scaling(results: dict[str, Any]) -> list[str]:
    if not results.get("scaling"):
        return []
    meta = results["meta"]
    out = ["## Scaling: worker processes in one group (PostgreSQL, 8 partitions)", "",
           f"*batch*: the batch handler, defaults, {meta['scaling_messages']:,} records; *message*: the ordinary "
           f"handler, defaults, {meta['hot_messages']:,} records; *hot*: the ordinary handler on "
           f"{meta['hot_messages']:,} transfers that each pay one of 5 hot accounts (every transaction locks "
           "one of them), a transaction of several records waiting at most `batch_lock_timeout` (default 200 ms) for a "
           "lock; *hot-unbounded*: the same with `batch_lock_timeout` equal to `lock_timeout` (30 s), so that a "
           "deadlock waits for PostgreSQL's own check (`deadlock_timeout`, 1 s), as before that option. msgs/s "
           "from the first record any worker touched to the last one committed; *steady*: "
           "between 10% and 90% of the records; *min rate*: the lowest rate over any window of at least *window* "
           "seconds (dedup-table count polled by the parent every 0.25 s), from the group's last rebalance on (a "
           "rebalance pauses every member by design); *window*: 3 of the run's median intervals between "
           "samples that saw the count grow, within 1 s and 2 s (one worker at 150 msgs/s and 100 records a "
           "transaction commits every 0.6-0.7 s, and a transaction now and then over a second leaves a 1-second "
           "window without a commit while it works normally; a pause over 2 s always shows); *longest pause*: "
           "the longest interval between two samples that saw the count grow after the last rebalance (known "
           "to about one sampling interval). Each run's records are produced once "
           "every worker has its partitions, so that the workers' joins, one after another, are not part of it. "
           f"The machine has {meta['cpus']} cores, shared by the workers, PostgreSQL and the broker. "
           "*retries*: transient database errors retried (deadlocks); *rebalances*: assignments after the first.",
           "", "| case | workers | msgs/s | steady msgs/s | min rate msgs/s | window s | longest pause s | speed-up | "
           "records per worker | retries | rebalances | check |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    base: dict[str, float] = {}
    for row in results["scaling"]:
        case = row.get("case", row["handler"])
        if row.get("status", "ok") != "ok" and "rate" not in row:
            out.append(f"| {case} | {row['workers']} | {row['status']} | | | | | | | | | |")
            continue
        if row["workers"] == 1:
            base[case] = row["rate"]
        speedup = row["rate"] / base[case] if base.get(case) else math.nan
        rate = _num(row["rate"]) if row.get("status", "ok") == "ok" else row["status"]
        out.append(f"| {case} | {row['workers']} | {rate} | {_num(row['steady_rate'])} | "
                   f"{_num(row.get('min_window_rate'))} | {_num(row.get('window_s'), 1)} | "
                   f"{_num(row.get('longest_pause_s'), 1)} | {_num(speedup, 2)}x | "
                   f"{', '.join(f'{n:,}' for n in row['per_worker'])} | {row['retries']} | "
                   f"{row.get('rebalances', '-')} | {'ok' if row.get('status', 'ok') == 'ok' else 'FAILED'} |")
    out.append("")
    return out


def _claims(results: dict[str, Any]) -> list[str]:
    if not results.get("claims"):
        return []
    out = ["## Claim latency against dedup-table size", "",
           "`claim_many` of 500 fresh IDs in one transaction, and single `claim()` calls, each in its own "
           "transaction; the times exclude the commit (*+commit* includes it); p50/p99 over the repetitions "
           "after a warm-up. *uuid4*: random IDs (uuid4 hex), the table filled with keys spread over the same "
           "key space; *uuid7*: time-ordered IDs from `exactlyonce.producer.new_message_id` (the Producer's), "
           "the table filled with UUIDv7 text stamped 1 ms apart before now.", "",
           "| database | IDs | call | empty p50 ms | empty p99 ms | full p50 ms | full p99 ms | full/empty (p50) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    fills = []
    for db, data in results["claims"].items():
        for kind in ("uuid4", "uuid7"):
            if kind not in data:
                continue
            e, f = data[kind]["empty"], data[kind]["full"]
            fills.append(f"{DB_NAMES[db]} {kind} {data['rows']:,} rows in {data[kind]['fill_s']:.0f} s")
            for label, prefix in (("claim_many(500)", "claim_many"), ("claim_many(500) +commit", "claim_many_txn"),
                                  ("claim() of 1 ID", "claim")):
                ratio = f[f"{prefix}_p50_ms"] / e[f"{prefix}_p50_ms"] if e[f"{prefix}_p50_ms"] else math.nan
                out.append(f"| {DB_NAMES[db]} | {kind} | {label} | {_num(e[f'{prefix}_p50_ms'], 2)} | "
                           f"{_num(e.get(f'{prefix}_p99_ms'), 2)} | {_num(f[f'{prefix}_p50_ms'], 2)} | "
                           f"{_num(f.get(f'{prefix}_p99_ms'), 2)} | {_num(ratio, 2)}x |")
    out += ["", "*empty*: a table with (almost) no rows; *full*: filled: " + ", ".join(fills) + ".", ""]
    return out


def _soak(results: dict[str, Any]) -> list[str]:
    soak = results.get("soak")
    if not (soak and soak.get("samples")):
        return []
    samples = soak["samples"]
    first, last = samples[0], samples[-1]
    out = ["## RSS over a long run (batch handler, defaults, PostgreSQL)", "",
           f"{soak['count']:,} records at {_num(soak['rate'])} msgs/s. RSS after the first "
           f"{first['messages']:,} records: {_mib(first['rss_kb'])} MiB; after {last['messages']:,}: "
           f"{_mib(last['rss_kb'])} MiB ({(last['rss_kb'] - first['rss_kb']) / 1024:+,.1f} MiB); "
           f"peak {_mib(soak['peak_rss_kb'])} MiB.", "", "| records | RSS MiB |", "| ---: | ---: |"]
    out += [f"| {s['messages']:,} | {s['rss_kb'] / 1024:,.1f} |" for s in samples]
    out += ["", "RSS is sampled (VmRSS) in the worker after the commit that crosses each multiple of "
            f"{results['meta']['soak_every']:,} records.", ""]
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    """Write the throughput-against-batch-size plot; False when there is nothing to plot."""
    rows = results.get("batch_sizes") or []
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    sizes = [r["batch_size"] for r in rows]
    ax.plot(sizes, [r["rate"] for r in rows], marker="o", label="exactlyonce, ordinary handler")
    for key, label, style in (("b", "hand-written loop, 1 txn/record (b)", "--"),
                              ("d", "exactlyonce batch handler, defaults (d)", ":")):
        row = find(results, key, "postgresql")
        if ok(row):
            assert row
            ax.axhline(row["rate"], linestyle=style, color="gray" if key == "b" else "tab:green", label=label)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("batch_size (records per transaction)")
    ax.set_ylabel("messages / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against batch size (PostgreSQL, transfer workload)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
