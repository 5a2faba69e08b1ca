"""GistNet training loop: substitutability through the frozen base model.

Invariants and design choices
- The base model is frozen (FrozenBase sets ``requires_grad=False``); only GistNet parameters are in the
  optimizer, so the base weights are bit-identical after training.
- Level 2 (``level=2``): the units are 1024-token spans whose LOD2 gists are made from LOD1 gists of a frozen
  LOD1 checkpoint (``lod1``) or of the same net trained jointly; everything below applies per unit.
- Each step gists the oldest ``g`` context blocks, ``g`` drawn uniformly from ``1..g_max(step)``; the
  curriculum grows ``g_max`` linearly from ``gist_frac_start`` to ``gist_frac_end`` of the context over
  ``curriculum_steps``. ``g`` derives from ``(seed, step)`` and the window stream is replayed up to the
  resume step, so a resumed run sees what the uninterrupted run would have seen, and all DDP ranks agree
  on ``g``.
- Distributed: when ``WORLD_SIZE`` is set (torchrun, N >= 1) a process group is initialised, GistNet is
  wrapped in DDP, data is sharded per rank, and only rank 0 logs, validates and writes checkpoints.
- Checkpoints: ``out/model.safetensors`` + ``out/config.json`` (base fingerprint, step, train config) via
  :meth:`GistNet.save`; the optimizer state goes to ``out/optim.safetensors`` + ``out/train_state.json``
  for resume (tensors in safetensors, scalars in JSON; nothing pickled).
- Metrics: one JSON line per ``log_every`` steps (and per validation) in ``out/metrics.jsonl``. Host syncs
  (``.item()``) happen only at those lines.
- Time-planned runs (``steps=0`` with ``max_minutes``): the step rate is measured over the first
  ``PLAN_STEPS`` steps after warm-up, and the run is planned to end inside the wall budget, so the LR schedule
  completes instead of being cut mid-cosine (a GPU lease gives minutes, not steps). The planned count is
  the largest over ranks and is recorded in every metrics line; a resumed time-planned run plans again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL
from megacontext.core.config import Config, check
from megacontext.core.distributed import any_rank, init_distributed, max_over_ranks, rank_device, wrap_ddp
from megacontext.core.lod import span
from megacontext.gistnet.distill import DistillTargets, distill_loss
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.gistnet.objective import ObjectiveConfig, gap_report, hidden_regression_loss, substitution_loss
from megacontext.gistnet.windows import open_windows

log = logging.getLogger(__name__)

PLAN_SKIP, PLAN_STEPS = 5, 20  # time-planned runs: steps ignored (warm-up), then steps timed
PLAN_RESERVE = 0.06  # share of the wall budget kept for the final validation and checkpoint
OPTIM = "optim.safetensors"
STATE = "train_state.json"
METRICS = "metrics.jsonl"


@dataclass
class GistTrainConfig(Config):
    base: str = BASE_MODEL  # frozen base model: a directory, an embedded model name or a hub id
    data: str = ""  # token cache for training windows; "" = random tokens (smoke runs and tests only)
    val_data: str = ""  # token cache for validation windows; "" = the val split of ``data``
    out: str = "runs/gistnet"
    init: str = ""  # start from this GistNet checkpoint (weights only); resume from ``out`` wins over it
    resume: bool = True  # continue from ``out`` if it holds a checkpoint with optimizer state
    model: GistNetConfig = field(default_factory=GistNetConfig)
    level: int = 1  # LOD of the gists trained: 1 (32 tokens -> 1) or 2 (32 LOD1 gists = 1024 tokens -> 1)
    lod1: str = ""  # level 2: frozen LOD1 GistNet checkpoint; "" = one net trained jointly for both levels
    distill: str = ""  # directory of optimised per-block targets (gistnet.distill), for objective.distill_weight
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    context: int = 1024  # C: context tokens per window (multiple of 32)
    horizon: int = 64  # H: tokens scored after the context
    batch_size: int = 16  # windows per step per rank
    steps: int = 2000
    lr: float = 1e-3
    encoder_lr_mult: float = 1.0  # model.encoder='base': the copied pretrained layers learn at lr * this
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_lr_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gist_frac_start: float = 0.125  # curriculum: largest gisted fraction of the context at step 0 ...
    gist_frac_end: float = 0.75  # ... and after curriculum_steps
    curriculum_steps: int = 1000
    hidden_warmup_steps: int = 0  # first steps regress hidden states instead of the substitution loss
    hidden_layer: int = -1  # hidden-states index for the warm-up; -1 = the middle layer
    val_every: int = 200
    val_batches: int = 4
    val_gist_frac: float = 0.5  # fraction of the context gisted in validation
    val_near_tokens: int = 64
    log_every: int = 20
    save_every: int = 500
    max_minutes: float = 0.0  # stop cleanly (with a checkpoint) after this wall time; 0 = no limit
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # base model weights: auto = bf16 on CUDA, fp32 on CPU
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile GistNet (dynamic shapes: the gisted block count varies per step)

    def __post_init__(self):
        check(self.level in (1, 2), f"level={self.level} must be 1 or 2")
        unit = span(self.level)
        check(self.context > 0 and self.context % unit == 0 and self.context // unit >= 2,
              f"context={self.context} must be a multiple of {unit} (level-{self.level} span) holding at least 2 spans")
        check(self.level == 2 or not self.lod1, f"lod1={self.lod1!r} is only used with level=2")
        check(self.objective.distill_weight == 0 or (self.distill and self.level == 1),
              f"objective.distill_weight={self.objective.distill_weight} needs level 1 and a target directory "
              f"(distill={self.distill!r})")
        check(self.level == 1 or self.objective.recon_weight == 0,
              f"objective.recon_weight={self.objective.recon_weight} applies to level-1 gists only")
        check(self.level == 1 or self.hidden_warmup_steps == 0,
              f"hidden_warmup_steps={self.hidden_warmup_steps} is supported for level 1 only")
        check(self.horizon >= 1, f"horizon={self.horizon} must be >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.steps >= 0, f"steps={self.steps} must be >= 0")
        check(self.steps > 0 or self.max_minutes > 0,
              f"steps={self.steps}: 0 plans the run from the step rate and needs max_minutes > 0")
        check(self.lr > 0, f"lr={self.lr} must be > 0")
        check(self.encoder_lr_mult > 0, f"encoder_lr_mult={self.encoder_lr_mult} must be > 0")
        check(0 <= self.min_lr_frac <= 1, f"min_lr_frac={self.min_lr_frac} must lie in [0, 1]")
        for name in ("gist_frac_start", "gist_frac_end", "val_gist_frac"):
            v = getattr(self, name)
            check(0 < v < 1, f"{name}={v} must lie in (0, 1): at least one block gisted, some context left raw")
        check(self.gist_frac_start <= self.gist_frac_end,
              f"gist_frac_start={self.gist_frac_start} must be <= gist_frac_end={self.gist_frac_end}")
        for name in ("warmup_lr_steps", "curriculum_steps", "hidden_warmup_steps", "val_batches", "save_every"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(self.val_every >= 0, f"val_every={self.val_every} must be >= 0")
        check(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0")
        check(self.max_minutes >= 0, f"max_minutes={self.max_minutes} must be >= 0")

    @property
    def blocks(self) -> int:
        """Gistable units of the context: 32-token blocks at level 1, 1024-token spans at level 2."""
        return self.context // span(self.level)

    def max_gist_blocks(self, step: int) -> int:
        t = 1.0 if self.curriculum_steps == 0 else min(1.0, step / self.curriculum_steps)
        frac = self.gist_frac_start + (self.gist_frac_end - self.gist_frac_start) * t
        return max(1, min(self.blocks - 1, int(frac * self.blocks)))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_lr_steps:
            return self.lr * (step + 1) / self.warmup_lr_steps
        t = min(1.0, (step - self.warmup_lr_steps) / max(1, self.steps - self.warmup_lr_steps))
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------- optimizer state <-> safetensors
def _save_optim(directory: Path, opt: torch.optim.Optimizer, step: int, cfg: GistTrainConfig) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    save_file(tensors, str(directory / (OPTIM + ".tmp")))
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, "config": cfg.to_dict()}
    (directory / (STATE + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(directory / (OPTIM + ".tmp"), directory / OPTIM)
    os.replace(directory / (STATE + ".tmp"), directory / STATE)


def _load_optim(directory: Path, opt: torch.optim.Optimizer) -> int:
    meta = json.loads((directory / STATE).read_text())
    flat = load_file(str(directory / OPTIM), device="cpu")
    state: dict[int, dict] = {}
    for name, val in flat.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def can_resume(directory: str | Path) -> bool:
    d = Path(directory)
    return all((d / f).is_file() for f in (OPTIM, STATE, "model.safetensors", "config.json"))


# ---------------------------------------------------------------------- loop
class _Logger:
    """Rank-0 JSONL metrics writer; other ranks write nothing."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.fh = path.open("a") if enabled else None

    def write(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _as_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    if not metrics:
        return {}
    vals = torch.stack([v.float() for v in metrics.values()]).cpu().tolist()  # one sync for all
    return {k: round(v, 5) for k, v in zip(metrics, vals, strict=True)}


def _loss(model, lod1: GistNet | None, base: FrozenBase, tokens: Tensor, g: int, cfg: GistTrainConfig,
          gen: torch.Generator):
    if cfg.level == 1:
        return substitution_loss(model, base, tokens, cfg.horizon, g, cfg.objective, gen=gen)
    return substitution_loss(lod1 if lod1 is not None else model, base, tokens, cfg.horizon, 0, cfg.objective,
                             lod2=model, n_lod2=g, gen=gen)


def validate(net: GistNet, base: FrozenBase, val: list[Tensor], cfg: GistTrainConfig,
             lod1: GistNet | None = None) -> dict[str, float]:
    """Gap report at a fixed gisted fraction, averaged over the fixed validation batches."""
    n_val = max(1, min(cfg.blocks - 1, int(cfg.val_gist_frac * cfg.blocks)))
    was_training = net.training
    net.eval()
    sums: dict[str, Tensor] = {}
    with _autocast(base.device, cfg.amp):
        for tokens in val:
            if cfg.level == 1:
                rep = gap_report(net, base, tokens, cfg.horizon, n_val, cfg.val_near_tokens)
            else:
                rep = gap_report(lod1 or net, base, tokens, cfg.horizon, 0, cfg.val_near_tokens, net, n_val)
            for k, v in rep.items():
                if not k.startswith("recovered"):
                    sums[k] = sums.get(k, 0) + v / len(val)
    for region in ("horizon", "near"):  # recovered from the averaged NLLs: less noisy than mean of ratios
        if f"raw_{region}" in sums:
            gap = (sums[f"drop_{region}"] - sums[f"raw_{region}"]).clamp_min(1e-6)
            sums[f"recovered_{region}"] = (sums[f"drop_{region}"] - sums[f"gist_{region}"]) / gap
    net.train(was_training)
    return _as_floats(sums)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: GistTrainConfig, base: FrozenBase | None = None) -> dict[str, float]:
    """Run (or resume) training; returns the last logged metrics. ``base`` may be passed in (tests)."""
    dist_ = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    if base is None:
        base = FrozenBase.load(cfg.base, device=rank_device(dist_, cfg.device), dtype=cfg.dtype)
    device = base.device
    out = Path(cfg.out)
    if dist_.main:
        out.mkdir(parents=True, exist_ok=True)

    net = GistNet(cfg.model, base.d_model, embed_norm=base.embed_norm, base_config=base.config)
    if cfg.model.encoder == "base":
        net.init_encoder_from(base)  # overwritten below by --init or a resumed checkpoint
    if cfg.init:
        net.load_state_dict(GistNet.load(cfg.init, base).state_dict())
    net.to(device).train()
    lod1_net = None
    if cfg.level == 2 and cfg.lod1:
        lod1_net = GistNet.load(cfg.lod1, base).requires_grad_(False)  # frozen: only the LOD2 net learns
    opt = torch.optim.AdamW(net.param_groups(cfg.encoder_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    start = 0
    if cfg.resume and can_resume(out):
        net.load_state_dict(GistNet.load(out, base).state_dict())
        start = _load_optim(out, opt)
        log.info("resumed from %s at step %d", out, start)
    if dist_.main:
        log.info("GistNet: %d params, width %d, %d layers; base %s (d=%d, fingerprint %s)", net.num_params(),
                 cfg.model.width(base.d_model), cfg.model.layers, base.name, base.d_model, base.fingerprint)

    model = wrap_ddp(net, dist_, device)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)

    train_windows = open_windows(cfg.data, cfg.context, cfg.horizon, split="train", seed=cfg.seed,
                                 vocab_size=base.vocab_size)
    train_windows = train_windows.shard(dist_.rank, dist_.world)
    batches: Iterator[Tensor] = iter(train_windows.batches(cfg.batch_size))
    for _ in range(start):  # replay the stream to where the run stopped (a gather per batch: cheap)
        next(batches)
    val: list[Tensor] = []
    if dist_.main and cfg.val_every and cfg.val_batches:
        # a separate val cache (held-out books) is used whole; otherwise the val split of the train cache
        val_src = open_windows(cfg.val_data or cfg.data, cfg.context, cfg.horizon,
                               split="all" if cfg.val_data else "val", seed=12345, vocab_size=base.vocab_size)
        val_iter = iter(val_src.batches(cfg.batch_size))
        val = [next(val_iter).to(device) for _ in range(cfg.val_batches)]

    targets = DistillTargets(cfg.distill, base) if cfg.objective.distill_weight > 0 else None
    if targets is not None and dist_.world > 1:  # a second forward per step would break DDP's gradient hooks
        raise ValueError(f"objective.distill_weight={cfg.objective.distill_weight}: distillation runs in one "
                         f"process only (this run has {dist_.world}); train without it under torchrun")
    if targets is not None:
        log.info("distillation toward %d optimised block vectors from %s", len(targets), cfg.distill)
    logger = _Logger(out / METRICS, dist_.main)
    planned = cfg.steps == 0  # time-planned: steps are set once the step rate is known
    if planned:
        cfg = cfg.replace(steps=10**9)  # while timing: only LR warm-up and the curriculum's start are used
    t0 = time.time()
    t_plan = None
    last: dict[str, float] = {}
    acc: dict[str, Tensor] = {}  # running sums of this log interval
    n_acc: dict[str, int] = {}  # per key: warm-up and substitution steps log different keys
    step = start
    bar = tqdm(total=None if planned else cfg.steps, initial=start, disable=not dist_.main, desc="gistnet",
               mininterval=5.0)
    try:
        if dist_.main and val and start == 0:
            last = {"step": 0, **{f"val_{k}": v for k, v in validate(net, base, val, cfg, lod1_net).items()}}
            logger.write(last)
            log.info("step 0 (mean-pool init) val: %s", last)
        while step < cfg.steps:
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            g = int(torch.randint(1, cfg.max_gist_blocks(step) + 1, (1,), generator=gen))
            tokens = next(batches).to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step) * group.get("lr_mult", 1.0)
            with _autocast(device, cfg.amp):
                if step < cfg.hidden_warmup_steps:
                    layer = None if cfg.hidden_layer < 0 else cfg.hidden_layer
                    loss = hidden_regression_loss(model, base, tokens, g, layer)
                    metrics = {"hidden_loss": loss.detach()}
                else:
                    loss, metrics = _loss(model, lod1_net, base, tokens, g, cfg, gen)
                if targets is not None:
                    blocks, want = targets.sample(cfg.objective.distill_batch, gen)
                    got = model(net.lod1_inputs(base, blocks.to(device)), 1)  # [n, d]
                    dl = distill_loss(got, want)
                    metrics["distill_cos"] = (1.0 - dl).detach()
                    loss = loss + cfg.objective.distill_weight * dl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip).detach()
            opt.step()
            step += 1
            bar.update(1)
            if planned and step == start + PLAN_SKIP:
                t_plan = time.time()
            elif planned and step == start + PLAN_SKIP + PLAN_STEPS:
                rate = PLAN_STEPS / max(time.time() - t_plan, 1e-6)
                left = 60 * cfg.max_minutes * (1 - PLAN_RESERVE) - (time.time() - t0)
                total = max_over_ranks(step + max(1, int(rate * left)), device)
                cfg = cfg.replace(steps=total)
                planned = False
                bar.total = total
                log.info("time-planned run: %.2f steps/s -> %d steps in %.1f min", rate, total, cfg.max_minutes)
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0) + v.float()
                n_acc[k] = n_acc.get(k, 0) + 1
            if dist_.main and (step % cfg.log_every == 0 or step == cfg.steps):
                rec = {"step": step, "steps": None if planned else cfg.steps, "lr": cfg.lr_at(step - 1),
                       "gist_blocks_max": cfg.max_gist_blocks(step - 1),
                       "elapsed_s": round(time.time() - t0, 1),
                       **_as_floats({k: v / n_acc[k] for k, v in acc.items()})}
                acc, n_acc = {}, {}
                if val and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                    rec.update({f"val_{k}": v for k, v in validate(net, base, val, cfg, lod1_net).items()})
                logger.write(rec)
                bar.set_postfix(loss=rec.get("loss", rec.get("hidden_loss")), rec=rec.get("val_recovered_near"))
                log.info("step %d %s", step, " ".join(f"{k}={v}" for k, v in rec.items() if k != "step"))
                last = rec
            timed_out = cfg.max_minutes > 0 and (time.time() - t0) > 60 * cfg.max_minutes
            if cfg.max_minutes > 0:  # all ranks must stop at the same step
                timed_out = any_rank(timed_out, device)
            if dist_.main and (timed_out or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
                _checkpoint(net, base, opt, step, cfg, out)
            if timed_out:
                log.info("max_minutes=%s reached at step %d; checkpoint written, stopping", cfg.max_minutes, step)
                break
        if dist_.main and step == start and start < cfg.steps:
            _checkpoint(net, base, opt, step, cfg, out)
    finally:
        bar.close()
        logger.close()
    return last


def _checkpoint(net: GistNet, base: FrozenBase, opt: torch.optim.Optimizer, step: int, cfg: GistTrainConfig,
                out: Path) -> None:
    extra = {"step": step, "train_config": cfg.to_dict(), "levels": [cfg.level]}
    if cfg.level == 2 and cfg.lod1:  # the LOD2 net only makes sense on top of these exact LOD1 gists
        extra["lod1_weights_hash"] = GistNet.load(cfg.lod1, base).weights_hash()
    net.save(out, base, extra=extra)
    _save_optim(out, opt, step, cfg)
    log.info("checkpoint step %d -> %s", step, out)
