"""Telemetry of the runtime loop: bounded JSONL records of the refocus steps, a summary line at the end.

Record format (``type: "step"``): the refocus counter (``step``, the last step the record covers, and
``steps``, how many it covers), the history length, what the engine was doing (``ingest``/``score``/
``generate``), the actions taken (expands, collapses, summed over the steps), swap rate (mean over the steps of
changed entries over entries), utilisation (WC cost over ``W_max``, last and max), residency (fraction of
history blocks held at each LOD), the per-stage latency summed over the steps, ``crc`` (CRC-32 of the rest of
the line) and, in some records, ``focus``: the focus map as run-length-encoded levels along the history,
``"<level>x<blocks>,..."`` (e.g. ``"3x2,2x17,1x31,0x4"``; the partial trailing block counts as LOD0). That is
what the focus map (:mod:`megacontext.runtime.viz`) draws. The last line (``type: "summary"``) aggregates the
session. Logs written before this format carry ``lod_map`` (one character per block) instead of ``focus``;
readers accept both (:mod:`megacontext.runtime.focus_map`).

Bounded size (:class:`TelemetryConfig`): while ingesting, one record per ``every`` refocus steps (scoring and
generation, usually short and the interesting part, get one per step); a focus-map snapshot in every
``map_every``-th record, at phase changes and at close. A snapshot costs bytes per run of equal levels,
which is at most the WC's entry count (bounded by ``W_max``), never the history length, so bytes per token
stay flat however long the history grows. The log rotates past ``max_bytes`` (``telemetry.1.jsonl`` is the
newest rotated file, ``keep_files`` are kept), and ``enabled=False`` writes nothing.

Design choices
- JSONL, append-only and flushed per record, so a crashed or interrupted run still leaves a readable log and
  ``megacontext inspect`` can read a log that is still being written; a torn last line is tolerated, any
  other line that fails to parse or to match its ``crc`` is an error (fsck reports it).
- Bounded RAM: the in-memory log keeps the last ``keep_last`` per-step records; the last ``keep_maps`` of them
  keep the WC tiling they saw (immutable tensors, shared with the WC), older ones only their residency.
- Latency is accumulated per stage by :class:`StageTimer` and drained into each record, so a record's
  latencies are exactly the work done since the previous record. On CUDA the timer synchronises at stage
  boundaries only when asked to (``sync=True``); otherwise kernel time lands in whichever stage waits.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.runtime.focus_map import block_levels, focus_runs, lod_map, runs_residency

log = logging.getLogger(__name__)

STAGES = ("gist", "lens", "allocate", "prefill", "decode")


@dataclass
class TelemetryConfig(Config):
    enabled: bool = True  # write telemetry.jsonl (the in-memory log is kept either way)
    every: int = 16  # while ingesting, one JSONL record per this many refocus steps (score/generate: every step)
    map_every: int = 4  # a focus-map snapshot in every this-many-th record (and at phase changes and at close)
    max_bytes: int = 64 << 20  # rotate the log once it would pass this size (0 = never)
    keep_files: int = 2  # rotated logs kept: telemetry.1.jsonl (newest) .. telemetry.N.jsonl

    def __post_init__(self):
        check(self.every >= 1, f"every={self.every} must be >= 1")
        check(self.map_every >= 1, f"map_every={self.map_every} must be >= 1")
        check(self.max_bytes == 0 or self.max_bytes >= 1024, f"max_bytes={self.max_bytes}; expected 0 or >= 1024")
        check(self.keep_files >= 0, f"keep_files={self.keep_files} must be >= 0")


# ---------------------------------------------------------------------- records
@dataclass
class StepRecord:
    step: int
    num_tokens: int
    phase: str  # ingest | score | generate
    entries: int
    wc_cost: int
    w_max: int
    expands: int = 0
    collapses: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    type: str = "step"
    # the WC tiling after the step (levels [E], indices [E]); dropped for records older than keep_maps
    tiling: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    frozen_residency: dict[str, float] | None = field(default=None, repr=False)

    @property
    def focus(self) -> str:
        return focus_runs(self.tiling[0], self.num_tokens) if self.tiling is not None else ""

    @property
    def lod_map(self) -> str:
        """The old one-character-per-block map of this step's tiling ("" once the tiling was dropped)."""
        return lod_map(*self.tiling, self.num_tokens) if self.tiling is not None else ""

    @property
    def residency(self) -> dict[str, float]:
        if self.frozen_residency is not None:
            return self.frozen_residency
        if self.tiling is None:
            return {}
        lv, nb = block_levels(self.tiling[0], self.num_tokens)
        return runs_residency(lv.numpy().astype(np.int16), nb.numpy())

    def drop_tiling(self) -> None:
        """Forget the tiling, keeping its residency."""
        if self.tiling is not None:
            self.frozen_residency = self.residency
            self.tiling = None

    @property
    def swap_rate(self) -> float:
        return (self.expands + self.collapses) / max(self.entries, 1)

    @property
    def utilisation(self) -> float:
        return self.wc_cost / max(self.w_max, 1)

    def to_json(self) -> dict:
        """This one step as a JSONL row (with its focus map when the tiling is still held)."""
        d = {"type": self.type, "step": self.step, "steps": 1, "num_tokens": self.num_tokens, "phase": self.phase,
             "entries": self.entries, "wc_cost": self.wc_cost, "w_max": self.w_max, "expands": self.expands,
             "collapses": self.collapses, "swap_rate": round(self.swap_rate, 6),
             "utilisation": round(self.utilisation, 6), "max_utilisation": round(self.utilisation, 6),
             "residency": {k: round(v, 6) for k, v in self.residency.items()},
             "latency_ms": dict(self.latency_ms)}
        if self.tiling is not None:
            d["focus"] = self.focus
        return d


class _Aggregate:
    """Steps not yet written: sums of their counters, the last step's state."""

    def __init__(self):
        self.steps, self.expands, self.collapses, self.swap, self.max_util = 0, 0, 0, 0.0, 0.0
        self.latency: dict[str, float] = {}
        self.last: StepRecord | None = None

    def add(self, rec: StepRecord) -> None:
        self.steps += 1
        self.expands += rec.expands
        self.collapses += rec.collapses
        self.swap += rec.swap_rate
        self.max_util = max(self.max_util, rec.utilisation)
        for k, v in rec.latency_ms.items():
            self.latency[k] = self.latency.get(k, 0.0) + v
        self.last = rec

    def row(self, with_map: bool) -> dict:
        r = self.last
        d = {"type": "step", "step": r.step, "steps": self.steps, "num_tokens": r.num_tokens, "phase": r.phase,
             "entries": r.entries, "wc_cost": r.wc_cost, "w_max": r.w_max, "expands": self.expands,
             "collapses": self.collapses, "swap_rate": round(self.swap / self.steps, 6),
             "utilisation": round(r.utilisation, 6), "max_utilisation": round(self.max_util, 6),
             "residency": {k: round(v, 6) for k, v in r.residency.items()},
             "latency_ms": {k: round(v, 3) for k, v in self.latency.items()}}
        if with_map and r.tiling is not None:
            d["focus"] = r.focus
        return d


def _line(row: dict) -> str:
    """A row as one JSONL line carrying the CRC-32 of its other fields."""
    body = json.dumps(row, separators=(",", ":"))
    return body[:-1] + f',"crc":{zlib.crc32(body.encode())}}}' + "\n"


def rotated(path: Path, i: int) -> Path:
    """``telemetry.jsonl`` -> ``telemetry.<i>.jsonl`` (i >= 1: rotated logs, 1 the newest)."""
    return path.with_name(f"{path.stem}.{i}{path.suffix}")


class StageTimer:
    """Accumulates wall time per stage; :meth:`drain` returns and resets the totals (milliseconds)."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self._acc: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str):
        if name not in self._acc:
            raise ValueError(f"unknown telemetry stage {name!r}; expected one of {STAGES}")
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            self._acc[name] += dt
            self.totals[name] += dt

    def drain(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self._acc.items()}
        self._acc = dict.fromkeys(STAGES, 0.0)
        return out


class Telemetry:
    """Collects :class:`StepRecord` rows in memory and writes bounded JSONL records (see the module docstring).

    In memory: the last ``keep_last`` records, of which only the last ``keep_maps`` keep their tiling."""

    def __init__(self, path: str | Path | None = None, keep_last: int = 100_000, keep_maps: int = 64,
                 cfg: TelemetryConfig | None = None):
        if keep_last < 1 or not 0 <= keep_maps <= keep_last:
            raise ValueError(f"keep_last={keep_last}, keep_maps={keep_maps}; expected keep_last >= 1 and "
                             "0 <= keep_maps <= keep_last")
        self.cfg = cfg or TelemetryConfig()
        self.path = Path(path) if path is not None and self.cfg.enabled else None
        self.records: list[StepRecord] = []
        self.keep_last, self.keep_maps = keep_last, keep_maps
        self._fh = None
        self._agg = _Aggregate()
        self._written = 0  # records written in this session (decides which carry a map)
        self.bytes_written = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def log(self, rec: StepRecord) -> None:
        if self._fh is not None:
            last = self._agg.last
            if last is not None and last.phase != rec.phase:  # phases never share a record
                self._write(with_map=True)
            self._agg.add(rec)
            if rec.phase != "ingest" or self._agg.steps >= self.cfg.every:
                self._write(with_map=self._written % self.cfg.map_every == 0)
        self.records.append(rec)
        if len(self.records) > self.keep_last:  # bounded memory on endless streams
            del self.records[: len(self.records) - self.keep_last]
        if len(self.records) > self.keep_maps:  # one record leaves the window per log: O(1) per step
            self.records[-self.keep_maps - 1].drop_tiling()

    def _write(self, with_map: bool) -> None:
        if self._agg.steps == 0 or self._fh is None:
            return
        self._emit(self._agg.row(with_map))
        self._agg = _Aggregate()
        self._written += 1

    def _emit(self, row: dict) -> None:
        line = _line(row)
        size = len(line.encode())
        if self.cfg.max_bytes and self._fh.tell() and self._fh.tell() + size > self.cfg.max_bytes:
            self._rotate()
        self._fh.write(line)
        self._fh.flush()
        self.bytes_written += size

    def _rotate(self) -> None:
        self._fh.close()
        keep = self.cfg.keep_files
        if keep == 0:
            self.path.unlink()
        else:
            rotated(self.path, keep).unlink(missing_ok=True)
            for i in range(keep - 1, 0, -1):
                if rotated(self.path, i).exists():
                    os.replace(rotated(self.path, i), rotated(self.path, i + 1))
            os.replace(self.path, rotated(self.path, 1))
        self._fh = self.path.open("a", encoding="utf-8")

    def flush(self) -> None:
        """Write the steps not yet written (with a focus map)."""
        self._write(with_map=True)

    def summary(self, totals_ms: dict[str, float] | None = None) -> dict:
        return summarise([r.to_json() for r in self.records], totals_ms)

    def close(self, totals_ms: dict[str, float] | None = None) -> dict:
        self.flush()
        s = self.summary(totals_ms)
        if self._fh is not None:
            self._emit(s)
            self._fh.close()
            self._fh = None
        return s

    def abort(self) -> None:
        """Stop writing without flushing (what a crash leaves: the records written so far)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def summarise(rows: list[dict], totals_ms: dict[str, float] | None = None) -> dict:
    """Aggregate step rows (dicts as written to JSONL, one or several steps each) into one summary dict."""
    steps = [r for r in rows if r.get("type") == "step"]
    n = sum(r.get("steps", 1) for r in steps)
    lat = dict.fromkeys(STAGES, 0.0)
    for r in steps:
        for k, v in r.get("latency_ms", {}).items():
            lat[k] = lat.get(k, 0.0) + v
    weighted = lambda key: sum(r[key] * r.get("steps", 1) for r in steps) / n if n else 0.0
    return {
        "type": "summary",
        "steps": n,
        "num_tokens": steps[-1]["num_tokens"] if steps else 0,
        "expands": sum(r["expands"] for r in steps),
        "collapses": sum(r["collapses"] for r in steps),
        "mean_swap_rate": round(weighted("swap_rate"), 6),
        "mean_utilisation": round(weighted("utilisation"), 6),
        "max_utilisation": round(max((r.get("max_utilisation", r["utilisation"]) for r in steps), default=0.0), 6),
        "final_residency": steps[-1]["residency"] if steps else {},
        "latency_ms_total": {k: round(v, 3) for k, v in (totals_ms or lat).items()},
        "latency_ms_per_step": {k: round(v / max(n, 1), 3) for k, v in (totals_ms or lat).items()},
    }


def read_jsonl(path: str | Path, notes: list[str] | None = None) -> tuple[list[dict], dict | None]:
    """Read one telemetry log -> (step rows, summary row or None). Tolerates a torn last line (and says so in
    ``notes`` when given); a line that does not parse or does not match its ``crc`` is an error naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"telemetry log {str(path)!r} does not exist")
    steps, summary = [], None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (json.JSONDecodeError, ValueError):
            if i == len(lines) - 1:  # a run still writing (or killed while writing) may leave half a line
                log.warning("%s: ignoring a partial last line", path)
                if notes is not None:
                    notes.append(f"{path.name}: a partial last line (ignored)")
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
        if "crc" in row:
            stored = row.pop("crc")
            if stored != zlib.crc32(json.dumps(row, separators=(",", ":")).encode()):
                raise ValueError(f"{path}:{i + 1}: fails its checksum (the log is damaged)")
        if row.get("type") == "summary":
            summary = row
        elif row.get("type") == "step":
            steps.append(row)
    return steps, summary


def read_log(path: str | Path, notes: list[str] | None = None) -> tuple[list[dict], dict | None]:
    """Read a telemetry log and its rotated predecessors (oldest first) -> (step rows, last summary or None)."""
    path = Path(path)
    number = lambda p: p.stem[len(path.stem) + 1:]  # telemetry.<i>.jsonl -> "<i>"
    older = sorted((p for p in path.parent.glob(f"{path.stem}.*{path.suffix}") if number(p).isdigit()),
                   key=lambda p: -int(number(p)))
    steps, summary = [], None
    for p in [*older, path]:
        if p == path and not p.exists() and older:
            break
        s, summ = read_jsonl(p, notes)
        steps += s
        summary = summ or summary
    return steps, summary
