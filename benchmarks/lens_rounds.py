"""Anatomy of the learned focus's rounds during a read: milliseconds, tensor ops, syncs and copies per round.

    python benchmarks/lens_rounds.py --device cpu --history-tokens 30000 --w-max 2048 --score-tokens 256 \
        --out docs/results/lens_rounds_cpu
    python benchmarks/lens_rounds.py --device cuda --history-tokens 60000 --w-max 2048 --score-tokens 1024 \
        --out docs/results/lens_rounds_gpu

A focus round does little arithmetic (a two-layer network over a few hundred entries), so on a GPU its time
goes to dispatch: hundreds of small kernels, copies and syncs (engine_speed.md: ~11 ms per round on an H200).
Besides wall time this therefore counts, per round, split into the lens (``policy.scores``) and the allocator
(``wc.refocus``):
- ``ops``: ATen ops dispatched;
- ``scalar_reads``: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``), a host
  sync only where the tensor lives on a device;
- ``device_syncs``: scalar reads, ``nonzero`` and boolean-mask indexing of tensors on a device;
- ``h2d`` / ``d2h``: copies between the host and a device.
On a CPU run only ``ops`` and ``scalar_reads`` can be non-zero. Two passes over fresh stores: one timed (the
engine's stage timer, medians over the score call's rounds, with the network's own time split off), one
counted (a ``TorchDispatchMode``, which slows what it watches). ``--reference`` scores with
``LensPolicy(cache=False)`` (no entry table, no memo), which must give the same NLL and final tiling
(``nll_sum``, ``tiling_crc``). Writes ``OUT.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megacontext.api import MegaContext
from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL, LENSNET_MODEL, resolve
from megacontext.core.provenance import git_commit, machine
from megacontext.demo.input import ships_log
from megacontext.runtime.engine import EngineConfig
from megacontext.wc.working_context import WorkingContextConfig

REPO = Path(__file__).resolve().parents[1]


# ops that wait for the device when their input lives there (a boolean-mask index goes through nonzero)
_SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2"}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops into ``self.bucket`` (a Counter chosen by the caller), syncs and copies."""

    def __init__(self):
        super().__init__()
        self.bucket: collections.Counter | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.bucket is not None:
            name = str(func.overloadpacket)
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            on_device = first is not None and first.device.type != "cpu"
            self.bucket["ops"] += 1
            if name == "aten._local_scalar_dense":
                self.bucket["scalar_reads"] += 1  # .item() / int() / bool() / .tolist(): a sync when on a device
            masked = name in _INDEXING and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
            if on_device and (name in _SYNCING or masked):
                self.bucket["device_syncs"] += 1
            if name in ("aten._to_copy", "aten.copy_"):
                src = args[1] if name == "aten.copy_" else first
                dst = first if name == "aten.copy_" else out
                if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                    self.bucket["h2d" if dst.device.type != "cpu" else "d2h"] += 1
        return out


def _wrap(obj, attr: str, before, after) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **kw):
        before()
        try:
            return fn(*a, **kw)
        finally:
            after()
    setattr(obj, attr, wrapped)


def one_pass(base, ids, args, store: Path, count: bool) -> dict:
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=args.w_max, recent_raw=128), focus="lensnet")
    h, s = args.history_tokens, args.score_tokens
    with MegaContext.create(store, base, config=cfg, lensnet=resolve(args.lensnet), durable=False) as mc:
        eng = mc.engine
        if args.reference:
            eng.policy.cache = False
        mc.ingest(ids[:h])
        per_round: list[dict] = []
        counter = OpCounter() if count else None
        if count:
            cur: dict[str, collections.Counter] = {}

            def start(part):
                def f():
                    cur[part] = collections.Counter()
                    counter.bucket = cur[part]
                return f

            def stop():
                counter.bucket = None

            _wrap(eng.policy, "scores", start("lens"), stop)
            wc_refocus = eng.wc.refocus
            eng.wc.refocus = lambda *a, **kw: (start("allocate")(), wc_refocus(*a, **kw), stop())[1]
            rec = eng._record

            def record(phase):  # one round ends with its telemetry record
                if cur:
                    per_round.append({f"{p}_{k}": v for p, c in cur.items() for k, v in c.items()})
                    cur.clear()
                return rec(phase)
            eng._record = record
            with counter:
                t0 = time.perf_counter()
                res = mc.score(ids[h:h + s])
        else:
            lens_ms: list[dict] = []
            rec = eng._record
            net_ms = [0.0]
            net_forward = eng.policy.net.forward

            def timed_net(*a, **kw):  # the network's share of the lens stage (the rest is feature assembly)
                t = time.perf_counter()
                try:
                    return net_forward(*a, **kw)
                finally:
                    if base.device.type == "cuda":
                        torch.cuda.synchronize()
                    net_ms[0] += (time.perf_counter() - t) * 1e3
            eng.policy.net.forward = timed_net

            def record(phase):
                row = {k: v for k, v in eng.timer._acc.items() if k in ("lens", "allocate")}
                row["net"], net_ms[0] = net_ms[0], 0.0
                row["lens_without_net"] = row["lens"] - row["net"]
                lens_ms.append(row)
                return rec(phase)
            eng._record = record
            t0 = time.perf_counter()
            res = mc.score(ids[h:h + s])
        wall = time.perf_counter() - t0
        out = {"score_s": wall, "mean_nll": res.mean_nll, "nll_sum": float(res.nll.nan_to_num().sum()),
               "tiling_crc": zlib.crc32(torch.stack([eng.wc.levels, eng.wc.indices]).numpy().tobytes()),
               "stage_ms": {k: round(v, 1) for k, v in eng.timer.totals.items()},
               "table": {"hits": eng.policy._table.hits, "misses": eng.policy._table.misses}
               if hasattr(eng.policy, "_table") else None}
        if count:
            out["rounds"] = per_round
        else:
            out["round_ms"] = lens_ms
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--base", default=BASE_MODEL)
    ap.add_argument("--lensnet", default=LENSNET_MODEL)
    ap.add_argument("--history-tokens", type=int, default=30_000)
    ap.add_argument("--w-max", type=int, default=2048)
    ap.add_argument("--score-tokens", type=int, default=256)
    ap.add_argument("--reference", action="store_true", help="LensPolicy(cache=False): recompute every round")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default="", help="OUT.json (optional)")
    args = ap.parse_args()
    base = FrozenBase.load(resolve(args.base), device=args.device)
    need = args.history_tokens + args.score_tokens
    ids = torch.tensor(base.encode(ships_log(6 * need, seed=1)[0])[:need], dtype=torch.long)
    with tempfile.TemporaryDirectory() as d:
        timed = one_pass(base, ids, args, Path(d) / "timed", count=False)
        counted = one_pass(base, ids, args, Path(d) / "counted", count=True)
    rounds = counted.pop("rounds")
    keys = sorted({k for r in rounds for k in r})
    med = {k: statistics.median(r.get(k, 0) for r in rounds) for k in keys}
    ms = {k: statistics.median(r[k] for r in timed["round_ms"] if k in r)
          for k in ("lens", "net", "lens_without_net", "allocate")}
    res = {"command": "python " + " ".join(sys.argv), "commit": args.commit or git_commit(REPO),
           "machine": machine(base.device), "reference": args.reference, "rounds": len(rounds),
           "median_ms_per_round": ms, "median_counts_per_round": med,
           "timed": {k: v for k, v in timed.items() if k != "round_ms"}, "counted": counted,
           "same_result_both_passes": timed["tiling_crc"] == counted["tiling_crc"]
           and timed["nll_sum"] == counted["nll_sum"]}
    print(json.dumps({k: v for k, v in res.items() if k not in ("timed", "counted")}, indent=1))
    print("timed:", res["timed"])
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
