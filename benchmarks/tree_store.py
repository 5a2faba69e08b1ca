"""MegaContext Tree benchmark: ingest throughput, bytes on disk, peak RAM and random read latency.

Each (compressor, size) case runs in a fresh subprocess so its peak RSS is its own; peak RAM is reported
as the child's peak RSS minus its RSS after loading the embedding table and compressor ("beyond the model").
Tokens are random ids over the 19M base model's vocabulary, fed in 1M-token chunks; the store is durable
(fsync before every count publication). Read latencies are measured on a fresh read-only open with a warm
page cache.

    python benchmarks/tree_store.py                     # meanpool at 1M and 10M tokens, "real" at 1M
    python benchmarks/tree_store.py --cases meanpool:1000000 real:10000000

Writes docs/results/tree_store.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.core.assets import BASE_MODEL, embedded
from megacontext.core.provenance import git_commit
from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
EMBED = embedded(BASE_MODEL) / "model.safetensors"
CHUNK = 1 << 20
log = logging.getLogger("bench.tree_store")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_table() -> tuple[torch.Tensor, str]:
    if EMBED.is_file():
        from safetensors import safe_open

        with safe_open(str(EMBED), "pt") as f:
            name = next(k for k in f.keys() if "embed_tokens" in k)  # noqa: SIM118 (safe_open is not a dict)
            return f.get_tensor(name).float(), f"{BASE_MODEL} embed_tokens"
    torch.manual_seed(0)
    return torch.randn(16384, 384) * 0.02, "random [16384, 384]"


class NetCompressor:
    """Randomly initialised network of GistNet's cost behind the tree's compressor protocol."""

    def __init__(self, table: torch.Tensor):
        self.table, self.d_model = table, int(table.shape[1])
        norm = float(table.norm(dim=-1).mean())
        try:
            from megacontext.gistnet.model import GistNet, GistNetConfig

            self.net, self.kind = GistNet(GistNetConfig(layers=2), self.d_model, norm).eval(), "GistNet(layers=2)"
            self._call = lambda x, level: self.net(x, level)
        except ImportError:  # GistNet not in this checkout: a plain 2-layer encoder + mean pool of similar cost
            layer = torch.nn.TransformerEncoderLayer(self.d_model, 4, 2 * self.d_model, batch_first=True)
            self.net, self.kind = torch.nn.TransformerEncoder(layer, 2).eval(), "TransformerEncoder(2 layers)"
            self._call = lambda x, level: self.net(x).mean(dim=1)
        self.version = "bench-random-" + self.kind.split("(")[0].lower()

    def embed(self, ids):
        return self.table[ids]

    @torch.inference_mode()
    def compress(self, x, level):
        # the tree hands over 4096 blocks at once; on CPU that much attention activation is GBs, so the
        # adapter bounds its own working memory (a GPU adapter would pick a larger chunk)
        return torch.cat([self._call(x[i:i + 256].float(), level) for i in range(0, x.shape[0], 256)])


def run_case(compressor_name: str, n_tokens: int, workdir: Path) -> dict:
    table, table_src = load_table()
    comp = MeanPoolCompressor(table) if compressor_name == "meanpool" else NetCompressor(table)
    kind = comp.kind if compressor_name != "meanpool" else "MeanPoolCompressor"
    base_rss = rss_mb()
    root = workdir / f"{compressor_name}-{n_tokens}"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with MegaContextTree.create(root, comp.d_model, "bench", comp, config=TreeConfig()) as tree:
        for start in range(0, n_tokens, CHUNK):
            tree.append(rng.integers(0, table.shape[0], min(CHUNK, n_tokens - start), dtype=np.int32))
    ingest_s = time.perf_counter() - t0
    peak_delta = peak_rss_mb() - base_rss
    disk = sum(f.stat().st_size for f in root.iterdir())
    reader = MegaContextTree.open(root, readonly=True)
    n_blocks = reader.num_entries(0)
    picks = np.random.default_rng(1).integers(0, n_blocks, 2000)
    lat = {}
    for name, fn in (("block_tokens", lambda i: reader.tokens(i * 32, i * 32 + 32)),
                     ("lod1_gist", lambda i: reader.gists(1, i, i + 1)),
                     ("lod1_32_gists", lambda i: reader.gists(1, min(i, n_blocks - 32), min(i, n_blocks - 32) + 32))):
        times = []
        for i in picks.tolist():
            s = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - s)
        lat[name] = {"median_us": float(np.median(times) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6)}
    reader.close()
    shutil.rmtree(root)
    return {"compressor": compressor_name, "compressor_impl": kind, "embedding_table": table_src,
            "tokens": n_tokens, "ingest_s": ingest_s, "tokens_per_s": n_tokens / ingest_s,
            "bytes_on_disk": disk, "bytes_per_token": disk / n_tokens, "peak_ram_beyond_model_mb": peak_delta,
            "rss_after_model_mb": base_rss, "read_latency": lat, "torch_threads": torch.get_num_threads()}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.is_file() else []
    cpu = names[0] if names else cpu
    return f"CPU: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, torch {torch.__version__}"


def to_markdown(report: dict) -> str:
    lines = [
        "# MegaContext Tree store benchmark", "",
        f"- command: `{report['command']}`", f"- commit: `{report['commit']}`", f"- machine: {report['machine']}",
        f"- date: {report['date']}; 1-min load average at the end: {report.get('load_avg_1min_at_end', '?')} "
        "(the machine is shared: a load above the core count means throughput is a lower bound)",
        "- store: durable (fsync before each count publish), fp16 gists, "
        "batch 4096 blocks, random token ids fed in 1M-token chunks; reads on a warm page cache", "",
        "| compressor | tokens | ingest tok/s | bytes/token | peak RAM beyond model (MB) | block read median/p99 (us) "
        "| LOD1 gist read median/p99 (us) | 32 LOD1 gists median/p99 (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        cell = lambda k, lat=r["read_latency"]: f"{lat[k]['median_us']:.0f} / {lat[k]['p99_us']:.0f}"
        lines.append(f"| {r['compressor_impl']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['bytes_per_token']:.2f} | {r['peak_ram_beyond_model_mb']:.0f} | {cell('block_tokens')} | "
                     f"{cell('lod1_gist')} | {cell('lod1_32_gists')} |")
    target = [r for r in report["results"] if r["tokens"] >= 10_000_000]
    ok = all(r["peak_ram_beyond_model_mb"] < 1024 for r in target) if target else None
    lines += ["", f"Target (10M tokens, peak RAM < 1 GB beyond the model): "
              f"{'met' if ok else 'MISSED' if ok is False else 'not run'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["meanpool:1000000", "meanpool:10000000", "real:1000000"],
                   help="COMPRESSOR:TOKENS with COMPRESSOR in {meanpool, real}")
    p.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    p.add_argument("--single", nargs=2, metavar=("COMPRESSOR", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print only; do not write docs/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.single:
        print(json.dumps(run_case(args.single[0], int(args.single[1]), Path(args.workdir))))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tree_bench_"))
    results = []
    for case in args.cases:
        comp, n = case.split(":")
        if comp not in ("meanpool", "real"):
            raise SystemExit(f"bad case {case!r}: compressor must be meanpool or real")
        log.info("case %s, %s tokens", comp, n)
        out = subprocess.run([sys.executable, __file__, "--single", comp, n, "--workdir", str(work)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        log.info("%s %s: %.0f tok/s, %.2f B/token, peak +%.0f MB", comp, n, r["tokens_per_s"],
                 r["bytes_per_token"], r["peak_ram_beyond_model_mb"])
        results.append(r)
    load = os.getloadavg()[0]
    command = "python " + " ".join([Path(__file__).relative_to(REPO).as_posix(), *(argv or sys.argv[1:])])
    report = {"load_avg_1min_at_end": load, "command": command,
              "commit": git_commit(REPO), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "results": results}
    md = to_markdown(report)
    print(md)
    if not args.no_write:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "tree_store.json").write_text(json.dumps(report, indent=1))
        (OUT / "tree_store.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
