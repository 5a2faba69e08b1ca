"""Chunked, batched NLL evaluation of a :class:`~megacontext.bench.system.ContextSystem`.

Each sample's target range is cut into chunks of at most ``system.chunk`` tokens. For a chunk ``[s, e)`` the
system selects a context from ``tokens[:s]`` within ``w_max - (e - s)`` slots; the base model then reads
context + chunk in one forward and the last ``h + 1`` logits give the chunk's NLL (slot ``T - 1 + i``
predicts target ``i``, the convention of :meth:`FrozenBase.nll`).

Efficiency: forwards of equal (length, chunk) are batched across chunks *and* samples (long documents make
most forwards exactly ``w_max`` long), only ``h + 1`` rows of logits are materialised, and selections of
CPU-heavy systems (BM25) can be computed in worker processes while nothing on the GPU waits for Python
per-token work. Memory stays bounded: at most one pending batch per (length, chunk) key.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megacontext.bench.flops import flop_model
from megacontext.bench.system import ContextSystem, Sample, Scores

log = logging.getLogger(__name__)


@dataclass
class Job:
    sample: int  # index into the sample list
    offset: int  # first target of the chunk, relative to the sample's target_start
    ids: torch.Tensor  # [L] context then chunk
    positions: torch.Tensor  # [L]
    h: int  # targets in the chunk (the last h ids)
    extra_flops: float = 0.0


def chunk_bounds(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]


def plan_sample(system: ContextSystem, w_max: int, index: int, sample: Sample) -> list[Job]:
    """All forwards one sample needs (chunks where the system does not apply are left out)."""
    jobs = []
    for s, e in chunk_bounds(sample.target_start, sample.target_end, system.chunk):
        h = e - s
        budget = w_max - h
        if budget < 1:
            raise ValueError(f"w_max={w_max} leaves no context for a chunk of {h} tokens; use chunk < w_max")
        sel = system.select(sample.tokens[:s], budget)
        if sel is None:
            continue
        t = int(sel.ids.shape[0])
        if t == 0:
            raise ValueError(f"system {system.name!r} selected no context for sample {sample.sample_id!r} at {s}; "
                             "at least one token is needed to predict the first target")
        if getattr(system, "respects_budget", True) and t > budget:
            raise ValueError(f"system {system.name!r} selected {t} tokens for a budget of {budget}")
        ids = torch.cat([sel.ids.long(), sample.tokens[s:e]])
        positions = torch.cat([sel.positions.long(), sel.next_position + torch.arange(h)])
        jobs.append(Job(index, s - sample.target_start, ids, positions, h, sel.extra_flops))
    return jobs


class _Batcher:
    """Groups jobs by (length, h); runs a group once it holds ``batch_tokens`` input slots."""

    def __init__(self, base, results: list[Scores], batch_tokens: int, flops, progress):
        self.base, self.results, self.batch_tokens = base, results, batch_tokens
        self.flops, self.progress = flops, progress
        self.pending: dict[tuple[int, int], list[Job]] = {}

    def add(self, job: Job) -> None:
        key = (int(job.ids.shape[0]), job.h)
        group = self.pending.setdefault(key, [])
        group.append(job)
        if len(group) * key[0] >= self.batch_tokens:
            self.run(self.pending.pop(key))

    def flush(self) -> None:
        for key in list(self.pending):
            self.run(self.pending.pop(key))

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> None:
        base, h = self.base, jobs[0].h
        t0 = time.perf_counter()
        ids = torch.stack([j.ids for j in jobs])  # [B, L]
        positions = torch.stack([j.positions for j in jobs])  # [B, L]
        logits = base.forward(base.embed(ids), positions, logits_to_keep=h + 1).logits[:, -h - 1:-1]  # [B, h, V]
        logits = logits.float()
        targets = ids[:, -h:].to(logits.device)  # [B, h]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view(targets.shape).cpu()
        top1 = (logits.argmax(-1) == targets).cpu()
        if base.device.type == "cuda":
            torch.cuda.synchronize(base.device)
        share = (time.perf_counter() - t0) / len(jobs)
        per_forward = self.flops.forward(int(ids.shape[1]), h + 1) if self.flops else float("nan")
        for row, job in enumerate(jobs):
            res = self.results[job.sample]
            res.nll[job.offset:job.offset + h] = nll[row]
            res.top1[job.offset:job.offset + h] = top1[row]
            res.flops += per_forward + job.extra_flops
            res.seconds += share
        self.progress.update(len(jobs))


def score_chunked(base, system: ContextSystem, samples: list[Sample], w_max: int) -> list[Scores]:
    """Per-sample NLL/top-1 of ``system`` at working budget ``w_max`` (see module docstring)."""
    results = [Scores(torch.full((s.n_targets,), float("nan")), torch.zeros(s.n_targets, dtype=torch.bool))
               for s in samples]
    total = sum(len(chunk_bounds(s.target_start, s.target_end, system.chunk)) for s in samples)
    progress = tqdm(total=total, desc=f"{system.name} w={w_max}", unit="chunk", leave=False, mininterval=5)
    batcher = _Batcher(base, results, system.batch_tokens, flop_model(base), progress)
    plan = partial(plan_sample, system, w_max)
    select_seconds = 0.0
    if system.workers > 1 and len(samples) > 1:
        # fork: workers only run CPU selection code, never touch the GPU. Thousands of small tensors come
        # back; the default fd-passing strategy runs out of descriptors ("received 0 items of ancdata").
        torch.multiprocessing.set_sharing_strategy("file_system")
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(system.workers, mp_context=ctx) as pool:
            for jobs in pool.map(plan, range(len(samples)), samples):
                for job in jobs:
                    batcher.add(job)
    else:
        for i, sample in enumerate(samples):
            t0 = time.perf_counter()
            jobs = plan(i, sample)
            dt = time.perf_counter() - t0
            select_seconds += dt
            results[i].seconds += dt
            for job in jobs:
                batcher.add(job)
    batcher.flush()
    progress.close()
    log.debug("%s: %.1f s in context selection", system.name, select_seconds)
    return results
