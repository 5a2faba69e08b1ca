"""Reliability benchmark (issue 14): SIGKILLs at random moments of ingest and generate, and damage to every file
type of a store. Writes docs/results/reliability.{json,md}.

    python benchmarks/reliability.py --kills 60 --seeds 3          # the recorded run (~10 min on 2 CPU cores)

Kill trials. A zygote process imports the package and loads the base model once; each trial forks a worker
from it (torch single-threaded, so forking is safe) that opens one store and runs random API calls until it is
killed: ``ingest`` of 16..30,000 book tokens and ``generate`` (a book prompt, up to 48 new tokens). It logs
``begin ...`` before a call, every generated token as it streams, and ``ack <tokens>`` once a call returned
(the API flushes before returning: what returned is durable). The parent kills it with SIGKILL at a random
moment, reopens the store for writing (as a user would: the reopen repairs and reports), and checks:
- acknowledged tokens lost: the memory holds at least the acknowledged length;
- wrong reads: every token read back equals the stream (acknowledged calls, plus any prefix of the call in
  flight: its ingest chunk, or its prompt and streamed tokens and at most one generated token not yet
  printed), the gists of the new blocks equal recomputed ones, the reopen reported the crash (``recovered``),
  a generate and a score work, and ``fsck`` finds nothing.

Corruption trials. A reference store (LOD0-LOD3 files and their checksum files, meta.json, engine.json,
wc.safetensors, telemetry.jsonl, LOCK) is copied; each copy gets one damage: random byte flips, a truncation
at a random length, or the file deleted. Then ``fsck`` runs, the store is opened and everything is read
(tokens, gists of every level, the working context, the next-token distribution) and compared with the
reference. Outcomes: refused (a clear error at open or at read), repaired (opened, the damage reported in
``recovered``), fsck (opened, reads right, fsck reports the damage), no effect (reads right, nothing to
report: LOCK, a log cut at a line boundary) and SILENT (reads wrong, nothing reported) - which must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megacontext.core.assets import BASE_MODEL

REPO = Path(__file__).resolve().parents[1]
BOOK_IDS = 400_000  # corpus tokens available to the trials


# ---------------------------------------------------------------------- shared setup
def load_base(name: str):
    import torch

    torch.set_num_threads(1)  # no intra-op thread pool: the zygote may fork
    torch.set_num_interop_threads(1)
    from megacontext.base import FrozenBase

    if name == "tiny":  # a tiny random Llama, for tests of this script
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
        return FrozenBase(LlamaForCausalLM(cfg).eval(), name="tiny")
    return FrozenBase.load(name, device="cpu", dtype="float32")


def corpus_ids(base, n: int, seed: int = 0):
    """Token ids of public-domain text when the shared books are there (the embedded tokenizer), else random."""
    import lzma

    import numpy as np

    books = REPO.parent / "shared" / "data" / "books" / "train_00.txt.xz"
    if base.tokenizer is not None and books.is_file():
        with lzma.open(books, "rt", encoding="utf-8", errors="replace") as fh:
            text = fh.read(6 * n)
        ids = base.encode(text)[:n]
        if len(ids) == n:
            return np.asarray(ids, dtype=np.int64)
    return np.random.default_rng(seed).integers(0, base.vocab_size, n)


# ---------------------------------------------------------------------- the worker (a forked child of the zygote)
def worker(store: str, seed: int, log_path: str, base, ids, gistnet: str | None) -> None:
    from megacontext.api import MegaContext
    from megacontext.runtime.sampling import SamplingConfig

    rng = random.Random(seed)
    out = open(log_path, "w", buffering=1)  # noqa: SIM115  line-buffered: each line reaches the kernel at once
    mc = MegaContext.open(store, base) if (Path(store) / "engine.json").exists() else \
        MegaContext.create(store, base, gistnet=gistnet)
    out.write(f"ready {mc.num_tokens}\n")
    while True:
        if rng.random() < 0.6:
            n = int(10 ** rng.uniform(1.2, 4.48))  # 16..30,000 tokens, log-uniform
            start = rng.randrange(0, BOOK_IDS - n)
            out.write(f"begin ingest {start} {n}\n")
            mc.ingest(ids[start:start + n])
        else:
            plen, new = rng.randint(4, 64), rng.randint(4, 48)
            start = rng.randrange(0, BOOK_IDS - plen)
            out.write(f"begin generate {start} {plen} {new}\n")
            for tok in mc.generate_ids(ids[start:start + plen], SamplingConfig(max_new_tokens=new)):
                out.write(f"tok {tok}\n")
        out.write(f"ack {mc.num_tokens}\n")


def zygote(args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer threads across the forks
    base = load_base(args.base)
    ids = corpus_ids(base, BOOK_IDS)
    import megacontext.api  # noqa: F401  (everything a worker needs, imported before forking)
    import megacontext.gistnet.compressor  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        store, seed, log_path = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                worker(store, int(seed), log_path, base, ids, None if args.gistnet == "none" else args.gistnet)
            finally:
                os._exit(0)
        print(f"pid {pid}", flush=True)
        os.waitpid(pid, 0)
        print("exited", flush=True)


# ---------------------------------------------------------------------- kill trials (the parent)
def _parse_log(path: Path, ids) -> tuple[list[int], list[int], str, int | None]:
    """-> (acknowledged tokens, known tokens of the call in flight, its kind, the last acked length)."""
    acked, inflight, kind, last = [], [], "between calls", None
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts or (parts[0] == "ready" and len(parts) == 1):
            continue
        if parts[0] == "ready":
            last = int(parts[1])
        elif parts[0] == "begin":
            start, n = int(parts[2]), int(parts[3])
            inflight, kind = [int(t) for t in ids[start:start + n]], parts[1]
        elif parts[0] == "tok":
            inflight.append(int(parts[1]))
        elif parts[0] == "ack":
            acked, inflight, kind, last = acked + inflight, [], "flush after a call", int(parts[1])
    return acked, inflight, kind, last


def kill_trials(args, base, root: Path) -> list[dict]:
    import torch

    from megacontext.api import MegaContext
    from megacontext.runtime.fsck import check_store
    from megacontext.runtime.sampling import SamplingConfig

    ids = corpus_ids(base, BOOK_IDS)
    store, rng = root / "killed", random.Random(args.seed)
    zyg = subprocess.Popen([sys.executable, __file__, "zygote", "--base", args.base, "--gistnet", args.gistnet],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert zyg.stdout.readline().strip() == "ready"
    stream: list[int] = []  # every token the store is known to hold, in order
    rows = []
    for trial in range(args.kills):
        log_path = root / f"kill{trial}.log"
        zyg.stdin.write(f"{store} {args.seed * 1000 + trial} {log_path}\n")
        zyg.stdin.flush()
        pid = int(zyg.stdout.readline().split()[1])
        t0 = time.time()
        while not (log_path.exists() and log_path.read_text().startswith("ready")) and time.time() - t0 < 120:
            time.sleep(0.05)
        delay = rng.uniform(0.2, args.max_delay)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert zyg.stdout.readline().strip() == "exited"
        acked, inflight, kind, last_ack = _parse_log(log_path, ids)
        known = stream + acked
        with MegaContext.open(store, base) as mc:
            n = mc.num_tokens
            got = mc.tree.tokens(0, n).tolist()
            allowed = known + inflight
            extra = 1 if kind == "generate" else 0  # a generated token is appended before it is printed
            wrong = next((i for i in range(min(n, len(allowed))) if got[i] != allowed[i]), None)
            wrong = wrong if wrong is not None else (len(allowed) if n > len(allowed) + extra else None)
            new_blocks = range(len(stream) // 32, n // 32)
            gist_ok = True
            if len(new_blocks):
                blocks = torch.tensor(got[new_blocks[0] * 32: new_blocks[-1] * 32 + 32]).view(-1, 32)
                from megacontext.tree.compressor import gists_of_blocks

                want = gists_of_blocks(mc.tree.compressor, blocks).to(mc.tree.gists(1, 0, 0).dtype).float()
                have = mc.tree.gists(1, new_blocks[0], new_blocks[-1] + 1).float()
                gist_ok = bool(torch.allclose(have, want, atol=2e-2, rtol=2e-2))
            for level in range(2, mc.tree.num_levels):  # every gist reads back (checksums verified)
                mc.tree.gists(level, 0, mc.tree.num_entries(level))
            rec = mc.recovered
            stream = got[:n]
            start = rng.randrange(0, BOOK_IDS - 80)
            prompt = [int(t) for t in ids[start:start + 8]]
            gen = list(mc.generate_ids(prompt, SamplingConfig(max_new_tokens=6)))
            score = [int(t) for t in ids[start + 8:start + 24]]
            finite = bool(torch.isfinite(mc.score(score).nll).all())
            stream += prompt + gen + score
            assert mc.num_tokens == len(stream)
        report = check_store(store)
        rows.append({"trial": trial, "delay_s": round(delay, 3), "killed_during": kind,
                     "acknowledged": len(known), "recovered": n, "lost_acknowledged": max(len(known) - n, 0),
                     "kept_unacknowledged": max(n - len(known), 0), "wrong_read_at": wrong, "gists_ok": gist_ok,
                     "usable_after": finite and len(gen) > 0, "fsck_ok": report.ok,
                     "recovery_reported": rec is not None, "recovery": str(rec) if rec else None,
                     "last_ack_line": last_ack})
        print(f"kill {trial:>3}: {kind:<18} acked {len(known):>7,} recovered {n:>7,} wrong {wrong} fsck "
              f"{'ok' if report.ok else 'DAMAGE'}", flush=True)
    zyg.stdin.close()
    zyg.wait(timeout=60)
    return rows


# ---------------------------------------------------------------------- corruption trials
def _readings(mc) -> dict:
    """Everything a user can read from a memory, for comparison with the reference."""
    import torch

    t = mc.tree
    out = {"tokens": t.tokens(0, t.num_tokens)}
    for level in range(1, t.num_levels):
        out[f"lod{level}"] = t.gists(level, 0, t.num_entries(level))
    out.update({k: v.clone() for k, v in mc.engine.wc.state_dict().items()})
    m = mc.engine.materialize()
    with torch.no_grad():
        out["logits"] = mc.base.forward(m.inputs_embeds[None], m.position_ids[None], logits_to_keep=1).logits[0, -1]
    return out


def _same(a: dict, b: dict) -> bool:
    import torch

    if a.keys() != b.keys():
        return False
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) if k == "logits" else torch.equal(a[k], b[k])
               for k in a)


def _damage(path: Path, kind: str, rng: random.Random) -> str:
    size = path.stat().st_size
    if kind == "delete":
        path.unlink()
        return "deleted"
    if size == 0:
        return "empty file: nothing to damage"
    if kind == "truncate":
        cut = rng.randrange(0, size)
        os.truncate(path, cut)
        return f"truncated {size} -> {cut} bytes"
    raw = bytearray(path.read_bytes())
    offsets = sorted(rng.sample(range(size), min(rng.randint(1, 3), size)))
    for o in offsets:
        raw[o] ^= rng.randint(1, 255)
    path.write_bytes(bytes(raw))
    return f"flipped bytes at {offsets} of {size}"


def corruption_trials(args, base, root: Path) -> list[dict]:
    from megacontext.api import MegaContext
    from megacontext.runtime.engine import EngineConfig
    from megacontext.runtime.fsck import check_store
    from megacontext.runtime.sampling import SamplingConfig
    from megacontext.tree import TreeConfig
    from megacontext.tree.format import TreeFormatError
    from megacontext.wc import WorkingContextConfig

    ids = corpus_ids(base, BOOK_IDS)
    ref = root / "reference"
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=args.w_max))
    with MegaContext.create(ref, base, gistnet=None if args.gistnet == "none" else args.gistnet, config=cfg,
                            tree=TreeConfig(checksum_rows=64)) as mc:
        mc.ingest(ids[:args.ref_tokens])
        list(mc.generate_ids(ids[:16], SamplingConfig(max_new_tokens=16)))
    with MegaContext.open(ref, base, readonly=True) as mc:
        want = _readings(mc)
    assert check_store(ref).ok
    files = sorted(p.name for p in ref.iterdir())
    rng, rows = random.Random(args.seed), []
    for name in files:
        for kind in ("flip", "truncate", "delete"):
            for seed in range(1 if kind == "delete" else args.seeds):
                trial = root / f"c-{name}-{kind}-{seed}"
                shutil.copytree(ref, trial)
                what = _damage(trial / name, kind, rng)
                try:
                    report = check_store(trial)
                    fsck = "damage" if not report.ok else ("notes" if report.notes else "clean")
                    fsck_text = "; ".join(report.problems + report.notes)[:300]
                except ValueError as e:
                    fsck, fsck_text = "refused", str(e)[:300]
                outcome, message = None, ""
                try:
                    with MegaContext.open(trial, base) as mc:
                        rec = mc.recovered
                        try:
                            got = _readings(mc)
                        except (TreeFormatError, ValueError, OSError) as e:
                            outcome, message = "refused at read", str(e)
                        else:
                            same = _same(got, want)
                            if rec is not None:
                                outcome, message = "repaired and reported", str(rec)
                            elif fsck in ("damage", "refused", "notes"):
                                outcome = "reads right, fsck reports" if same else "wrong read, fsck reports"
                            else:
                                outcome = "no effect" if same else "SILENT WRONG READ"
                except (ValueError, OSError, RuntimeError) as e:
                    outcome, message = "refused at open", str(e)
                rows.append({"file": name, "damage": kind, "what": what, "outcome": outcome,
                             "message": " ".join(message.split())[:300], "fsck": fsck, "fsck_report": fsck_text})
                print(f"{name:<17} {kind:<8} {outcome:<28} fsck {fsck}", flush=True)
                shutil.rmtree(trial)
    return rows


# ---------------------------------------------------------------------- report
def summarise(kills: list[dict], corruptions: list[dict]) -> dict:
    from collections import Counter

    by_kind = Counter(r["killed_during"] for r in kills)
    out = {"kills": len(kills), "killed_during": dict(by_kind),
           "acknowledged_tokens_lost": sum(r["lost_acknowledged"] for r in kills),
           "wrong_reads_after_reopen": sum(r["wrong_read_at"] is not None or not r["gists_ok"] for r in kills),
           "unusable_after_reopen": sum(not r["usable_after"] for r in kills),
           "fsck_damage_after_recovery": sum(not r["fsck_ok"] for r in kills),
           "recovery_reported": sum(r["recovery_reported"] for r in kills),
           "unacknowledged_tokens_kept": sum(r["kept_unacknowledged"] for r in kills),
           "corruption_trials": len(corruptions),
           "corruption_outcomes": dict(Counter(r["outcome"] for r in corruptions)),
           "silent_wrong_reads": sum(r["outcome"] == "SILENT WRONG READ" for r in corruptions)}
    per_file: dict = {}
    for r in corruptions:
        per_file.setdefault(r["file"], Counter())[r["outcome"]] += 1
    out["corruption_by_file"] = {k: dict(v) for k, v in per_file.items()}
    return out


def render(result: dict) -> str:
    """The results page (docs/results/reliability.md) from the JSON."""
    s, kills, cor = result["summary"], result["kills"], result["corruptions"]
    lines = [
        "# Reliability: kill and corruption trials (issue 14)", "",
        f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ", f"Machine: {result['machine']}  ",
        f"Base: `{result['base']}`, GistNet: `{result['gistnet']}`; wall time {result['seconds']['kills']} s "
        f"(kills) + {result['seconds']['corruptions']} s (corruption). Raw rows: "
        "[reliability.json](reliability.json). Method: `benchmarks/reliability.py`'s docstring.", "",
        "## SIGKILL at random moments of ingest and generate", "",
        "| trials | killed during | acknowledged tokens lost | wrong reads after reopen | unusable after reopen | "
        "fsck damage after recovery | recovery reported | unacknowledged tokens kept |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['kills']} | " + ", ".join(f"{k}: {v}" for k, v in sorted(s["killed_during"].items())) +
        f" | **{s['acknowledged_tokens_lost']}** | **{s['wrong_reads_after_reopen']}** | "
        f"{s['unusable_after_reopen']} | {s['fsck_damage_after_recovery']} | {s['recovery_reported']} / {s['kills']} | "
        f"{s['unacknowledged_tokens_kept']:,} |", "",
        f"The store grew to {kills[-1]['recovered']:,} tokens over the trials (each trial continues it). "
        "'Unacknowledged tokens kept' are tokens of interrupted calls that the commit interval had made durable "
        "before the kill (the rest of such a call is lost, and never was acknowledged).", "",
        "Sample recovery reports:", ""]
    seen = set()
    for r in kills:
        key = (r["killed_during"], r["kept_unacknowledged"] > 0, "ignored" in (r["recovery"] or ""))
        if key not in seen and r["recovery"]:
            seen.add(key)
            lines.append(f"- killed during {r['killed_during']} after {r['delay_s']} s: {r['recovery']}")
    lines += ["", "## Damage to every file of a store", "",
              f"{s['corruption_trials']} trials: every file of a store with LOD0-LOD3 damaged by random byte flips, "
              "a truncation at a random length, or deletion. **Silent wrong reads: "
              f"{s['silent_wrong_reads']}.**", "",
              "| file | " + " | ".join(sorted({r["outcome"] for r in cor})) + " |",
              "|---|" + "---|" * len({r["outcome"] for r in cor})]
    outcomes = sorted({r["outcome"] for r in cor})
    for name, counts in sorted(s["corruption_by_file"].items()):
        lines.append(f"| `{name}` | " + " | ".join(str(counts.get(o, "")) for o in outcomes) + " |")
    lines += ["", "Outcomes: *refused at open/read* = a clear error naming the file (and rows); *repaired and "
              "reported* = the open rebuilt derived state and said so in `mc.recovered`; *reads right, fsck "
              "reports* = the memory reads exactly as before and `megacontext fsck` reports the damage (telemetry); "
              "*no effect* = nothing the memory holds changed and there is nothing to report (`LOCK` is empty; a log "
              "cut at a line boundary is a shorter valid log).", "", "Example messages:", ""]
    shown = set()
    for r in cor:
        if r["message"] and (r["file"], r["outcome"]) not in shown:
            shown.add((r["file"], r["outcome"]))
            lines.append(f"- `{r['file']}` {r['damage']} -> {r['outcome']}: {r['message'][:200]}")
    if "telemetry" in result:
        t = result["telemetry"]
        lines += ["", "## Telemetry size", "", t["text"]]
    return "\n".join(lines) + "\n"


MARKER = "<!-- written by hand from the commands named below; benchmarks/reliability.py keeps it -->"


def write_page(path: Path, result: dict) -> None:
    """Render the page, keeping the hand-written part after MARKER of the page already there."""
    old = path.read_text() if path.exists() else ""
    keep = old[old.index(MARKER):] if MARKER in old else ""
    path.write_text(render(result) + ("\n" + keep if keep else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="run", choices=["run", "zygote", "report"],
                   help="run: the trials; report: render --out's JSON as the .md page next to it")
    p.add_argument("--base", default=BASE_MODEL, help="base model (embedded name, directory, or 'tiny')")
    p.add_argument("--gistnet", default="auto", help="'auto' (the embedded GistNet for its base), 'none', or a path")
    p.add_argument("--kills", type=int, default=60)
    p.add_argument("--max-delay", type=float, default=6.0, help="kill uniformly within this many seconds")
    p.add_argument("--seeds", type=int, default=3, help="flip/truncation trials per file type")
    p.add_argument("--ref-tokens", type=int, default=70_000, help="tokens in the corruption reference store")
    p.add_argument("--w-max", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "reliability.json"))
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    if args.mode == "zygote":
        zygote(args)
        return 0
    if args.mode == "report":
        write_page(Path(args.out).with_suffix(".md"), json.loads(Path(args.out).read_text()))
        return 0
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    base = load_base(args.base)
    root = Path(args.work or tempfile.mkdtemp(prefix="mc-reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kills = kill_trials(args, base, root) if args.kills else []
    t1 = time.time()
    corruptions = corruption_trials(args, base, root) if args.seeds else []
    t2 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    import torch

    tel = {}
    for name in ("killed", "reference"):  # telemetry bytes per token of the two stores the trials used
        store = root / name
        if (store / "meta.json").exists():
            meta = json.loads((store / "meta.json").read_text())
            tokens = meta["num_blocks"] * 32 + len(meta["tail"])
            size = sum(p.stat().st_size for p in store.glob("telemetry*.jsonl"))
            tree = sum(p.stat().st_size for p in store.glob("LOD*"))
            tel[name] = {"tokens": tokens, "telemetry_bytes": size,
                         "telemetry_bytes_per_token": round(size / tokens, 3),
                         "tree_bytes_per_token": round(tree / tokens, 3)}
    text = "; ".join(f"{k} store: {v['tokens']:,} tokens, telemetry {v['telemetry_bytes']:,} bytes = "
                     f"{v['telemetry_bytes_per_token']} B/token (tree: {v['tree_bytes_per_token']} B/token)"
                     for k, v in tel.items())

    result = {"command": "python benchmarks/reliability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit.stdout.strip(), "machine": f"{platform.node()}: {platform.platform()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}", "base": args.base, "gistnet": args.gistnet,
              "seconds": {"kills": round(t1 - t0, 1), "corruptions": round(t2 - t1, 1)},
              "summary": summarise(kills, corruptions), "telemetry": {"text": text, **tel}, "kills": kills,
              "corruptions": corruptions}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_page(Path(args.out).with_suffix(".md"), result)
    print(json.dumps(result["summary"], indent=1))
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
