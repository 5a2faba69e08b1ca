"""Load benchmark of ``megacontext serve``: N concurrent sessions x M turns of (append a turn, generate a reply).

Measures, per request type, p50/p99/mean latency as the client sees it (HTTP included), throughput (requests,
appended and generated tokens per second of wall time), the server's commit latency and its memory (resident
and peak, from ``GET /v1/stats``). Each session is driven by its own thread; every request waits for the
previous one of its session, as an agent loop does, so N is the concurrency.

    python benchmarks/serve_load.py --sessions 8 --turns 10                  # starts a server (embedded models)
    python benchmarks/serve_load.py --url http://host:8765 --label gpu-h200  # a running server (MEGACONTEXT_TOKEN)

Results are merged into ``docs/results/serve_load.json`` under ``--label`` (one entry per machine/setting) and
the page ``docs/results/serve_load.md`` is rewritten from all entries, each naming its command, commit and
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from megacontext.core.config import Config, add_config_args, check, config_from_args

REPO = Path(__file__).resolve().parents[1]
WORDS = ("ship", "harbour", "north", "captain", "logbook", "cargo", "storm", "anchor", "sail", "crew", "lantern",
         "compass", "island", "tide", "rope", "deck", "signal", "course", "bearing", "knots", "hull", "mast", "galley",
         "chart", "reef", "coast", "dawn", "dusk")


@dataclass
class LoadConfig(Config):
    sessions: int = 8  # concurrent sessions (one client thread each)
    turns: int = 10  # turns per session; a turn = append a user message + generate a reply
    turn_words: int = 30  # words per appended user message
    gen_tokens: int = 16  # tokens per generated reply
    url: str = ""  # a running server (token from MEGACONTEXT_TOKEN); empty = start one on the embedded models
    device: str = "cpu"  # server device when this script starts it
    workers: int = 4  # server thread pool (when started here)
    max_open: int = 8  # server LRU size (when started here); below `sessions` measures reopen churn
    durable: bool = True  # server fsyncs every commit (when started here)
    focus: str = "lexical"  # focus policy of the benchmark sessions
    w_max: int = 1024  # working-context budget of the benchmark sessions
    label: str = ""  # key of this run in the results (default: derived from machine and settings)
    out: str = "docs/results/serve_load"  # writes OUT.json (merged) and OUT.md
    seed: int = 0

    def __post_init__(self):
        for name in ("sessions", "turns", "turn_words", "gen_tokens", "workers", "max_open"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


# ---------------------------------------------------------------------- machine and provenance
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"cpu": cpu, "cores": cores, "ram_gib": mem, "python": platform.python_version(),
           "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------- server
class LocalServer:
    """``megacontext serve`` on a free port and a temporary data root (embedded models)."""

    def __init__(self, cfg: LoadConfig, token: str):
        self.tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(self.tmp.name) / "server.log", "w")  # noqa: SIM115  (closed in stop())
        cmd = [sys.executable, "-m", "megacontext.cli", "serve", "--data-root", str(Path(self.tmp.name) / "data"),
               "--port", str(port), "--device", cfg.device, "--workers", str(cfg.workers), "--max-open",
               str(cfg.max_open), "--durable", str(cfg.durable).lower(), "--max-new-tokens",
               str(max(cfg.gen_tokens, 64))]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "MEGACONTEXT_TOKEN": token},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(Path(self.tmp.name) / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 300:
                raise RuntimeError("server did not start within 300 s")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.tmp.cleanup()


# ---------------------------------------------------------------------- load
def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "mean_ms": round(statistics.fmean(ms), 1), "max_ms": round(ms[-1], 1)}


def drive_session(http: httpx.Client, sid: str, cfg: LoadConfig, start: threading.Barrier, rec: dict) -> None:
    rng = random.Random(f"{cfg.seed}:{sid}")
    start.wait()
    for t in range(cfg.turns):
        text = f"User: turn {t}: " + " ".join(rng.choice(WORDS) for _ in range(cfg.turn_words)) + ".\n"
        t0 = time.perf_counter()
        r = http.post(f"/v1/sessions/{sid}/append", json={"text": text})
        r.raise_for_status()
        rec["append"].append((time.perf_counter() - t0) * 1e3)
        rec["appended_tokens"] += r.json()["appended_tokens"]
        t0 = time.perf_counter()
        r = http.post(f"/v1/sessions/{sid}/generate", json={"prompt": "Assistant:", "max_new_tokens": cfg.gen_tokens})
        r.raise_for_status()
        rec["generate"].append((time.perf_counter() - t0) * 1e3)
        rec["generated_tokens"] += r.json()["generated_tokens"]
        rec["prompt_tokens"] += r.json()["prompt_tokens"]


def run(cfg: LoadConfig) -> dict:
    token = os.environ.get("MEGACONTEXT_TOKEN") or secrets.token_hex(16)
    server = None if cfg.url else LocalServer(cfg, token)
    url = cfg.url or server.url
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)
    try:
        stats0 = http.get("/v1/stats").json()
        run_id = secrets.token_hex(3)
        sids = [f"load-{run_id}-{i}" for i in range(cfg.sessions)]
        create_ms = []
        for sid in sids:
            t0 = time.perf_counter()
            http.post("/v1/sessions", json={"id": sid, "config": {"focus": cfg.focus, "wc": {"w_max": cfg.w_max}}}
                      ).raise_for_status()
            create_ms.append((time.perf_counter() - t0) * 1e3)
        rec = {"append": [], "generate": [], "appended_tokens": 0, "generated_tokens": 0, "prompt_tokens": 0}
        start = threading.Barrier(cfg.sessions + 1)
        clients = [httpx.Client(base_url=url, headers=http.headers, timeout=600) for _ in sids]
        threads = [threading.Thread(target=drive_session, args=(c, sid, cfg, start, rec))
                   for c, sid in zip(clients, sids, strict=True)]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        stats1 = http.get("/v1/stats").json()
        if len(rec["append"]) != cfg.sessions * cfg.turns:
            raise RuntimeError("a session thread failed; see the traceback above")
        for sid in sids if server is None else ():
            http.delete(f"/v1/sessions/{sid}")  # leave a shared server as it was
    finally:
        http.close()
        if server is not None:
            server.stop()
    requests = 2 * cfg.sessions * cfg.turns
    return {
        "config": asdict(cfg), "commit": git_commit(), "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "server": "remote " + cfg.url if cfg.url else "started by the benchmark (embedded models)",
        "startup_s": round(server.startup_s, 1) if server else None,
        "wall_s": round(wall, 2),
        "create_session": summary(create_ms), "append": summary(rec["append"]), "generate": summary(rec["generate"]),
        "throughput": {"requests_per_s": round(requests / wall, 2),
                       "turns_per_s": round(cfg.sessions * cfg.turns / wall, 2),
                       "appended_tokens_per_s": round(rec["appended_tokens"] / wall, 1),
                       "generated_tokens_per_s": round(rec["generated_tokens"] / wall, 1)},
        "tokens": {k: rec[k] for k in ("appended_tokens", "prompt_tokens", "generated_tokens")},
        "server_stats": {"commit_ms": stats1.get("commit_ms"), "rss_mib_before": stats0.get("rss_mib"),
                         "rss_mib_after": stats1.get("rss_mib"), "peak_rss_mib": stats1.get("peak_rss_mib"),
                         "opens": stats1["opens"] - stats0["opens"],
                         "evictions": stats1["evictions"] - stats0["evictions"],
                         "commits": stats1["commits"] - stats0["commits"]},
    }


# ---------------------------------------------------------------------- results page
def render(runs: dict) -> str:
    lines = ["# `megacontext serve` under load", "",
             "Written by `benchmarks/serve_load.py` (do not edit by hand: rerun it). Each run drives N sessions "
             "concurrently, one client thread per session; a turn appends a user message "
             "(`turn_words` words) and then generates a reply of `gen_tokens` tokens (greedy, prompt "
             "`Assistant:`), each request waiting for the previous one of its session, as an agent loop does. "
             "Latency is what the client sees (HTTP included) and includes the commit to disk that precedes "
             "every acknowledgement. p99 over a few hundred requests is close to the maximum; read it as such.",
             "", "| run | sessions x turns | append p50 / p99 ms | generate p50 / p99 ms | turns/s | gen tok/s | "
             "commit p50 / p99 ms | RSS after / peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        c, s = r["config"], r["server_stats"]
        cm = s.get("commit_ms") or {}
        lines.append(f"| {label} | {c['sessions']} x {c['turns']} | "
                     f"{r['append']['p50_ms']} / {r['append']['p99_ms']} | "
                     f"{r['generate']['p50_ms']} / {r['generate']['p99_ms']} | {r['throughput']['turns_per_s']} | "
                     f"{r['throughput']['generated_tokens_per_s']} | {cm.get('p50', '-')} / {cm.get('p99', '-')} | "
                     f"{s.get('rss_mib_after', '-')} / {s.get('peak_rss_mib', '-')} |")
    for label, r in runs.items():
        c, m = r["config"], r["machine"]
        hw = f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        lines += ["", f"## {label}", "",
                  f"- command: `{r['command']}`", f"- commit: `{r['commit']}`",
                  f"- machine (where the benchmark ran): {hw}; Python {m['python']}, torch {m.get('torch', '?')}; "
                  f"1-minute load average {m.get('load_avg_1m', '?')} before, {m.get('load_avg_1m_after', '?')} "
                  "after (includes the server; above the core count, other jobs shared the machine)",
                  f"- server: {r['server']}; device {c['device']}, {c['workers']} workers, LRU {c['max_open']}, "
                  f"durable={c['durable']}; sessions: focus {c['focus']}, w_max {c['w_max']}"
                  + (f"; start-up {r['startup_s']} s" if r.get("startup_s") else ""),
                  f"- wall {r['wall_s']} s for {c['sessions'] * c['turns']} turns; throughput "
                  f"{r['throughput']['requests_per_s']} requests/s, {r['throughput']['appended_tokens_per_s']} "
                  f"appended tokens/s, {r['throughput']['generated_tokens_per_s']} generated tokens/s",
                  f"- latency ms (p50 / p99 / mean / max): create {_lat(r['create_session'])}; append "
                  f"{_lat(r['append'])}; generate {_lat(r['generate'])}",
                  f"- server: {r['server_stats']['commits']} commits "
                  f"(ms: {json.dumps(r['server_stats']['commit_ms'])}), {r['server_stats']['opens']} engine opens, "
                  f"{r['server_stats']['evictions']} LRU evictions; RSS {r['server_stats']['rss_mib_before']} MiB "
                  f"before the load, {r['server_stats']['rss_mib_after']} MiB after, peak "
                  f"{r['server_stats']['peak_rss_mib']} MiB"]
    return "\n".join(lines) + "\n"


def _lat(s: dict) -> str:
    return f"{s['p50_ms']} / {s['p99_ms']} / {s['mean_ms']} / {s['max_ms']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file with LoadConfig fields")
    add_config_args(p, LoadConfig)
    args = p.parse_args(argv)
    cfg = config_from_args(LoadConfig, args, args.config)
    result = run(cfg)
    if hasattr(os, "getloadavg"):  # other jobs on a shared machine inflate latency: say how busy it was
        result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    label = cfg.label or (f"{'gpu' if result['machine'].get('gpu') else 'cpu'}-{result['machine']['cores']}core-"
                          f"{cfg.sessions}x{cfg.turns}" + ("" if cfg.durable else "-nofsync")
                          + (f"-lru{cfg.max_open}" if cfg.max_open < cfg.sessions else ""))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[label] = result
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(runs))
    print(json.dumps({label: {k: result[k] for k in ("append", "generate", "throughput", "server_stats")}}, indent=1))
    print(f"wrote {path} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
