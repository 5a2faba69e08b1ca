"""Scale benchmark: ingest throughput into one big tree, per-token cost vs history length, DDP scaling.

    python benchmarks/scale.py ingest --tokens 100000000 --cache carry/books_tokens     # (a)
    python benchmarks/scale.py cost --histories 10000,1000000,100000000 --w-max 2048     # (b)
    torchrun --nproc_per_node=N benchmarks/scale.py ddp --steps 80                       # (c), N = 1 then 2
    python benchmarks/scale.py quick --base DIR --results DIR                            # all three, tiny, CPU

(a) streams N tokens (a token cache repeated as often as needed, or seeded random ids) into one
MegaContextTree with the compressor on the accelerator, and at checkpoints reports tokens/s (end to end
and gisting alone), disk bytes per token, host RSS (current, anonymous, peak) and peak GPU memory of the
interval, which must stay flat as the tree grows. (b) builds (or reuses) a tree per history length and
times ``Engine.score`` and ``Engine.generate`` on the same ``w_max``, with the engine's per-stage telemetry
(gist, lens, allocate, prefill, decode). A working context tiles its history from token 0 and can cover
at most ``wc.tiling.reach(w_max)`` tokens, so longer trees are read through a ``HistoryWindow`` of their
newest part (recorded per row). (c) runs the real GistNet trainer under torchrun and reports tokens/s
per world size (per-rank batch fixed: weak scaling) and the efficiency ``tps(N) / (N * tps(1))``.

Results merge into ``<results>/scale.json`` (one section per part, each with its command, commit and
machine) and ``scale.md`` is re-rendered from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_report import commit, machine, merge_section  # noqa: E402

from megacontext.base import FrozenBase  # noqa: E402
from megacontext.core.assets import BASE_MODEL  # noqa: E402
from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig  # noqa: E402

MB = 1 << 20


# ---------------------------------------------------------------------- environment
def host_memory() -> dict[str, float]:
    """MiB: VmRSS (incl. touched file-backed memmap pages), RssAnon (heap) and VmHWM (peak RSS)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def gpu_peak_mib(device: torch.device, reset: bool = True) -> float:
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / MB
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ---------------------------------------------------------------------- inputs
class TokenStream:
    """Chunks of token ids: a token cache cycled as often as needed (repeats counted), or seeded random ids."""

    def __init__(self, cache: str, vocab_size: int, seed: int = 0):
        self.vocab_size, self.pos, self.repeats = vocab_size, 0, 0
        self.gen = np.random.default_rng(seed)
        self.tokens = None
        if cache:
            from megacontext.data.token_cache import TokenCache

            self.tokens = TokenCache.open(cache).tokens  # memmap, never read whole
        self.unique = int(self.tokens.shape[0]) if self.tokens is not None else 0
        self.kind = f"token cache {cache} ({self.unique:,} tokens, cycled)" if cache else "seeded random ids"

    def take(self, n: int) -> torch.Tensor:
        if self.tokens is None:
            return torch.from_numpy(self.gen.integers(0, self.vocab_size, n, dtype=np.int64))
        parts = []
        while n > 0:
            k = min(n, self.unique - self.pos)
            parts.append(np.asarray(self.tokens[self.pos:self.pos + k], dtype=np.int64))
            self.pos, n = self.pos + k, n - k
            if self.pos == self.unique:
                self.pos, self.repeats = 0, self.repeats + 1
        return torch.from_numpy(np.concatenate(parts))


class TimedCompressor:
    """Compressor proxy that accumulates the (synchronised) time spent making gists."""

    def __init__(self, inner, device: torch.device):
        self.inner, self.device, self.seconds = inner, device, 0.0
        self.version, self.d_model = inner.version, inner.d_model

    def _timed(self, fn, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def embed(self, ids):
        return self._timed(self.inner.embed, ids)

    def compress(self, x, level):
        return self._timed(self.inner.compress, x, level)


class GistNetAdapter:
    """GistNet behind the tree's compressor protocol, used only until ``GistCompressor`` lands."""

    def __init__(self, net, base: FrozenBase):
        self.net, self.base, self.d_model = net.eval(), base, base.d_model
        self.version = f"gistnet:{net.weights_hash()}"

    def embed(self, ids):
        return self.base.embed(ids.to(self.base.device))

    @torch.no_grad()
    def compress(self, x, level):
        amp = torch.autocast("cuda", torch.bfloat16) if self.base.device.type == "cuda" else contextlib.nullcontext()
        with amp:
            return self.net(x.to(self.base.device), level)


def make_compressor(kind: str, base: FrozenBase, gistnet: str) -> tuple[object, str]:
    if kind == "meanpool":
        return MeanPoolCompressor.from_base(base), "MeanPoolCompressor"
    from megacontext.gistnet.model import GistNet, GistNetConfig

    if gistnet:
        net, what = GistNet.load(gistnet, base), f"GistNet {gistnet}"
    else:
        torch.manual_seed(0)  # same weights (and version) in every process, so stores can be reused
        net, what = GistNet(GistNetConfig(), base.d_model, base.embed_norm).to(base.device), "GistNet (untrained)"
    try:
        from megacontext.gistnet.compressor import GistCompressor

        return GistCompressor(net, base), f"{what} via GistCompressor"
    except ImportError:
        return GistNetAdapter(net, base), f"{what} via the benchmark's adapter (no GistCompressor yet)"


# ---------------------------------------------------------------------- (a) ingest
def ingest(base: FrozenBase, store: Path, total: int, checkpoints: list[int], stream: TokenStream, comp,
           args) -> list[dict]:
    """Stream ``total`` tokens into a new tree at ``store``; one row per checkpoint."""
    from tqdm import tqdm

    dev = base.device
    if store.exists():
        shutil.rmtree(store)
    timed = TimedCompressor(comp, dev)
    tree = MegaContextTree.create(store, base.d_model, base.fingerprint, timed,
                                  config=TreeConfig(batch_blocks=args.batch_blocks, durable=not args.no_fsync))
    rows, fed, last_t, last_fed, last_gist = [], 0, 0.0, 0, 0.0
    gpu_peak_mib(dev)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="tok", unit_scale=True, desc="ingest", mininterval=5) as bar:
        for cp in sorted(set(checkpoints + [total])):
            while fed < cp:
                n = min(args.chunk, cp - fed)
                tree.append(stream.take(n))
                fed += n
                bar.update(n)
            tree.flush()
            sync(dev)
            t = time.perf_counter() - t0
            rows.append({"tokens": fed, "seconds": round(t, 2),
                         "tok_per_s": round(fed / t), "interval_tok_per_s": round((fed - last_fed) / (t - last_t)),
                         "gist_tok_per_s": round((fed - last_fed) / max(timed.seconds - last_gist, 1e-9)),
                         "disk_bytes_per_token": round(dir_bytes(store) / fed, 3), "repeats": stream.repeats,
                         **{f"host_{k}_mib": v for k, v in host_memory().items()}, "gpu_peak_mib": gpu_peak_mib(dev)})
            print(json.dumps(rows[-1]), flush=True)
            last_t, last_fed, last_gist = t, fed, timed.seconds
    tree.close()
    return rows


# ---------------------------------------------------------------------- (b) per-token cost
def open_or_build(base: FrozenBase, path: Path, n: int, stream: TokenStream, comp, args) -> MegaContextTree:
    """A writable tree with >= n tokens: reuse ``path`` if it matches, else build it."""
    if (path / "meta.json").is_file():
        try:
            tree = MegaContextTree.open(path, comp, base.fingerprint, config=TreeConfig(durable=False))
            if tree.num_tokens >= n:
                return tree
            tree.close()
        except ValueError as e:
            print(f"rebuilding {path}: {e}", flush=True)
    ingest(base, path, n, [], stream, comp, args)
    return MegaContextTree.open(path, comp, base.fingerprint, config=TreeConfig(durable=False))


def make_policy(kind: str, base: FrozenBase, lensnet: str):
    if kind != "lensnet":
        return None, kind
    from megacontext.focus.lens import LensPolicy
    from megacontext.lensnet.model import LensNet, LensNetConfig

    if lensnet:
        return LensPolicy.load(lensnet, base), f"LensNet {lensnet}"
    torch.manual_seed(0)
    return LensPolicy(LensNet(LensNetConfig(), base.d_model).to(base.device), base), "LensNet (untrained)"


def cost_row(base: FrozenBase, tree: MegaContextTree, stream: TokenStream, args) -> dict:
    from megacontext.runtime.engine import Engine, EngineConfig
    from megacontext.runtime.sampling import SamplingConfig
    from megacontext.runtime.telemetry import StageTimer
    from megacontext.tree.window import HistoryWindow, window_start
    from megacontext.wc.tiling import reach
    from megacontext.wc.working_context import WorkingContextConfig

    dev = base.device
    wcfg = WorkingContextConfig(w_max=args.w_max, recent_raw=args.recent_raw)
    # tokens the run appends (warm-up, prompt, score, generate) plus up to 1,023 from aligning the start down
    room = 64 + args.score_tokens + args.prompt_tokens + args.gen_tokens + 1024
    length = reach(args.w_max, args.recent_raw) - room
    view = HistoryWindow(tree, window_start(tree.num_tokens, length))
    policy, policy_name = make_policy(args.focus, base, args.lensnet)
    eng = Engine(base, view, EngineConfig(wc=wcfg, focus="recency"), policy=policy)
    history = tree.num_tokens
    eng.score(stream.take(64))  # warm-up: kernels, caches, first refocus
    out = {"history_tokens": history, "window_start": view.start, "window_tokens": view.num_tokens,
           "reach": reach(args.w_max, args.recent_raw), "policy": policy_name}
    for mode in ("score", "generate"):
        eng.timer = StageTimer(sync=dev.type == "cuda")
        steps0 = eng.step
        gpu_peak_mib(dev)
        sync(dev)
        t0 = time.perf_counter()
        if mode == "score":
            n = args.score_tokens
            eng.score(stream.take(n))
        else:
            n = len(list(eng.generate(stream.take(args.prompt_tokens), SamplingConfig(max_new_tokens=args.gen_tokens))))
        sync(dev)
        wall = (time.perf_counter() - t0) * 1e3
        tot = eng.timer.totals
        steps = max(eng.step - steps0, 1)
        base_ms = tot["prefill"] + tot["decode"]
        out[mode] = {"tokens": n, "ms_per_token": round(wall / n, 3), "refocus_steps": steps,
                     "stage_ms_per_refocus": {k: round(v / steps, 3) for k, v in tot.items()},
                     "other_ms_per_refocus": round((wall - sum(tot.values())) / steps, 3),
                     "lens_alloc_share_of_base": round((tot["lens"] + tot["allocate"]) / max(base_ms, 1e-9), 4),
                     "gpu_peak_mib": gpu_peak_mib(dev)}
    out.update(wc_entries=len(eng.wc), wc_cost=eng.wc.cost, **{f"host_{k}_mib": v for k, v in host_memory().items()})
    return out


# ---------------------------------------------------------------------- (c) DDP training throughput
def ddp(args) -> dict | None:
    from megacontext.core import distributed as D
    from megacontext.gistnet.train import GistTrainConfig, train

    info = D.init_distributed(args.device)
    D.quiet_non_main_ranks(info)
    out = Path(args.work) / f"ddp_w{info.world}"
    if info.main and out.exists():
        shutil.rmtree(out)  # metrics.jsonl is appended to: start clean
    D.barrier()
    warm = max(1, args.steps // 4)
    cfg = GistTrainConfig(base=args.base, data=args.cache, out=str(out), context=args.context, horizon=args.horizon,
                          batch_size=args.batch_size, steps=args.steps, log_every=warm, val_every=0, save_every=0,
                          resume=False, device=args.device, warmup_lr_steps=0)
    dev = D.rank_device(info, args.device)
    train(cfg)
    peak = gpu_peak_mib(dev, reset=False)
    D.barrier()
    D.teardown()
    if not info.main:
        return None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    dt = by_step[args.steps] - by_step[warm]
    tokens = (args.steps - warm) * args.batch_size * info.world * (args.context + args.horizon)
    return {"world": info.world, "backend": info.backend or "none", "timed_steps": args.steps - warm,
            "rows_per_rank": args.batch_size, "window_tokens": args.context + args.horizon,
            "seconds": round(dt, 2), "tok_per_s": round(tokens / max(dt, 1e-9)), "gpu_peak_mib_rank0": peak}


# ---------------------------------------------------------------------- driver
def parse_ints(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["ingest", "cost", "ddp", "quick"])
    p.add_argument("--base", default=BASE_MODEL, help="base model: an embedded name, a directory or a hub id")
    p.add_argument("--cache", default="", help="token cache directory; empty = seeded random ids")
    p.add_argument("--device", default="auto")
    p.add_argument("--results", default=str(REPO / "docs" / "results"))
    p.add_argument("--work", default=str(REPO / "stores" / "scale"), help="stores and run directories")
    p.add_argument("--compressor", choices=["gistnet", "meanpool"], default="gistnet")
    p.add_argument("--gistnet", default="", help="GistNet checkpoint; empty = untrained weights (same cost)")
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--checkpoints", default="1e6,1e7,3e7,1e8")
    p.add_argument("--chunk", type=int, default=1 << 20, help="tokens per append call")
    p.add_argument("--batch-blocks", type=int, default=8192)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--histories", default="1e4,1e6,1e8")
    p.add_argument("--w-max", type=int, default=2048)
    p.add_argument("--recent-raw", type=int, default=128)
    p.add_argument("--focus", choices=["lensnet", "recency"], default="lensnet")
    p.add_argument("--lensnet", default="")
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--note", default="", help="free-text caveat stored with the section and shown in scale.md")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16, help="windows per rank per step")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--horizon", type=int, default=64)
    return p


# tiny sizes for CPU tests; 24k tokens exceed the reach of w_max=112 (20,480 tokens), so the window is exercised
QUICK = dict(tokens=24_000, checkpoints="8000", chunk=6_000, batch_blocks=256, histories="2048,24000",
             w_max=112, recent_raw=32, score_tokens=64, gen_tokens=8, prompt_tokens=16, steps=4, batch_size=2,
             context=128, horizon=16)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.part == "quick":
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.no_fsync = True
    command = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = Path(args.results)
    parts = ["ingest", "cost", "ddp"] if args.part == "quick" else [args.part]
    base = None
    if parts != ["ddp"]:
        base = FrozenBase.load(args.base, device=args.device, dtype="auto")
    for part in parts:
        dev = base.device if base is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        meta = {"command": command, "commit": commit(), "machine": machine(dev), "base": args.base, "note": args.note}
        if part == "ddp":
            if "WORLD_SIZE" in os.environ or args.part == "quick":
                row = ddp(args)
                if row is not None:
                    merge_section(results, "ddp", {**meta, "command": command if "WORLD_SIZE" not in os.environ
                                                   else f"torchrun --nproc_per_node={row['world']} " + command[7:]},
                                  row_key=str(row["world"]), row=row)
            else:
                print("ddp: launch under torchrun (see benchmarks/scale.sh)", file=sys.stderr)
                return 2
            continue
        stream = TokenStream(args.cache, base.vocab_size)
        comp, comp_name = make_compressor(args.compressor, base, args.gistnet)
        meta.update(source=stream.kind, compressor=comp_name)
        work = Path(args.work)
        if part == "ingest":
            rows = ingest(base, work / f"h{args.tokens}", args.tokens, parse_ints(args.checkpoints), stream, comp, args)
            merge_section(results, "ingest", {**meta, "batch_blocks": args.batch_blocks, "fsync": not args.no_fsync,
                                              "rows": rows})
        else:
            rows = []
            for h in parse_ints(args.histories):
                tree = open_or_build(base, work / f"h{h}", h, stream, comp, args)
                try:
                    rows.append(cost_row(base, tree, stream, args))
                finally:
                    tree.close()
                print(json.dumps(rows[-1]), flush=True)
            merge_section(results, "cost", {**meta, "w_max": args.w_max, "recent_raw": args.recent_raw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
