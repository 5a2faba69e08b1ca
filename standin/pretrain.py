"""Pretrain the stand-in base v2: warm start from v1, a curriculum that makes reading the window pay,
inside a hard wall-clock budget on one GPU. Resumable, seeded, JSONL metrics.

usage (repo root; the full GPU command is in standin/README.md):
  python -m standin.pretrain --init V1_DIR --books carry/standin/books_*.txt.xz --out /tmp/v2 --export $OUT \
      --minutes 8.3 [--compile] [--resume RUN_DIR]

Design (the reasons are in standin/README.md):
- Budget: ``--minutes`` counts from process start (corpus loading and compilation included) to the last
  checkpoint. After ``measure_steps`` timed steps the run plans how many steps fit and sets the cosine
  over them; at every held-out evaluation it re-plans from the measured wall rate (evaluations and saves
  included), keeping the learning rate continuous, so the schedule ends when the budget does. A hard stop
  at the deadline guards against a slow tail. ``--steps N`` fixes the plan instead (tests, reruns).
- Loss: next-token CE on every token, recall answers included. On natural book tokens, CE is mixed with
  KL(teacher || student), where the teacher is the frozen model this segment started from (v1 on the
  first call). The CE weight on book tokens is set, once the step count is planned, so that the CE
  exposure to the carried books totals ``book_ce_passes`` passes (the rest of their weight is KL): the
  carried book text is small and the failed v2 over-fitted it (25 CE passes raised dev-book NLL 3.60 ->
  4.11); the KL term keeps the book distribution of v1 however often the books recur.
- Throughput: bf16 autocast over fp32 master weights, fused AdamW, SDPA (flash, causal) attention,
  batches built on a background thread into pinned memory, no host syncs except at log steps.
  ``--compile`` compiles each decoder layer and the loss (regional compilation: one layer graph reused
  8 times, the mask built eagerly so SDPA keeps its causal fast path).
- Every forward passes an all-ones attention mask: without one, transformers >= 5 takes a PoSE position
  jump for the start of a packed sequence and blocks attention across it.
- Resume: ``--resume RUN_DIR`` loads RUN_DIR/model and state.json and continues the step counter, token
  counts and data stream (seeded by seed and step). With RUN_DIR/optimizer.safetensors (same machine)
  the schedule of the interrupted segment continues; without it (a fresh machine: the optimizer state is
  too big to bring back) a new segment starts: fresh AdamW moments, ``resume_warmup`` warm-up steps,
  then a cosine over the new budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from standin import corpus, evaluate  # noqa: E402
from standin.curriculum import Mix  # noqa: E402

log = logging.getLogger("standin.pretrain")


@dataclass
class TrainConfig:
    init: str = ""  # v1 model dir: architecture, tokenizer, weights (unless resuming), default teacher
    out: str = "runs/standin_v2"  # run dir (local disk): model/, state.json, optimizer, metrics, log
    export: str = ""  # optional: the GPU call's $OUT (<= 8 files, each < 16 MiB)
    resume: str = ""  # run dir (or joined export) to continue
    books: list[str] = field(default_factory=list)  # train book files (.txt.xz/.txt, books split by \x1e)
    book_val_tokens: int = 120_000  # whole books held out for the loss curve (about 1-2 books)
    book_max_chars: int = 0  # 0: all
    code_roots: list[str] = field(default_factory=list)  # default: this interpreter's site-packages + stdlib
    code_max_chars: int = 160_000_000
    code_val_tokens: int = 300_000
    minutes: float = 8.3  # wall budget from process start to the final checkpoint
    steps: int = 0  # fixed number of steps for this segment (0: planned from the budget)
    batch: int = 64
    seq: int = 2048
    lr: float = 5e-4
    min_lr_frac: float = 0.1
    warmup: int = 200
    resume_warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    book_ce_passes: float = 2.0
    teacher: str = ""  # "" : the weights this segment starts from; "none": no KL term
    compile: bool = False
    measure_steps: int = 20
    log_every: int = 25
    eval_every: int = 250
    save_minutes: float = 3.0
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    mix_book: float = 0.20
    mix_code: float = 0.15
    mix_copy: float = 0.25
    mix_passkey: float = 0.10
    mix_fact: float = 0.30
    mix_book_filler: float = 0.5
    pose_frac: float = 1 / 3
    monitor_rows: int = 16  # held-out rows per probe at each evaluation

    def __post_init__(self):
        if not self.init or not (Path(self.init) / "config.json").is_file():
            raise ValueError(f"--init {self.init!r} is not a model dir with config.json")
        if self.resume and not (Path(self.resume) / "state.json").is_file():
            raise ValueError(f"--resume {self.resume!r} has no state.json")
        if not self.books:
            raise ValueError("--books needs at least one train book file")
        for b in self.books:
            if not Path(b).is_file():
                raise ValueError(f"--books file {b!r} does not exist")
            if "dev" in Path(b).resolve().parts:
                raise ValueError(f"--books file {b!r} lies in a 'dev' folder (held-out evaluation books): "
                                 "never train on those")
        for name in ("batch", "seq", "log_every", "eval_every", "measure_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.minutes <= 0 or self.lr <= 0 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"need minutes > 0, lr > 0, 0 <= min_lr_frac <= 1; got {self.minutes}, {self.lr}, "
                             f"{self.min_lr_frac}")
        if self.book_ce_passes < 0:
            raise ValueError(f"--book-ce-passes={self.book_ce_passes} must be >= 0")

    def mix(self) -> Mix:
        return Mix(book=self.mix_book, code=self.mix_code, copy=self.mix_copy, passkey=self.mix_passkey,
                   fact=self.mix_fact, book_filler=self.mix_book_filler, pose_frac=self.pose_frac,
                   pose_max=65536 - self.seq)


# ---------------------------------------------------------------- schedule
@dataclass
class Schedule:
    """Linear warm-up, then a cosine from ``peak`` to ``peak * min_frac`` whose end can be re-planned:
    progress is ``f0`` at step ``s0`` and reaches 1 at ``planned`` (continuous across re-plans)."""

    seg_start: int
    warmup: int
    peak: float
    min_frac: float
    planned: int
    s0: int = -1
    f0: float = 0.0

    def __post_init__(self):
        if self.s0 < 0:
            self.s0 = self.seg_start + self.warmup

    def progress(self, step: int) -> float:
        if step <= self.s0:
            return self.f0 if step >= self.seg_start + self.warmup else 0.0
        return min(1.0, self.f0 + (step - self.s0) / max(1, self.planned - self.s0) * (1 - self.f0))

    def lr(self, step: int) -> float:
        s = step - self.seg_start
        if s < self.warmup:
            return self.peak * (s + 1) / self.warmup
        lo = self.peak * self.min_frac
        return lo + (self.peak - lo) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def replan(self, step: int, planned: int):
        planned = max(planned, step + 1, self.seg_start + self.warmup + 1)
        if step > self.s0:
            self.f0, self.s0 = self.progress(step), step
        self.planned = planned


# ---------------------------------------------------------------- loss
def loss_terms(logits: torch.Tensor, tgt: torch.Tensor, t_logits: torch.Tensor | None, nb: torch.Tensor,
               beta: torch.Tensor):
    """logits [B, T, V], targets [B, T]; teacher logits [n, T, V] for rows [0, n); nb [n, T] natural book
    tokens; beta = CE weight on them (the rest is KL). Returns (scalar loss, per-token CE [B, T])."""
    lf = logits.float()
    ce = F.cross_entropy(lf.flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape)  # [B, T]
    if t_logits is None:
        return ce.mean(), ce.detach()
    n = t_logits.shape[0]
    s_lp = F.log_softmax(lf[:n], -1)
    t_lp = F.log_softmax(t_logits.float(), -1)
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # [n, T]
    w = nb.float() * (1 - beta)  # KL weight per token
    mixed = ce[:n] * (1 - w) + kl * w
    return torch.cat([mixed, ce[n:]], 0).mean(), ce.detach()


# ---------------------------------------------------------------- helpers
def setup_logging(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_standin", False):
            root.removeHandler(h)
    for h in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        h._standin = True
        root.addHandler(h)


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def monitor_data(books: corpus.Source, code: corpus.Source, cfg: TrainConfig) -> dict:
    """Fixed held-out rows for the loss curve and small recall probes (held-out slices, never dev)."""
    n, L = cfg.monitor_rows, cfg.seq + 1
    bv, cv = books.val.astype(np.int64), code.val.astype(np.int64)
    data = {}
    if bv.size > L + 1:
        data["val_books"] = bv[evaluate.spread_windows(bv, n, L)[:, None] + np.arange(L)]
    if cv.size > L + 1:
        data["val_code"] = cv[evaluate.spread_windows(cv, n, L)[:, None] + np.arange(L)]
    data["book_tokens"] = bv
    return data


def monitor(model, tok, data: dict, cfg: TrainConfig) -> dict:
    """Held-out losses and small recall probes (eager even when layers are compiled)."""
    out = {}
    model.eval()
    try:
        ctx = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else None
        with ctx if ctx is not None else torch.no_grad():
            b = max(1, min(16, cfg.batch))
            for name in ("val_books", "val_code"):
                if name in data:
                    out[f"{name}_nll"] = round(float(evaluate.window_nll(model, data[name], b).mean()), 4)
            if "val_books" in data:
                rows = data["val_books"][:, :cfg.seq]
                dists = [d for d in evaluate.COPY_DISTANCES if d + evaluate.BLOCK <= cfg.seq] or [cfg.seq // 2]
                for d, (c, nc) in evaluate.copy_probe(model, rows, (dists[0], dists[-1]), batch=b).items():
                    out[f"copy{d}_nll"] = round(float(c.mean()), 4)
                    out[f"copy{d}_nocopy_nll"] = round(float(nc.mean()), 4)
                gaps = [g for g in evaluate.PASSKEY_GAPS if g < cfg.seq - 64] or [cfg.seq // 4]
                r, al, _ = evaluate.passkey_rows(tok, data["book_tokens"], cfg.monitor_rows, cfg.seq, gaps, seed=1)
                out["passkey_acc"] = round(float(evaluate.answer_hits(model, r, al, b).mean()), 4)
                r, al, _, _ = evaluate.fact_rows(tok, data["book_tokens"], cfg.monitor_rows, cfg.seq, seed=1)
                out["fact_acc"] = round(float(evaluate.answer_hits(model, r, al, b).mean()), 4)
    finally:
        model.train()
    return out


def lm_logits(model, inp: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The training forward: [B, T] ids and positions, all-ones [B, T] mask -> logits [B, T, V]. The mask
    keeps attention across PoSE jumps (see the module docstring)."""
    return model(input_ids=inp, position_ids=pos, attention_mask=mask, use_cache=False).logits


def book_ce_weight(cfg: TrainConfig, has_teacher: bool, book_tokens_per_step: int, seg_steps: int,
                   unique_books: int) -> float:
    """CE weight on natural book tokens such that their CE exposure totals ``book_ce_passes`` passes over
    the carried books in this segment (1.0 without a teacher: plain CE)."""
    passes = book_tokens_per_step * seg_steps / max(1, unique_books)
    if not has_teacher or passes <= 0:
        return 1.0
    return min(1.0, cfg.book_ce_passes / passes)


def train(cfg: TrainConfig, t_start: float | None = None) -> dict:
    """Run (or continue) training per ``cfg``; returns the final state.json contents. The wall budget
    counts from ``t_start`` (the CLI passes the process start; default: now)."""
    from standin.trainer import Trainer

    return Trainer(cfg, t_start=t_start).run()


# ---------------------------------------------------------------- CLI
def parse(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m standin.pretrain", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="*", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    try:
        cfg = parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(cfg, t_start=T_START)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
