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
    if not top or not bottom or not bottom.get("rate"):
        return "-"
    return f"{top['rate'] / bottom['rate']:.2f}x"


def find(results: dict[str, Any], key: str, db: str | None) -> dict[str, Any] | None:
    for row in results.get("variants", []):
        if row["key"] == key and row["db"] == db:
            return row
    return None


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out: list[str] = ["# exactlyonce benchmark", ""]
    out.append(f"Run {meta['started']} on {meta['machine']}; Python {meta['python']}, "
               f"kafka-python {meta['kafka_python']}, SQLAlchemy {meta['sqlalchemy']}, "
               f"psycopg {meta['psycopg']}, PostgreSQL {meta['postgres']}, SQLite {meta['sqlite']}; "
               f"broker: {meta['broker']}. Command: `{meta['command']}`.")
    out.append("")
    out.append(f"Workload: JSON transfers (~{meta['payload_bytes']} bytes) between {meta['accounts']:,} accounts; "
               "each applied transfer is two balance UPDATEs and one `transfers` row, committed with its "
               "dedup row. Every variant reads the same pre-filled topic "
               f"({meta['messages']:,} records, {meta['partitions']} partitions) with a fresh consumer group "
               f"and a fresh database, and stops after all records or {meta['max_seconds']} s. Each variant "
               "runs in its own process.")
    out.append("")
    out.append("- **(a)** kafka-python `KafkaConsumer` (group, `enable_auto_commit=False`) JSON-decoding every "
               "record; **(b)** the same consumer and, per record, one transaction: `INSERT ... ON CONFLICT DO "
               "NOTHING RETURNING` into a one-column dedup table, then the example's `apply_transfer` (locking "
               "SELECT, two UPDATEs, one INSERT), commit; **(c)/(c1)** exactlyonce running the same "
               "`apply_transfer` as an ordinary handler with `batch_size=100`/`1`; **(d)** exactlyonce with a "
               "batch handler (`batch=True, batch_size=500`): one `executemany` of the 2 UPDATEs per transfer "
               "(in account order) and one multi-row INSERT of the transfer rows; **(d0)** the same with a "
               "handler that writes nothing: only exactlyonce's dedup rows, commits and offsets (its own "
               "cost). (a) and (b) commit offsets "
               "after each poll, as exactlyonce does. (b), (c) and (d) use the same engine settings "
               "(`exactlyonce._db.create_engine`).")
    out.append(f"- Consumer settings for all: `session_timeout_ms={meta['session_timeout_ms']}`, "
               "`fetch_max_wait_ms=10` (the embedded broker answers a fetch only when that wait runs out, "
               "even when records arrive earlier: with the default 500 ms a record waits ~130 ms at the median; "
               "Apache Kafka answers at once).")
    out.append("- **transient retries**: exactlyonce's retries of transient database errors (deadlocks, "
               "lost connections), counted from its log.")
    out.append("- **msgs/s**: records done / time from the first record touched to the last one committed "
               "(decoded, for raw); the group join is not included.")
    out.append("- **peak RSS**: `VmHWM` of the variant's process at its end (not `ru_maxrss`, which Linux "
               "carries over from the forking parent).")
    out.append(f"- **latency**: a separate phase after the throughput run: {meta['latency_messages']:,} "
               f"records sent at {meta['latency_rate']:g}/s to an empty topic the caught-up consumer "
               "reads; from the `sent_at` stamped at send to the database commit of the record "
               "(to decoding, for raw). A backlog would only measure queueing.")
    out.append("")

    if results.get("variants"):
        out += ["## Throughput, memory and latency", "",
                "| variant | database | records | msgs/s | peak RSS MiB | p50 ms | p99 ms | transient retries |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in results["variants"]:
            out.append(f"| {row['label']} | {DB_NAMES[row['db']]} | {row['count']:,} | {_num(row['rate'])} | "
                       f"{_mib(row.get('peak_rss_kb'))} | {_num(row.get('p50_ms'), 1)} | "
                       f"{_num(row.get('p99_ms'), 1)} | {row.get('retries', 0)} |")
        out.append("")
        dbs = [db for db in ("postgresql", "sqlite") if any(r["db"] == db for r in results["variants"])]
        raw = find(results, "a", None)
        out += ["| ratio | " + " | ".join(DB_NAMES[db] for db in dbs) + " |",
                "| --- |" + " ---: |" * len(dbs)]
        out.append("| (c)/(b): exactlyonce, ordinary handler, batch_size=100 / hand-written loop | "
                   + " | ".join(_ratio(find(results, "c", db), find(results, "b", db)) for db in dbs) + " |")
        out.append("| (c1)/(b): exactlyonce, batch_size=1 / hand-written loop | "
                   + " | ".join(_ratio(find(results, "c1", db), find(results, "b", db)) for db in dbs) + " |")
        out.append("| (d)/(a): exactlyonce, batch handler / raw consumer, no database | "
                   + " | ".join(_ratio(find(results, "d", db), raw) for db in dbs) + " |")
        out.append("| (d0)/(a): exactlyonce, batch handler writing nothing / raw consumer | "
                   + " | ".join(_ratio(find(results, "d0", db), raw) for db in dbs) + " |")
        out.append("| (d)/(c): batch handler / ordinary handler | "
                   + " | ".join(_ratio(find(results, "d", db), find(results, "c", db)) for db in dbs) + " |")
        out.append("")

    if results.get("batch_sizes"):
        out += ["## Throughput against batch size (ordinary handler, PostgreSQL)", "",
                "![throughput against batch size](throughput_vs_batch_size.png)", "",
                "| batch_size | records | msgs/s |", "| ---: | ---: | ---: |"]
        for row in results["batch_sizes"]:
            out.append(f"| {row['batch_size']} | {row['count']:,} | {_num(row['rate'])} |")
        out.append("")

    if results.get("scaling"):
        out += ["## Scaling: worker processes in one group (PostgreSQL, 8 partitions)", "",
                f"{meta['scaling_messages']:,} records; msgs/s from the first record any worker touched "
                "to the last one committed; *steady* is the rate between 10% and 90% of the records "
                "(dedup-table count polled by the parent every 0.25 s). "
                f"The machine has {meta['cpus']} cores, shared by the workers, PostgreSQL and the broker.",
                "*rebalances*: assignments after the first one (workers that joined late make the group "
                "rebalance mid-run); *retries*: transient database errors retried (deadlocks).",
                "", "| handler | workers | msgs/s | steady msgs/s | speed-up | records per worker | retries | "
                "rebalances |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        base: dict[str, float] = {}
        for row in results["scaling"]:
            if row["workers"] == 1:
                base[row["handler"]] = row["rate"]
            speedup = row["rate"] / base[row["handler"]] if base.get(row["handler"]) else math.nan
            out.append(f"| {row['handler']} | {row['workers']} | {_num(row['rate'])} | "
                       f"{_num(row['steady_rate'])} | {_num(speedup, 2)}x | "
                       f"{', '.join(f'{n:,}' for n in row['per_worker'])} | {row['retries']} | "
                       f"{row.get('rebalances', '-')} |")
        out.append("")

    if results.get("claims"):
        out += ["## Claim latency against dedup-table size", "",
                "`claim_many` of 500 fresh random IDs (uuid4 hex) in one transaction, and single `claim()` "
                "calls, each in its own transaction; the times exclude the commit (*+commit* includes it); "
                "p50/p99 over the repetitions after a warm-up.", "",
                "| database | call | empty p50 ms | empty p99 ms | full p50 ms | full p99 ms | full/empty (p50) |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for db, data in results["claims"].items():
            e, f = data["empty"], data["full"]
            calls = [("claim_many(500)", e, f, "claim_many"), ("claim_many(500) +commit", e, f, "claim_many_txn"),
                     ("claim() of 1 ID", e, f, "claim")]
            for label, em, fm, prefix in calls:
                ratio = fm[f"{prefix}_p50_ms"] / em[f"{prefix}_p50_ms"] if em[f"{prefix}_p50_ms"] else math.nan
                out.append(f"| {DB_NAMES[db]} | {label} | {_num(em[f'{prefix}_p50_ms'], 2)} | "
                           f"{_num(em.get(f'{prefix}_p99_ms'), 2)} | {_num(fm[f'{prefix}_p50_ms'], 2)} | "
                           f"{_num(fm.get(f'{prefix}_p99_ms'), 2)} | {_num(ratio, 2)}x |")
        out.append("")
        out.append("*empty*: a table with (almost) no rows; *full*: "
                   + ", ".join(f"{DB_NAMES[db]} {d['rows']:,} rows (filled in {d['fill_s']:.0f} s)"
                               for db, d in results["claims"].items()) + ".")
        out.append("")

    soak = results.get("soak")
    if soak and soak.get("samples"):
        samples = soak["samples"]
        first, last = samples[0], samples[-1]
        out += ["## RSS over a long run (batch handler, PostgreSQL)", "",
                f"{soak['count']:,} records at {_num(soak['rate'])} msgs/s. RSS after the first "
                f"{first['messages']:,} records: {_mib(first['rss_kb'])} MiB; after {last['messages']:,}: "
                f"{_mib(last['rss_kb'])} MiB ({(last['rss_kb'] - first['rss_kb']) / 1024:+,.1f} MiB); "
                f"peak {_mib(soak['peak_rss_kb'])} MiB.", "",
                "| records | RSS MiB |", "| ---: | ---: |"]
        out += [f"| {s['messages']:,} | {s['rss_kb'] / 1024:,.1f} |" for s in samples]
        out.append("")
        out.append("RSS is sampled (VmRSS) in the worker after the commit that crosses each multiple of "
                   f"{meta['soak_every']:,} records.")
        out.append("")

    if results.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


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
                              ("d", "exactlyonce batch handler, batch_size=500 (d)", ":")):
        row = find(results, key, "postgresql")
        if row and row.get("rate"):
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
