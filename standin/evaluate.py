"""Evaluate stand-in base models (v2 against v1) on held-out dev books: one script, same data, same run.

usage (repo root):
  python -m standin.evaluate --model DIR --v1 DIR --dev FILE_OR_DIR [...] [--json OUT.json --md OUT.md]

Probes (every model reads the same token rows; all rows 2,048 tokens unless stated):
- ``val_nll``: mean NLL (nats/token) of non-overlapping dev-book windows; 95% interval by a bootstrap over
  books (cluster bootstrap), and the paired difference to v1 on the same windows.
- ``copy_nll[D]``: a window whose last 32 tokens are replaced by the block that stands D tokens earlier
  (``x[-32:] = x[T-32-D : T-D]``); NLL of tokens 2..32 of the repeat (the first is unpredictable), beside
  the same window without the copy (``copy_nll_nocopy``).
- ``passkey_top1_in_view``: the benchmark suite's wording (" The pass key is NNNNN. Remember it. " in book
  text, "\\nThe pass key is" at the end of the row, then the key): a hit when the argmax at every answer
  position is the key's token (teacher-forced argmax = greedy decoding of the key's tokenization). This
  wording never occurs in training (standin.grammar). Trials at several gaps between key and question.
- ``fact_exact_in_view``: 1-4 facts of the EVAL grammar (names, attributes, statement and question frames
  that the training grammar cannot produce) stated in book text, one asked at the end in a different
  frame; a hit as for pass keys.
- ``skip_nll``: loss on the second half of 2,048-token rows when the second half's positions are shifted by
  S (0 and 60,000): the tolerance of long relative distances (as in the v1 model card).
Rates carry Wilson 95% intervals and their trial counts.

Every forward passes an all-ones attention mask: without one, transformers >= 5 reads a position jump as
the start of a packed sequence and blocks attention across it (the PoSE skip probe would be meaningless).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from standin import grammar

log = logging.getLogger("standin.evaluate")

COPY_DISTANCES = (256, 1024, 1984)
BLOCK = 32
SKIPS = (0, 60000)
PASSKEY_GAPS = (32, 256, 512, 1024, 1536, 1984)


# ---------------------------------------------------------------- model plumbing
def amp(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, pos: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
    """[B, T] ids (and [B, T] positions) -> float logits [B, T or keep, V]."""
    dev = model_device(model)
    ids = ids.to(dev)
    pos = (torch.arange(ids.shape[1], device=dev).expand_as(ids) if pos is None else pos.to(dev))
    kw = {"logits_to_keep": keep} if keep else {}
    with amp(dev):
        out = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
    lg = out.logits
    return (lg[:, -keep:] if keep else lg).float()


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


# ---------------------------------------------------------------- data
def load_dev(paths: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Dev books (files, or folders of .txt/.txt.xz) -> (tokens [N] int64, book id per token [N], names)."""
    from standin.corpus import encode_docs, read_text, split_books

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(q for q in p.iterdir() if q.name.endswith((".txt", ".txt.xz"))) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no dev book files found in {paths}")
    books, names = [], []
    for f in files:
        for i, b in enumerate(split_books(read_text(f))):
            books.append(b)
            names.append(f.name if i == 0 else f"{f.name}#{i}")
    eot = tokenizer.eos_token_id
    ids, owner = [], []
    for i, b in enumerate(books):
        t = encode_docs(tokenizer, [b], eot).astype(np.int64)
        ids.append(t)
        owner.append(np.full(t.size, i, dtype=np.int64))
    return np.concatenate(ids), np.concatenate(owner), names


def spread_windows(tokens: np.ndarray, n: int, length: int, offset: int = 0) -> np.ndarray:
    """``n`` evenly spaced start indices of windows of ``length`` tokens (deterministic)."""
    hi = tokens.size - length - 1
    if hi <= 0:
        raise ValueError(f"{tokens.size} tokens cannot hold a window of {length}")
    return ((np.arange(n) * (hi / max(n, 1)) + offset) % hi).astype(np.int64)


def rows_at(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(length)[None]]


# ---------------------------------------------------------------- probes
def window_nll(model, rows: np.ndarray, batch: int = 16) -> np.ndarray:
    """Mean next-token NLL of each row [N, L] (inputs [:-1], targets [1:]) -> [N]."""
    out = []
    for sl in _batches(len(rows), batch):
        x = torch.from_numpy(rows[sl]).long()
        lg = logits_of(model, x[:, :-1])
        nll = F.cross_entropy(lg.transpose(1, 2), x[:, 1:].to(lg.device), reduction="none")
        out.append(nll.mean(1).cpu().numpy())
    return np.concatenate(out)


def copy_probe(model, rows: np.ndarray, distances=COPY_DISTANCES, block: int = BLOCK, batch: int = 16):
    """rows [N, T]. Returns {D: (nll with the copy [N], nll without [N])} over tokens 2..block of the block."""
    T = rows.shape[1]
    res = {}
    for d in distances:
        if T - block - d < 0:
            raise ValueError(f"copy distance {d} does not fit a {T}-token row with a {block}-token block")
        copied = rows.copy()
        copied[:, T - block:] = rows[:, T - block - d:T - d]
        per = {}
        for name, x_all in (("copy", copied), ("nocopy", rows)):
            vals = []
            for sl in _batches(len(x_all), batch):
                x = torch.from_numpy(x_all[sl]).long()
                lg = logits_of(model, x, keep=block + 1)[:, :-1]  # predictions of the last `block` tokens
                nll = F.cross_entropy(lg.transpose(1, 2), x[:, -block:].to(lg.device), reduction="none")
                vals.append(nll[:, 1:].mean(1).cpu().numpy())
            per[name] = np.concatenate(vals)
        res[d] = (per["copy"], per["nocopy"])
    return res


def answer_hits(model, rows: list[np.ndarray], answer_lens: list[int], batch: int) -> np.ndarray:
    """Rows of equal length ending with their answer: True where argmax hits every answer token."""
    hits = []
    keep = max(answer_lens) + 1
    x_all = np.stack(rows)
    for sl in _batches(len(rows), batch):
        x = torch.from_numpy(x_all[sl]).long()
        pred = logits_of(model, x, keep=keep)[:, :-1].argmax(-1).cpu()  # predicts the last keep-1 tokens
        tgt = x[:, -(keep - 1):]
        for j, n in enumerate(answer_lens[sl]):
            hits.append(bool((pred[j, -n:] == tgt[j, -n:]).all()))
    return np.asarray(hits)


def passkey_rows(tokenizer, filler: np.ndarray, n: int, seq: int = 2048, gaps=PASSKEY_GAPS, seed: int = 0):
    """Benchmark-format pass-key rows of ``seq`` tokens ending with the key. Returns (rows, answer lengths,
    gaps); gaps (filler tokens between statement and question) are clipped to fit."""
    enc = lambda s: tokenizer.backend_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    rng = random.Random(seed)
    q = enc(grammar.EVAL_KEY_QUESTION)
    starts = spread_windows(filler, n, seq, offset=7 + seed)
    rows, alens, gs = [], [], []
    for i in range(n):
        key = str(rng.randrange(10000, 100000))
        st = enc(" " + grammar.EVAL_KEY_STATEMENT.format(K=key) + " ")
        a = enc(" " + key)
        f_len = seq - len(st) - len(q) - len(a)
        gap = min(gaps[i % len(gaps)], f_len - 1)
        hay = filler[starts[i]:starts[i] + f_len].tolist()
        p = f_len - gap
        rows.append(np.asarray(hay[:p] + st + hay[p:] + q + a, dtype=np.int64))
        alens.append(len(a))
        gs.append(gap)
    return rows, alens, np.asarray(gs)


def fact_rows(tokenizer, filler: np.ndarray, n: int, seq: int = 2048, seed: int = 0, g: grammar.Grammar = grammar.EVAL,
              max_facts: int = 4):
    """Rows of ``seq`` tokens: 1..max_facts facts of grammar ``g`` in book text, one asked at the end.
    Returns (rows, answer lengths, facts per row, gap between the asked statement and the question)."""
    enc = lambda s: tokenizer.backend_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    rng = random.Random(f"facts:{seed}")
    starts = spread_windows(filler, n, seq, offset=13 + seed)
    rows, alens, ks, gaps = [], [], [], []
    for i in range(n):
        k = 1 + i % max_facts
        facts = g.facts(k, rng)
        stmts = [g.statement(f, rng) for f in facts]
        ask = rng.randrange(k)
        q = enc("\n" + g.question(facts[ask], stmts[ask][0], rng))
        a = enc(" " + facts[ask][2])
        st_ids = [enc(" " + text) for _, text in stmts]
        f_len = seq - len(q) - len(a) - sum(map(len, st_ids))
        if f_len < 16:
            raise ValueError(f"{k} facts and their question do not fit a {seq}-token row")
        hay = filler[starts[i]:starts[i] + f_len].tolist()
        cuts = sorted(rng.randrange(0, f_len - 8) for _ in range(k))
        row, prev, pos_of = [], 0, []
        for c, s in zip(cuts, st_ids, strict=True):
            row += hay[prev:c]
            pos_of.append(len(row) + len(s))
            row += s
            prev = c
        row += hay[prev:] + q + a
        rows.append(np.asarray(row, dtype=np.int64))
        alens.append(len(a))
        ks.append(k)
        gaps.append(seq - len(a) - len(q) - pos_of[ask])
    return rows, alens, np.asarray(ks), np.asarray(gaps)


def skip_probe(model, rows: np.ndarray, skips=SKIPS, batch: int = 16) -> dict[int, np.ndarray]:
    """rows [N, T+1]: second-half NLL per row when the second half's positions are shifted by each skip."""
    T = rows.shape[1] - 1
    res = {}
    for s in skips:
        vals = []
        for sl in _batches(len(rows), batch):
            x = torch.from_numpy(rows[sl]).long()
            pos = torch.arange(T).repeat(x.shape[0], 1)
            pos[:, T // 2:] += s
            lg = logits_of(model, x[:, :-1], pos)
            nll = F.cross_entropy(lg.transpose(1, 2), x[:, 1:].to(lg.device), reduction="none")[:, T // 2:]
            vals.append(nll.mean(1).cpu().numpy())
        res[s] = np.concatenate(vals)
    return res


# ---------------------------------------------------------------- statistics
def wilson(hits: np.ndarray, z: float = 1.96) -> dict:
    n = int(np.asarray(hits).size)
    if n == 0:
        return {"value": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    p = float(np.mean(hits))
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return {"value": round(p, 4), "lo": round(max(0.0, c - h), 4), "hi": round(min(1.0, c + h), 4), "n": n}


def mean_est(x: np.ndarray, groups=None, seed: int = 0) -> dict:
    from megacontext.core.stats import mean_ci

    e = mean_ci(np.asarray(x, dtype=np.float64), groups=groups, seed=seed)
    return {"value": round(e.value, 4), "lo": round(e.lo, 4), "hi": round(e.hi, 4), "n": e.n}


def diff_est(a: np.ndarray, b: np.ndarray, groups=None, seed: int = 0) -> dict:
    from megacontext.core.stats import diff_ci

    e = diff_ci(np.asarray(a, np.float64), np.asarray(b, np.float64), groups=groups, seed=seed)
    return {"value": round(e.value, 4), "lo": round(e.lo, 4), "hi": round(e.hi, 4), "n": e.n}


# ---------------------------------------------------------------- one model
def evaluate_model(model, tokenizer, tokens: np.ndarray, owner: np.ndarray, sizes: dict, seq: int = 2048,
                   batch: int = 16, distances=COPY_DISTANCES, gaps=PASSKEY_GAPS, seed: int = 0) -> dict:
    """All probes on one model; per-unit arrays are kept (under ``_raw``) for paired comparisons."""
    t0 = time.time()
    val_starts = spread_windows(tokens, sizes["val"], seq + 1)
    val = window_nll(model, rows_at(tokens, val_starts, seq + 1), batch)
    copy_starts = spread_windows(tokens, sizes["copy"], seq, offset=3)
    copies = copy_probe(model, rows_at(tokens, copy_starts, seq), distances, batch=batch)
    pk_rows, pk_alen, pk_gap = passkey_rows(tokenizer, tokens, sizes["passkey"], seq, gaps, seed)
    pk = answer_hits(model, pk_rows, pk_alen, batch)
    f_rows, f_alen, f_k, f_gap = fact_rows(tokenizer, tokens, sizes["fact"], seq, seed)
    fh = answer_hits(model, f_rows, f_alen, batch)
    sk_starts = spread_windows(tokens, sizes["skip"], seq + 1, offset=11)
    sk = skip_probe(model, rows_at(tokens, sk_starts, seq + 1), batch=batch)
    groups = owner[val_starts]
    res = {
        "val_nll": mean_est(val, groups, seed),
        "copy_nll": {str(d): mean_est(c, owner[copy_starts], seed) for d, (c, _) in copies.items()},
        "copy_nll_nocopy": {str(d): mean_est(nc, owner[copy_starts], seed) for d, (_, nc) in copies.items()},
        "passkey_top1_in_view": wilson(pk),
        "passkey_by_gap": {str(g): wilson(pk[pk_gap == g]) for g in sorted(set(pk_gap.tolist()))},
        "fact_exact_in_view": wilson(fh),
        "fact_by_count": {str(k): wilson(fh[f_k == k]) for k in sorted(set(f_k.tolist()))},
        "skip_nll": {str(s): mean_est(v, owner[sk_starts], seed) for s, v in sk.items()},
        "seconds": round(time.time() - t0, 1),
        "_raw": {"val": val, "groups": groups, "skip": sk, "copy": copies, "skip_groups": owner[sk_starts]},
    }
    res["fact_mean_gap_tokens"] = int(np.mean(f_gap)) if len(f_gap) else 0
    return res


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return m.to(device).eval()


SIZES_FULL = {"val": 128, "copy": 96, "passkey": 480, "fact": 480, "skip": 64}
SIZES_QUICK = {"val": 4, "copy": 4, "passkey": 12, "fact": 8, "skip": 4}


def run(model_dir: str, v1_dir: str | None, dev: list[str], device: torch.device, sizes: dict, seq: int = 2048,
        batch: int = 16, seed: int = 0, distances=COPY_DISTANCES, gaps=PASSKEY_GAPS, label: str | None = None,
        commit: str | None = None, argv: list[str] | None = None) -> dict:
    """Evaluate ``model_dir`` (and ``v1_dir``) on the same rows; returns the report dict. ``label`` is the
    path recorded as ``model_dir`` (where the weights will be committed), ``commit`` overrides the git
    commit (a GPU call's copy of the repo may have no .git)."""
    from transformers import PreTrainedTokenizerFast

    from megacontext.core.provenance import run_info
    from standin import targets

    t0 = time.time()
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokens, owner, names = load_dev(dev, tok)
    models = {"v2": model_dir} | ({"v1": v1_dir} if v1_dir else {})
    per = {}
    for name, path in models.items():
        m = load_model(path, device)
        per[name] = evaluate_model(m, tok, tokens, owner, sizes, seq, batch, distances, gaps, seed)
        del m
        log.info("%s: %s", name, {k: v for k, v in per[name].items() if k != "_raw"})
    v2 = per["v2"]
    weights = Path(model_dir) / "model.safetensors"
    info = run_info(device, argv=argv)
    if commit:
        info["commit"] = commit
    report = {
        "run": info,
        "model_dir": label or str(model_dir),
        "evaluated_from": str(model_dir),
        "model_sha256": file_sha256(weights) if weights.exists() else None,
        "model_sha256_of": "model.safetensors in model_dir: the single-file bf16 weights that are committed "
                           "(the GPU run's export parts concatenate to these exact bytes)",
        "v1_dir": v1_dir,
        "v1_sha256": (file_sha256(Path(v1_dir) / "model.safetensors")
                      if v1_dir and (Path(v1_dir) / "model.safetensors").exists() else None),
        "dev_books": names,
        "dev_tokens": int(tokens.size),
        "seq": seq,
        "sizes": sizes,
        "val_nll": v2["val_nll"]["value"],
        "copy_nll": {d: e["value"] for d, e in v2["copy_nll"].items()},
        "copy_nll_nocopy": {d: e["value"] for d, e in v2["copy_nll_nocopy"].items()},
        "passkey_top1_in_view": v2["passkey_top1_in_view"]["value"],
        "fact_exact_in_view": v2["fact_exact_in_view"]["value"],
        "skip_nll": {s: e["value"] for s, e in v2["skip_nll"].items()},
    }
    if "v1" in per:
        v1 = per["v1"]
        report["val_nll_v1"] = v1["val_nll"]["value"]
        report["val_nll_diff"] = diff_est(v2["_raw"]["val"], v1["_raw"]["val"], v2["_raw"]["groups"], seed)
        report["skip_nll_v1"] = {s: e["value"] for s, e in v1["skip_nll"].items()}
        s_far = max(v2["_raw"]["skip"])
        report["skip_far_diff"] = diff_est(v2["_raw"]["skip"][s_far], v1["_raw"]["skip"][s_far],
                                           v2["_raw"]["skip_groups"], seed)
    report["models"] = {k: {kk: vv for kk, vv in v.items() if kk != "_raw"} for k, v in per.items()}
    report["targets"] = targets.check(report)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def write(report: dict, json_path: str | None, md_path: str | None):
    from standin import targets

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(targets.markdown(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m standin.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="v2 model dir (HF format, single-file model.safetensors)")
    p.add_argument("--v1", default=None, help="v1 model dir, measured in the same run (recommended)")
    p.add_argument("--dev", nargs="+", required=True, help="dev book files or folders (.txt / .txt.xz)")
    p.add_argument("--json", default="docs/results/standin_base.json")
    p.add_argument("--md", default="docs/results/standin_base.md")
    p.add_argument("--quick", action="store_true", help="few trials (CPU smoke runs)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--label", default=None, help="model path to record (e.g. where it will be committed)")
    p.add_argument("--commit", default=None, help="commit to record when the working copy has no .git")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for path in [a.model] + ([a.v1] if a.v1 else []):
        if not (Path(path) / "config.json").exists():
            print(f"error: {path!r} is not a model dir (no config.json)", file=sys.stderr)
            return 2
    report = run(a.model, a.v1, a.dev, torch.device(a.device), SIZES_QUICK if a.quick else SIZES_FULL,
                 batch=a.batch, seed=a.seed, label=a.label, commit=a.commit,
                 argv=["python", "-m", "standin.evaluate", *(sys.argv[1:] if argv is None else argv)])
    write(report, a.json, a.md)
    from standin import targets

    print(targets.table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
