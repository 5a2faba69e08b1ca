"""Telemetry of the runtime loop: one JSON line per refocus step, a summary line at the end.

Record format (``type: "step"``): the refocus counter, the history length, what the engine was doing
(``ingest``/``score``/``generate``), the actions taken (expands, collapses), swap rate (changed entries
over entries), utilisation (WC cost over ``W_max``), residency (fraction of history tokens held at each
LOD), the per-stage latency since the previous record, and ``lod_map``: one character per 32-token block
of the history giving the level of the entry that covers it. ``lod_map`` is what the focus map
(:mod:`megacontext.runtime.viz`) draws; a partial trailing block (raw tokens not yet forming a block) counts as
LOD0. The last line (``type: "summary"``) aggregates the run.

Design choices
- JSONL, append-only and flushed per line, so a crashed or interrupted run still leaves a readable log
  and ``megacontext inspect`` can read a log that is still being written.
- Bounded RAM: a ``lod_map`` holds one character per history block (~59 KB at 1.9M tokens), so the
  in-memory log keeps the maps of the last ``keep_maps`` records only; older records keep their residency
  (computed before the map is dropped) and the JSONL file keeps every map, which is where ``inspect`` and
  the focus map read them from. At most ``keep_last`` records are kept in memory at all.
- Latency is accumulated per stage by :class:`StageTimer` and drained into each record, so a record's
  latencies are exactly the work done since the previous record. On CUDA the timer synchronises at stage
  boundaries only when asked to (``sync=True``); otherwise kernel time lands in whichever stage waits.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, segment_ids, span_tensor

log = logging.getLogger(__name__)

STAGES = ("gist", "lens", "allocate", "prefill", "decode")
LOD_CHARS = "012"


def lod_map(levels: Tensor, indices: Tensor, num_tokens: int) -> str:
    """Per-32-token-block level string of a WC tiling.

    levels, indices [E] (entries in history order, tiling ``[0, covered)``); tokens past the last
    complete entry (the raw tail not yet forming a block) count as LOD0."""
    levels = levels.detach().to("cpu", torch.long)
    blocks_per_entry = span_tensor(levels) // BLOCK  # [E]
    # segment_ids, not repeat_interleave: the latter starts worker threads (~20 ms on a loaded 2-core CPU)
    per_block = levels[segment_ids(blocks_per_entry, int(blocks_per_entry.sum()))]
    total_blocks = -(-num_tokens // BLOCK)
    if per_block.numel() < total_blocks:
        per_block = torch.cat([per_block, per_block.new_zeros(total_blocks - per_block.numel())])
    return (per_block[:total_blocks] + ord("0")).to(torch.uint8).numpy().tobytes().decode("ascii")


def residency(lods: str) -> dict[str, float]:
    """Fraction of history blocks held at each LOD, from a :func:`lod_map` string."""
    n = max(len(lods), 1)
    return {f"lod{c}": lods.count(c) / n for c in LOD_CHARS}


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
    lod_map: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)
    type: str = "step"
    # residency frozen when the in-memory log drops lod_map (see Telemetry); never written to JSON
    frozen_residency: dict[str, float] | None = field(default=None, repr=False)

    @property
    def residency(self) -> dict[str, float]:
        return self.frozen_residency if self.frozen_residency is not None else residency(self.lod_map)

    def drop_map(self) -> None:
        """Forget ``lod_map`` (kept in the JSONL file), keeping its residency."""
        if self.lod_map:
            self.frozen_residency = residency(self.lod_map)
            self.lod_map = ""

    @property
    def swap_rate(self) -> float:
        return (self.expands + self.collapses) / max(self.entries, 1)

    @property
    def utilisation(self) -> float:
        return self.wc_cost / max(self.w_max, 1)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["frozen_residency"]
        d["swap_rate"] = round(self.swap_rate, 6)
        d["utilisation"] = round(self.utilisation, 6)
        d["residency"] = {k: round(v, 6) for k, v in self.residency.items()}
        return d


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
    """Collects :class:`StepRecord` rows, optionally streaming them to a JSONL file.

    In memory: the last ``keep_last`` records, of which only the last ``keep_maps`` keep their ``lod_map``
    (see the module docstring); the file gets every record in full."""

    def __init__(self, path: str | Path | None = None, keep_last: int = 100_000, keep_maps: int = 64):
        if keep_last < 1 or not 0 <= keep_maps <= keep_last:
            raise ValueError(f"keep_last={keep_last}, keep_maps={keep_maps}; expected keep_last >= 1 and "
                             "0 <= keep_maps <= keep_last")
        self.path = Path(path) if path is not None else None
        self.records: list[StepRecord] = []
        self.keep_last, self.keep_maps = keep_last, keep_maps
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def log(self, rec: StepRecord) -> None:
        if self._fh is not None:  # written before any map is dropped: the file is the full record
            self._fh.write(json.dumps(rec.to_json()) + "\n")
            self._fh.flush()
        self.records.append(rec)
        if len(self.records) > self.keep_last:  # bounded memory on endless streams; the file keeps all
            del self.records[: len(self.records) - self.keep_last]
        if len(self.records) > self.keep_maps:  # one record leaves the window per log: O(1) per step
            self.records[-self.keep_maps - 1].drop_map()

    def summary(self, totals_ms: dict[str, float] | None = None) -> dict:
        return summarise([r.to_json() for r in self.records], totals_ms)

    def close(self, totals_ms: dict[str, float] | None = None) -> dict:
        s = self.summary(totals_ms)
        if self._fh is not None:
            self._fh.write(json.dumps(s) + "\n")
            self._fh.close()
            self._fh = None
        return s


def summarise(rows: list[dict], totals_ms: dict[str, float] | None = None) -> dict:
    """Aggregate step rows (dicts as written to JSONL) into one summary dict."""
    steps = [r for r in rows if r.get("type") == "step"]
    n = len(steps)
    lat = dict.fromkeys(STAGES, 0.0)
    for r in steps:
        for k, v in r.get("latency_ms", {}).items():
            lat[k] = lat.get(k, 0.0) + v
    mean = lambda key: sum(r[key] for r in steps) / n if n else 0.0
    return {
        "type": "summary",
        "steps": n,
        "num_tokens": steps[-1]["num_tokens"] if n else 0,
        "expands": sum(r["expands"] for r in steps),
        "collapses": sum(r["collapses"] for r in steps),
        "mean_swap_rate": round(mean("swap_rate"), 6),
        "mean_utilisation": round(mean("utilisation"), 6),
        "max_utilisation": round(max((r["utilisation"] for r in steps), default=0.0), 6),
        "final_residency": steps[-1]["residency"] if n else {},
        "latency_ms_total": {k: round(v, 3) for k, v in (totals_ms or lat).items()},
        "latency_ms_per_step": {k: round(v / max(n, 1), 3) for k, v in (totals_ms or lat).items()},
    }


def read_jsonl(path: str | Path) -> tuple[list[dict], dict | None]:
    """Read a telemetry log -> (step rows, summary row or None). Tolerates a torn last line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"telemetry log {str(path)!r} does not exist")
    steps, summary = [], None
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run still writing may leave half a line
                log.warning("%s: ignoring a partial last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
        if row.get("type") == "summary":
            summary = row
        elif row.get("type") == "step":
            steps.append(row)
    return steps, summary
