"""The training loop of the stand-in run (configuration, schedule and loss: standin.pretrain).

One ``Trainer`` is one call of the script: it loads the corpora (code on a background thread while books
and the model load), restores a resumed run, then steps until the planned step count or the deadline,
evaluating held-out data every ``eval_every`` steps, logging every ``log_every`` steps (the only host
syncs), saving every ``save_minutes`` and at the end. Invariants: the step counter, token counts and data
stream continue across resumes; the learning rate is continuous across re-plans; nothing is written to the
export directory except the returnable set (standin.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from standin import checkpoint, corpus, evaluate
from standin.curriculum import ROW_TYPES, BatchBuilder, Prefetcher
from standin.pretrain import (
    Schedule,
    TrainConfig,
    book_ce_weight,
    build_optimizer,
    lm_logits,
    loss_terms,
    monitor,
    monitor_data,
    setup_logging,
)

log = logging.getLogger("standin.trainer")
WARM_STEPS = 10  # steps (compilation, allocator warm-up) before the throughput clock starts


class Trainer:
    def __init__(self, cfg: TrainConfig, t_start: float | None = None):
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        self.cfg = cfg
        self.t_start = time.time() if t_start is None else t_start
        self.deadline = self.t_start + cfg.minutes * 60
        self.run_dir = Path(cfg.out)
        setup_logging(self.run_dir)
        self.device = dev = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("config %s", json.dumps(dataclasses.asdict(cfg)))

        # ---- corpora: code on a background thread (the tokenizer releases the GIL) while books and model load
        self.tok = PreTrainedTokenizerFast.from_pretrained(cfg.init)
        pool = ThreadPoolExecutor(1)
        code_job = pool.submit(corpus.load_code, self.tok, cfg.code_roots or None, cfg.code_max_chars,
                               val_tokens=cfg.code_val_tokens, seed=cfg.seed)
        self.books = corpus.load_books(cfg.books, self.tok, cfg.book_val_tokens, max_chars=cfg.book_max_chars or None)
        log.info("books %s", self.books.summary())

        # ---- model, teacher, optimizer, resumed state
        state = checkpoint.read_state(Path(cfg.resume)) if cfg.resume else {}
        src = Path(cfg.resume) / "model" if cfg.resume else Path(cfg.init)
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa")
        self.model.to(dev).train()
        self.teacher = None
        if cfg.teacher != "none":
            tdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            self.teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher or src, dtype=tdtype,
                                                                attn_implementation="sdpa").to(dev).eval()
            self.teacher.requires_grad_(False)
        self.opt = build_optimizer(self.model, cfg, dev)
        self.names = {id(p): n for n, p in self.model.named_parameters()}
        self.step = int(state.get("step", 0))
        self._restore(state)

        code = code_job.result()
        pool.shutdown()
        self.code = code
        log.info("code %s", code.summary())
        self.unique = {"books": int(self.books.train.size), "code": int(code.train.size)}
        builder = BatchBuilder(self.books.train, code.train, self.tok, cfg.seq, cfg.batch, cfg.mix(), cfg.seed,
                               start_step=self.step)
        self.prefetch = Prefetcher(builder, depth=4, pin=dev.type == "cuda")
        self.mon = monitor_data(self.books, code, cfg)
        self.loss_fn = self._compile() if cfg.compile and dev.type == "cuda" else loss_terms
        self.compiled_ok = self.loss_fn is loss_terms
        self.ones = torch.ones(cfg.batch, cfg.seq, dtype=torch.long, device=dev)
        self.acc = {k: torch.zeros((), device=dev) for k in ("loss", "ce", "rec_ce", "rec_n", "gnorm")}
        self.by_type = torch.zeros(len(ROW_TYPES), device=dev)
        self.n_type = torch.zeros(len(ROW_TYPES), device=dev)
        self.hit = torch.zeros((), device=dev)
        self.sha = state.get("model_sha256")
        self.save_cost, self.last_save, self.eval_cost = 5.0, time.time(), 5.0
        log.info("corpora and model ready at %.1f s", time.time() - self.t_start)

    # ------------------------------------------------------------------ setup helpers
    def _restore(self, state: dict):
        cfg = self.cfg
        opt_path = Path(cfg.resume) / "optimizer.safetensors" if cfg.resume else None
        have_moments = bool(opt_path and opt_path.is_file() and state.get("optimizer_step") == self.step)
        if have_moments:
            n = checkpoint.load_optimizer(self.opt, self.names, opt_path)
            log.info("restored AdamW moments of %d parameters from %s", n, opt_path)
        self.same_segment = have_moments and not state.get("segment_done", False)
        if self.same_segment:  # an interrupted segment on the same machine: its schedule goes on
            self.sched = Schedule(**state["schedule"])
            self.segment = int(state.get("segment", 0))
        else:
            self.segment = int(state.get("segment", -1)) + 1
            warm = cfg.resume_warmup if cfg.resume else cfg.warmup
            if cfg.steps:
                warm = max(1, min(warm, cfg.steps // 4))
            self.sched = Schedule(seg_start=self.step, warmup=warm, peak=cfg.lr, min_frac=cfg.min_lr_frac,
                                  planned=self.step + (cfg.steps or 10**9))
            if cfg.resume:
                log.info("resume: new segment %d, %s AdamW moments, %d warm-up steps", self.segment,
                         "restored" if have_moments else "fresh", warm)
        self.tokens = {k: int(v) for k, v in state.get("tokens", {"books": 0, "code": 0}).items()}
        self.seg_tokens = {"books": 0, "code": 0}
        # CE weight on natural book tokens: KL-only until the step count (hence the pass count) is planned
        resumed_beta = float(state.get("book_ce_weight", 0.0)) if self.same_segment else 0.0
        self.beta = torch.zeros((), device=self.device)  # device copy for the loss; beta_f mirrors it on the host
        self._set_beta(1.0 if self.teacher is None else resumed_beta)
        self.beta_set = self.teacher is None or self.same_segment
        self.plan_done = bool(cfg.steps) or self.same_segment

    def _set_beta(self, value: float):
        self.beta_f = float(value)
        self.beta.fill_(self.beta_f)

    def _compile(self):
        for layer in self.model.model.layers:  # regional: one decoder-layer graph, reused by all layers
            layer.compile()
        return torch.compile(loss_terms)

    def _uncompile(self):
        for layer in self.model.model.layers:
            layer._compiled_call_impl = None
        self.loss_fn = loss_terms

    # ------------------------------------------------------------------ pieces of the loop
    def held_out(self) -> dict:
        t = time.time()
        m = {"step": self.step, **monitor(self.model, self.tok, self.mon, self.cfg)}
        self.eval_cost = time.time() - t
        return m

    def write_metrics(self, rec: dict):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save(self, final: bool):
        t = time.time()
        cfg = self.cfg
        self.sha = checkpoint.save_model(self.model, self.run_dir / "model", Path(cfg.init))
        checkpoint.save_optimizer(self.opt, self.names, self.run_dir / "optimizer.safetensors")
        unique, tokens = self.unique, self.tokens
        checkpoint.write_state(self.run_dir, {
            "step": self.step, "optimizer_step": self.step, "segment": self.segment, "segment_done": final,
            "schedule": dataclasses.asdict(self.sched), "tokens": tokens, "unique_tokens": unique,
            "passes": {k: round(tokens[k] / max(1, unique[k]), 3) for k in tokens},
            "segment_passes": {k: round(self.seg_tokens[k] / max(1, unique[k]), 3) for k in self.seg_tokens},
            "book_ce_weight": round(self.beta_f, 4), "model_sha256": self.sha,
            "model_config": checkpoint.model_config(self.model, Path(cfg.init)), "config": dataclasses.asdict(cfg),
            "corpora": {"books": self.books.summary(), "code": self.code.summary()},
            "elapsed_s": round(time.time() - self.t_start, 1),
        })
        if cfg.export:
            checkpoint.export(self.run_dir, Path(cfg.export))
        self.save_cost, self.last_save = time.time() - t, time.time()
        log.info("saved step %d (sha256 %s) in %.1f s", self.step, self.sha[:12], self.save_cost)

    def _reserve(self) -> float:
        """Seconds kept free at the end: the final held-out evaluation and save, and a margin."""
        return self.eval_cost + self.save_cost + 3.0

    def replan(self, sec_per_step: float):
        """Fit the rest of the cosine into the time left at ``sec_per_step`` (overheads included)."""
        remaining = self.deadline - time.time() - self._reserve()
        self.sched.replan(self.step, self.step + int(max(0.0, remaining) / sec_per_step))

    def train_step(self, t_batch: dict, n_t: int, want_hit: bool) -> None:
        dev, cfg = self.device, self.cfg
        ids = t_batch["ids"].to(dev, non_blocking=True)
        pos = t_batch["pos"].to(dev, non_blocking=True)
        rtype = t_batch["row_type"].to(dev, non_blocking=True)
        recall = t_batch["recall"].to(dev, non_blocking=True)
        nb = t_batch["natural_book"].to(dev, non_blocking=True)
        inp, tgt = ids[:, :-1], ids[:, 1:]
        with evaluate.amp(dev):
            logits = lm_logits(self.model, inp, pos, self.ones)  # [B, T, V]
            t_logits = None
            if n_t:
                with torch.no_grad():
                    t_logits = lm_logits(self.teacher, inp[:n_t], pos[:n_t], self.ones[:n_t])  # [n_t, T, V]
        loss, ce = self.loss_fn(logits, tgt, t_logits, nb[:n_t], self.beta)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # device-side bookkeeping, read at log steps only
            rf = recall.float()
            if want_hit:
                self.hit = ((logits.argmax(-1) == tgt).float() * rf).sum() / rf.sum().clamp(min=1)
            self.acc["loss"] += loss.detach()
            self.acc["ce"] += ce.mean()
            self.acc["gnorm"] += gn.detach()
            self.acc["rec_ce"] += (ce * rf).sum()
            self.acc["rec_n"] += rf.sum()
            self.by_type.index_add_(0, rtype, ce.mean(1))
            self.n_type.index_add_(0, rtype, torch.ones_like(rtype, dtype=torch.float32))

    def log_record(self, since_step: int, since_t: float, lr: float) -> dict:
        k, cfg, tokens = max(1, self.step - since_step), self.cfg, self.tokens
        rec = {
            "step": self.step, "loss": round(float(self.acc["loss"]) / k, 4), "ce": round(float(self.acc["ce"]) / k, 4),
            "lr": lr,
            "tok_s": round(k * cfg.batch * cfg.seq / max(time.time() - since_t, 1e-9)),
            "elapsed": round(time.time() - self.t_start, 1), "grad_norm": round(float(self.acc["gnorm"]) / k, 3),
            "recall_ce": round(float(self.acc["rec_ce"]) / max(1.0, float(self.acc["rec_n"])), 4),
            "recall_acc_last_batch": round(float(self.hit), 4),
            "ce_by_type": {t: round(float(self.by_type[i] / self.n_type[i]), 4) for i, t in enumerate(ROW_TYPES)
                           if float(self.n_type[i]) > 0},
            "tokens": dict(tokens), "passes": {kk: round(tokens[kk] / max(1, self.unique[kk]), 3) for kk in tokens},
            "book_ce_weight": round(self.beta_f, 4), "planned_steps": self.sched.planned,
        }
        for v in self.acc.values():
            v.zero_()
        self.by_type.zero_()
        self.n_type.zero_()
        return rec

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        pending = self.held_out()
        log.info("held-out at step %d: %s (%.1f s)", self.step, pending, self.eval_cost)
        t_ref = s_ref = None
        t_log, s_log, done_here = time.time(), self.step, 0
        try:
            while self.step < self.sched.planned and time.time() < self.deadline - self._reserve():
                t_batch, b = self.prefetch.get()
                if not self.beta_set and self.plan_done:  # fixed plan (--steps): the CE weight is known at once
                    self._set_beta(book_ce_weight(cfg, self.teacher is not None, b.tokens["books"],
                                                  self.sched.planned - self.sched.seg_start, self.unique["books"]))
                    self.beta_set = True
                n_t = b.n_book_rows if (self.teacher is not None and self.beta_f < 1.0) else 0  # no host sync
                lr = self.sched.lr(self.step)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                try:
                    self.train_step(t_batch, n_t, want_hit=(self.step + 1) % cfg.log_every == 0)
                except Exception:
                    if self.compiled_ok:
                        raise
                    log.exception("the compiled step failed: continuing eager")
                    self._uncompile()
                    self.opt.zero_grad(set_to_none=True)
                    self.compiled_ok = True
                    continue
                self.compiled_ok = True
                for k in self.tokens:
                    self.tokens[k] += b.tokens[k]
                    self.seg_tokens[k] += b.tokens[k]
                self.step += 1
                done_here += 1

                if done_here == WARM_STEPS:  # the throughput clock starts after compilation and warm-up
                    self._sync()
                    t_ref, s_ref = time.time(), self.step
                if not self.plan_done and t_ref is not None and self.step - s_ref >= cfg.measure_steps:
                    self._sync()
                    per_step = (time.time() - t_ref) / (self.step - s_ref)
                    eff = per_step * (1 + self.save_cost / (cfg.save_minutes * 60)) + self.eval_cost / cfg.eval_every
                    self.replan(eff)
                    self.plan_done = self.beta_set = True
                    seg = self.sched.planned - self.sched.seg_start
                    self._set_beta(book_ce_weight(cfg, self.teacher is not None, b.tokens["books"], seg,
                                                  self.unique["books"]))
                    log.info("plan: %.3f s/step (%.0f tok/s) -> %d steps this segment (%.0fM tokens), book CE "
                             "weight %.3f, projected passes books %.1f code %.1f", per_step,
                             cfg.batch * cfg.seq / per_step, seg, seg * cfg.batch * cfg.seq / 1e6, self.beta_f,
                             b.tokens["books"] * seg / max(1, self.unique["books"]),
                             b.tokens["code"] * seg / max(1, self.unique["code"]))

                if self.step % cfg.eval_every == 0:
                    pending = self.held_out()
                    if self.plan_done and not cfg.steps and t_ref is not None and self.step > s_ref:
                        self.replan((time.time() - t_ref) / (self.step - s_ref))  # measured, overheads included
                if self.step % cfg.log_every == 0:
                    rec = self.log_record(s_log, t_log, lr)
                    if pending is not None:
                        rec["held_out"], pending = pending, None
                    self.write_metrics(rec)
                    log.info("step %d loss %.4f lr %.2e %.0f tok/s recall_ce %.3f held_out %s", self.step,
                             rec["loss"], lr, rec["tok_s"], rec["recall_ce"], rec.get("held_out", ""))
                    t_log, s_log = time.time(), self.step
                if time.time() - self.last_save > cfg.save_minutes * 60:
                    self.save(final=False)
        finally:
            self.prefetch.close()
        final = self.held_out()
        self.write_metrics({"step": self.step, "final": True, "held_out": final,
                            "elapsed": round(time.time() - self.t_start, 1)})
        log.info("final held-out at step %d: %s", self.step, final)
        self.save(final=True)
        log.info("done: %d steps in this call, %.1f s since start", done_here, time.time() - self.t_start)
        return checkpoint.read_state(self.run_dir)
