"""Train LensNet on a counterfactual label cache: seeded, resumable, JSONL metrics, safetensors checkpoints.

Targets are the signed utilities of :mod:`megacontext.lensnet.targets` divided by ``target_scale`` (the
RMS of the training targets, measured once and stored with the checkpoint), so scores come out in units
the allocator's thresholds understand and the oracle can be expressed in the same units.

Validation holds out whole documents and reports the mean per-context Spearman correlation between scores
and targets (ranking quality: the allocator only uses the order), sign agreement, and the loss terms.

Resume: ``<out>/last/`` holds the weights (``model.safetensors`` + ``config.json``) and ``trainer.safetensors``
(AdamW moments, step, RNG state as tensors, no pickle); rerunning the same command continues from it.

Data parallel (``torchrun --nproc_per_node=N``, see :mod:`megacontext.core.distributed`): ``batch_size`` is
contexts per rank, so a step consumes a global batch of ``batch_size * N`` contexts. Every rank draws the
same seeded global batch of indices and keeps its contiguous slice; LensNet is DDP-wrapped, and the loss
terms are divided by their counts over the global batch (labelled entries and pairs differ between
ranks), so N ranks reproduce one process with ``batch_size * N`` contexts up to float reduction order.
Only rank 0 evaluates, logs metrics and writes checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from megacontext.core import distributed as D
from megacontext.core.config import Config, check
from megacontext.lensnet.labels import LabelSet
from megacontext.lensnet.loss import LensLossConfig, lens_loss
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.lensnet.targets import signed_targets

log = logging.getLogger(__name__)


@dataclass
class LensTrainConfig(Config):
    labels: str = "runs/lensnet/labels"  # label cache directory (megacontext.lensnet.labels)
    out: str = "runs/lensnet"
    steps: int = 1500
    batch_size: int = 16  # contexts per step per rank (global batch = batch_size * world size)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    val_fraction: float = 0.15
    eval_every: int = 250
    save_every: int = 500
    seed: int = 0
    max_seconds: float = 0.0  # > 0: stop (evaluate, save final) once training took this long; single process only
    model: LensNetConfig = field(default_factory=LensNetConfig)
    loss: LensLossConfig = field(default_factory=LensLossConfig)

    def __post_init__(self):
        check(self.steps >= 1, f"steps={self.steps} must be >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.lr > 0, f"lr={self.lr} must be > 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.warmup >= 0, f"warmup={self.warmup} must be >= 0")
        check(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must lie in [0, 1)")
        check(self.max_seconds >= 0, f"max_seconds={self.max_seconds} must be >= 0")
        check(self.eval_every >= 1 and self.save_every >= 1,
              f"eval_every={self.eval_every} and save_every={self.save_every} must be >= 1")


def batch_targets(batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled targets [B, E] with NaN -> 0, labelled mask [B, E])."""
    tgt, _ = signed_targets(batch["gain"], batch["loss"])
    labelled = ~tgt.isnan() & batch["mask"]
    return (tgt / scale).nan_to_num(0.0), labelled


def target_scale(labels: LabelSet, n: int = 512) -> float:
    """RMS of signed targets over (up to n) training contexts; guards against an all-zero label set."""
    idx = list(range(min(n, len(labels))))
    b = labels.collate(idx)
    tgt, _ = signed_targets(b["gain"], b["loss"])
    v = tgt[~tgt.isnan()]
    rms = float(v.pow(2).mean().sqrt()) if v.numel() else 0.0
    return rms if rms > 1e-8 else 1.0


def tail_inputs(base, tail_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tail ids [B, T] (-1 = none) -> (embeddings [B, T, d] float32, mask [B, T])."""
    mask = tail_ids >= 0
    return base.embed(tail_ids.clamp(min=0)).float() * mask.unsqueeze(-1).to(base.device), mask


def run_net(net: LensNet, base, batch: dict, model: torch.nn.Module | None = None) -> torch.Tensor:
    """Scores [B, E] of a collated batch; ``model`` (e.g. the DDP wrapper of ``net``) runs the forward."""
    dev = base.device
    tail, tmask = tail_inputs(base, batch["tail"][:, -net.cfg.tail_tokens:].to(dev))
    lex = batch["lexical"].to(dev) if net.cfg.lexical_features and "lexical" in batch else None
    return (model or net)(batch["entries"].to(dev), batch["levels"].to(dev), batch["ages"].to(dev),
                          batch["mask"].to(dev), tail, tmask.to(dev), lexical=lex)


def spearman_per_context(scores: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Spearman rho per context [B] over its labelled entries (NaN for contexts with < 3 labels).
    Ranks by double argsort; ties among targets are rare (continuous dNLL) and not averaged."""
    big = torch.finfo(torch.float32).max

    def ranks(x):
        x = x.masked_fill(~labelled, big)
        return x.argsort(1).argsort(1).float()

    rs, rt = ranks(scores), ranks(targets)
    n = labelled.float().sum(1)
    w = labelled.float()
    ms, mt = (rs * w).sum(1) / n.clamp_min(1), (rt * w).sum(1) / n.clamp_min(1)
    cov = ((rs - ms[:, None]) * (rt - mt[:, None]) * w).sum(1)
    var = (((rs - ms[:, None]) ** 2 * w).sum(1) * ((rt - mt[:, None]) ** 2 * w).sum(1)).sqrt()
    rho = cov / var.clamp_min(1e-12)
    return torch.where(n >= 3, rho, torch.full_like(rho, float("nan")))


@torch.no_grad()
def evaluate(net: LensNet, base, labels: LabelSet, scale: float, loss_cfg: LensLossConfig,
             batch_size: int = 32) -> dict:
    net.eval()
    rhos, signs, losses = [], [], []
    for i in range(0, len(labels), batch_size):
        b = labels.collate(list(range(i, min(i + batch_size, len(labels)))))
        s = run_net(net, base, b).cpu()
        tgt, lab = batch_targets(b, scale)
        rhos.append(spearman_per_context(s, tgt, lab))
        signs.append(((s > 0) == (tgt > 0))[lab].float())
        losses.append({k: float(v) for k, v in lens_loss(s, tgt, lab, b["expandable"], b["collapsible"],
                                                            b["mask"], loss_cfg).items()})
    rho = torch.cat(rhos)
    out = {"spearman": float(rho.nanmean()), "sign_agreement": float(torch.cat(signs).mean())}
    out.update({f"val_{k}": sum(d[k] for d in losses) / len(losses) for k in losses[0]})
    return out


def _lr(cfg: LensTrainConfig, step: int, elapsed: float | None = None) -> float:
    """Warmup then cosine; with ``max_seconds`` (and ``elapsed``) the cosine follows whichever of steps or time
    runs out first, so a time-boxed run still ends at a low learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_seconds and elapsed is not None:
        p = max(p, elapsed / cfg.max_seconds)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def _save(out: Path, net, opt, base, cfg, step, scale, metrics) -> None:
    extra = {"step": step, "target_scale": scale, "train_config": cfg.to_dict(), "metrics": metrics}
    net.save(out, base, extra=extra)
    state = {"step": torch.tensor(step), "rng": torch.get_rng_state()}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    state[f"{k}.{names[id(p)]}"] = st[k].detach().cpu().reshape(-1) if k == "step" else \
                        st[k].detach().cpu()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "trainer.safetensors"))


def _restore(out: Path, net, opt) -> int:
    state = load_file(str(out / "trainer.safetensors"))
    params = dict(net.named_parameters())
    for name, p in params.items():
        if f"exp_avg.{name}" in state:
            opt.state[p] = {"exp_avg": state[f"exp_avg.{name}"].to(p.device),
                            "exp_avg_sq": state[f"exp_avg_sq.{name}"].to(p.device),
                            "step": state[f"step.{name}"].reshape(()).clone()}
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def train_lensnet(base, cfg: LensTrainConfig, info: D.DistInfo | None = None) -> dict:
    """Train (or resume) and return the final validation metrics (rank 0; other ranks get only the target
    scale). Checkpoints: <out>/last, <out>/final. ``info``: the process group this rank is in; ``None``
    joins torchrun's group when launched under it, else runs as one process."""
    info = info if info is not None else D.init_distributed(base.device.type)
    torch.manual_seed(cfg.seed)
    labels = LabelSet.load(cfg.labels)
    meta = labels.meta(cfg.labels)
    if meta["base_fingerprint"] != base.fingerprint:
        raise ValueError(f"labels in {cfg.labels!r} were made with base fingerprint {meta['base_fingerprint']}, "
                         f"the loaded base model is {base.fingerprint}")
    train_set, val_set = labels.split(cfg.val_fraction)
    if len(train_set) == 0:
        raise ValueError(f"no training contexts left after holding out val_fraction={cfg.val_fraction}")
    scale = target_scale(train_set)
    log.info("LensNet: %d train / %d val contexts, target scale %.4g nats/token; %d rank(s) x %d contexts",
             len(train_set), len(val_set), scale, info.world, cfg.batch_size)
    net = LensNet(cfg.model, base.d_model).to(base.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    last = out / "last"
    start = 0
    if (last / "trainer.safetensors").is_file():
        state, _ = LensNet.load(last, base)
        net.load_state_dict(state.state_dict())
        start = _restore(last, net, opt)
        log.info("resumed from %s at step %d", last, start)
    for p in net.dead_parameters():  # never receive a gradient; DDP would otherwise wait for them
        p.requires_grad_(False)
    model = D.wrap_ddp(net, info, base.device)  # after loading: DDP broadcasts rank 0's weights
    mean = D.global_mean if info.enabled else None
    gen = torch.Generator().manual_seed(cfg.seed + start)  # same stream on every rank: never rank-dependent
    jsonl = open(out / "metrics.jsonl", "a") if info.main else None  # noqa: SIM115 (kept open across the loop)
    metrics: dict = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="lensnet", initial=start, total=cfg.steps, disable=not info.main)
    for step in bar:
        model.train()
        lr = _lr(cfg, step, None if info.enabled else time.perf_counter() - t0)  # ranks must agree: steps only
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(train_set), (cfg.batch_size * info.world,), generator=gen)  # global batch
        b = train_set.collate(D.split_global_batch(idx, info.rank, info.world).tolist())
        tgt, lab = batch_targets(b, scale)
        s = run_net(net, base, b, model)
        dev = s.device
        terms = lens_loss(s, tgt.to(dev), lab.to(dev), b["expandable"].to(dev), b["collapsible"].to(dev),
                          b["mask"].to(dev), cfg.loss, mean=mean)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)  # grads already rank-averaged
        opt.step()
        done = step + 1
        if cfg.max_seconds and not info.enabled and time.perf_counter() - t0 > cfg.max_seconds:
            bar.close()
            log.info("max_seconds=%s reached at step %d of %d", cfg.max_seconds, done, cfg.steps)
            cfg = cfg.replace(steps=done)  # this step is the last: evaluate and save as at the end
        evaluating = done % cfg.eval_every == 0 or done == cfg.steps
        saving = done % cfg.save_every == 0 or done == cfg.steps
        if done % 10 == 0 or done == cfg.steps:
            # every rank joins the average; with global_mean the rank mean of each term is its global value
            terms = D.all_reduce_mean({k: v.detach() for k, v in terms.items()})
            if info.main:
                rec = {"step": done, "lr": lr, "grad_norm": float(gnorm),
                       **{k: float(v) for k, v in terms.items()}, "seconds": round(time.perf_counter() - t0, 1)}
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if evaluating:
                    if len(val_set):
                        metrics = evaluate(net, base, val_set, scale, cfg.loss)
                        rec.update(metrics)
                    log.info("step %d: %s", done, {k: round(v, 4) for k, v in rec.items() if isinstance(v, float)})
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
        if saving and info.main:
            _save(last, net, opt, base, cfg, done, scale, metrics)
        if info.enabled and (saving or evaluating):
            D.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
        if done == cfg.steps:
            break
    if not info.main:
        D.barrier()  # pairs with rank 0's barrier after the final checkpoint below
        return {"target_scale": scale}
    jsonl.close()
    final = out / "final"
    net.save(final, base, extra={"step": cfg.steps, "target_scale": scale, "train_config": cfg.to_dict(),
                                 "metrics": metrics, "label_meta": {k: meta[k] for k in ("config", "compressor")}})
    (out / "summary.json").write_text(json.dumps({"target_scale": scale, "train_contexts": len(train_set),
                                                  "val_contexts": len(val_set), "params": net.num_params(),
                                                  "world": info.world, **metrics}, indent=2))
    D.barrier()
    return {"target_scale": scale, **metrics}
