"""Persistent latency cache: SQLite (WAL, busy timeout) shared by every process on the machine.

Measurements are keyed by what decides a latency: the graph's structural hash, the bound input shapes, the
execution provider (with its session settings), the device's name, the onnxruntime version and the graph
optimisation level. Per-kernel cost-model entries live in the same file, one table per device.

A hit is a dict lookup (the process keeps what it read or wrote); a miss in the dict is one indexed SELECT on
a connection kept open for the life of the cache object.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xrlflow.latency import Latency

CACHE_ENV = "XRLFLOW_CACHE_DIR"
CACHE_FILE = "latency.sqlite"
BUSY_TIMEOUT_S = 30.0


def default_cache_path() -> Path:
    """~/.cache/xrlflow/latency.sqlite, or $XRLFLOW_CACHE_DIR/latency.sqlite."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder).expanduser() / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xrlflow" / CACHE_FILE


@dataclass(frozen=True, slots=True)
class CacheKey:
    graph_hash: str
    input_shapes: str  # "name=1x128;mask=1x128", sorted by name
    provider: str  # execution provider and the session settings that change timing ("CPUExecutionProvider/t1")
    device: str
    ort_version: str
    opt_level: str

    def as_row(self) -> tuple[str, ...]:
        return (self.graph_hash, self.input_shapes, self.provider, self.device, self.ort_version, self.opt_level)


def format_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ";".join(f"{name}={'x'.join(str(d) for d in shape)}" for name, shape in sorted(shapes.items()))


def _table_for_device(device: str) -> str:
    return "op_cost_" + (re.sub(r"[^0-9a-zA-Z]+", "_", device).strip("_").lower() or "unknown")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    graph_hash TEXT NOT NULL, input_shapes TEXT NOT NULL, provider TEXT NOT NULL, device TEXT NOT NULL,
    ort_version TEXT NOT NULL, opt_level TEXT NOT NULL,
    ms REAL NOT NULL, low_ms REAL NOT NULL, high_ms REAL NOT NULL, runs INTEGER NOT NULL,
    ok INTEGER NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (graph_hash, input_shapes, provider, device, ort_version, opt_level)
) WITHOUT ROWID
"""


def _retry_while_locked(action, timeout_s: float = BUSY_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


class LatencyCache:
    """One open connection per process (reopened after a fork); safe to share the file between processes."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._memory: dict[CacheKey, Latency] = {}
        self._op_memory: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._tables: set[str] = set()

    # ---- connection -----------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            # Switching a new file to WAL takes an exclusive lock and can answer "database is locked" at once,
            # without waiting on busy_timeout, when another process opens the same new file at that moment.
            _retry_while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            _retry_while_locked(lambda: conn.execute(_SCHEMA))
            self._conn, self._pid, self._tables = conn, os.getpid(), set()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "LatencyCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- end-to-end measurements ----------------------------------------------------------------------------
    def get(self, key: CacheKey) -> Latency | None:
        hit = self._memory.get(key)
        if hit is not None:
            return hit
        with self._lock:
            row = self._connection().execute(
                "SELECT ms, low_ms, high_ms, runs, ok, reason FROM latency WHERE graph_hash=? AND input_shapes=? "
                "AND provider=? AND device=? AND ort_version=? AND opt_level=?",
                key.as_row(),
            ).fetchone()
        if row is None:
            return None
        ms, low, high, runs, ok, reason = row
        if not ok:
            ms = low = high = float("inf")
        hit = Latency(ms, low, high, runs, "cache", ok=bool(ok), reason=reason)
        self._memory[key] = hit
        return hit

    def put(self, key: CacheKey, latency: Latency) -> None:
        finite = latency.ok
        row = key.as_row() + (
            latency.ms if finite else -1.0, latency.low_ms if finite else -1.0, latency.high_ms if finite else -1.0,
            latency.runs, int(latency.ok), latency.reason, time.time(),
        )
        with self._lock:
            self._connection().execute("INSERT OR REPLACE INTO latency VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
        self._memory[key] = Latency(latency.ms, latency.low_ms, latency.high_ms, latency.runs, "cache", latency.ok, latency.reason)

    # ---- per-kernel cost-model tables (one table per device) ------------------------------------------------
    def _op_table(self, device: str) -> str:
        table = _table_for_device(device)
        if table not in self._tables:
            self._connection().execute(
                f"CREATE TABLE IF NOT EXISTS {table} (kernel_key TEXT PRIMARY KEY, provider TEXT NOT NULL, "
                "ort_version TEXT NOT NULL, ms REAL NOT NULL, low_ms REAL NOT NULL, high_ms REAL NOT NULL, "
                "runs INTEGER NOT NULL, created REAL NOT NULL) WITHOUT ROWID"
            )
            self._tables.add(table)
        return table

    def get_op(self, device: str, kernel_key: str) -> float | None:
        hit = self._op_memory.get((device, kernel_key))
        if hit is not None:
            return hit
        with self._lock:
            row = self._connection().execute(
                f"SELECT ms FROM {self._op_table(device)} WHERE kernel_key=?", (kernel_key,)
            ).fetchone()
        if row is None:
            return None
        self._op_memory[(device, kernel_key)] = row[0]
        return row[0]

    def put_op(self, device: str, kernel_key: str, provider: str, ort_version: str, latency: Latency) -> None:
        with self._lock:
            self._connection().execute(
                f"INSERT OR REPLACE INTO {self._op_table(device)} VALUES (?,?,?,?,?,?,?,?)",
                (kernel_key, provider, ort_version, latency.ms, latency.low_ms, latency.high_ms, latency.runs, time.time()),
            )
        self._op_memory[(device, kernel_key)] = latency.ms

    def op_table(self, device: str) -> dict[str, float]:
        """Every per-kernel entry of one device (for export and for loading into a CostModel)."""
        with self._lock:
            rows = self._connection().execute(f"SELECT kernel_key, ms FROM {self._op_table(device)}").fetchall()
        return dict(rows)

    # ---- maintenance ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        with self._lock:
            conn = self._connection()
            total, ok = conn.execute("SELECT COUNT(*), COALESCE(SUM(ok), 0) FROM latency").fetchone()
            by_device = conn.execute(
                "SELECT device, provider, ort_version, COUNT(*) FROM latency GROUP BY device, provider, ort_version"
            ).fetchall()
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'op_cost_%'"
            ).fetchall()]
            op_counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {
            "path": str(self.path),
            "bytes": size,
            "measurements": total,
            "failed": total - ok,
            "by_setting": [
                {"device": d, "provider": p, "ort_version": v, "entries": n} for d, p, v, n in by_device
            ],
            "op_tables": op_counts,
        }

    def clear(self) -> int:
        """Delete every entry (measurements and per-kernel tables); returns how many rows went."""
        with self._lock:
            conn = self._connection()
            removed = conn.execute("DELETE FROM latency").rowcount
            for (table,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'op_cost_%'"
            ).fetchall():
                removed += conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                conn.execute(f"DROP TABLE {table}")
            self._tables.clear()
            conn.execute("VACUUM")
        self._memory.clear()
        self._op_memory.clear()
        return removed
