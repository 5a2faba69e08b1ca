"""Chunked, batched NLL evaluation of a :class:`ContextSystem` (a baseline defined by its context selection).

Each sample's target range is cut into chunks of at most ``system.chunk`` tokens. For a chunk ``[s, e)`` the
system selects a context from ``tokens[:s]`` within ``w_max - (e - s)`` slots; the base model then reads
context + chunk in one forward and the last ``h + 1`` logits give the chunk's NLL (slot ``T - 1 + i``
predicts target ``i``, the convention of :meth:`FrozenBase.nll`).

Efficiency: forwards of equal (length, chunk) are batched across chunks *and* samples (long documents make
most forwards exactly ``w_max`` long), only ``h + 1`` rows of logits are materialised, and selections of
CPU-heavy systems (BM25) can be computed in worker processes while nothing on the GPU waits for Python
per-token work. Memory stays bounded: at most one pending batch per (length, chunk) key, and at most
``PENDING_BATCHES * batch_tokens`` pending input slots over all keys (the largest group runs first when
that is exceeded; systems whose context length varies chunk to chunk, like a MegaContext WC, make many keys).

A :class:`Job` carries its input either as token ids (baselines: the batcher embeds them) or as ready
input embeddings (MegaContext: a working context mixes token embeddings and gists); both kinds share the
batcher, never the same batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from abc import abstractmethod
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from megacontext.bench.flops import flop_model
from megacontext.bench.system import Sample, Scores, Selection, System

log = logging.getLogger(__name__)


PENDING_BATCHES = 8  # pending input slots over all keys, in units of batch_tokens


class ContextSystem(System):
    """A system defined by a context selection rule; scoring is chunked and batched by the harness."""

    chunk: int = 128  # targets scored per forward
    batch_tokens: int = 65536  # input slots per batched forward
    workers: int = 1  # processes computing selections (only for CPU-heavy, picklable systems)

    @abstractmethod
    def select(self, history: Tensor, budget: int) -> Selection | None:
        """Choose at most ``budget`` ids (with positions) from ``history`` [s] (all tokens before the chunk).
        Return None when the system does not apply to this chunk."""

    def score(self, base, samples: list[Sample], w_max: int) -> list[Scores]:
        return score_chunked(base, self, samples, w_max)


@dataclass
class Job:
    """One forward's worth of input. Targets are the last ``h`` entries of ``ids``."""

    sample: int  # index into the sample list
    offset: int  # first target of the chunk, relative to the sample's target_start
    ids: torch.Tensor  # [L] context then chunk; with ``embeds``: at least the chunk's h ids (the targets)
    positions: torch.Tensor  # [L]
    h: int  # targets in the chunk
    extra_flops: float = 0.0
    embeds: torch.Tensor | None = None  # [L, d] the inputs as embeddings (gists among them), any device

    def __post_init__(self):
        n = int(self.positions.shape[0])
        if self.embeds is not None and int(self.embeds.shape[0]) != n:
            raise ValueError(f"job of sample {self.sample} at {self.offset}: {self.embeds.shape[0]} embeddings "
                             f"for {n} positions")
        if self.embeds is None and int(self.ids.shape[0]) != n:
            raise ValueError(f"job of sample {self.sample} at {self.offset}: {self.ids.shape[0]} ids for {n} "
                             "positions")
        if not 1 <= self.h <= min(n - 1, int(self.ids.shape[0])):
            raise ValueError(f"job of sample {self.sample} at {self.offset}: h={self.h} targets need 1 <= h < "
                             f"length={n} and at least h ids (got {self.ids.shape[0]})")

    @property
    def length(self) -> int:
        return int(self.positions.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        return self.ids[-self.h:]


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


class Batcher:
    """Groups jobs by (length, h, input kind); runs a group once it holds ``batch_tokens`` input slots, or
    the largest group once all pending groups together hold ``PENDING_BATCHES * batch_tokens``."""

    def __init__(self, base, results: list[Scores], batch_tokens: int, flops, progress):
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens} must be >= 1")
        self.base, self.results, self.batch_tokens = base, results, batch_tokens
        self.flops, self.progress = flops, progress
        self.pending: dict[tuple[int, int, bool], list[Job]] = {}
        self.pending_slots = 0

    def add(self, job: Job) -> None:
        key = (job.length, job.h, job.embeds is not None)
        group = self.pending.setdefault(key, [])
        group.append(job)
        self.pending_slots += key[0]
        if len(group) * key[0] >= self.batch_tokens:
            self._run_key(key)
        elif self.pending_slots > PENDING_BATCHES * self.batch_tokens:
            self._run_key(max(self.pending, key=lambda k: len(self.pending[k]) * k[0]))

    def flush(self) -> None:
        for key in list(self.pending):
            self._run_key(key)

    def _run_key(self, key: tuple[int, int, bool]) -> None:
        jobs = self.pending.pop(key)
        self.pending_slots -= len(jobs) * key[0]
        self.run(jobs)

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> None:
        base, h = self.base, jobs[0].h
        t0 = time.perf_counter()
        positions = torch.stack([j.positions for j in jobs])  # [B, L]
        if jobs[0].embeds is None:
            inputs = base.embed(torch.stack([j.ids for j in jobs]))  # [B, L, d]
        else:
            inputs = torch.stack([j.embeds.to(base.device) for j in jobs])  # [B, L, d]
        logits = base.forward(inputs, positions, logits_to_keep=h + 1).logits[:, -h - 1:-1]  # [B, h, V]
        logits = logits.float()
        targets = torch.stack([j.targets for j in jobs]).to(logits.device)  # [B, h]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view(targets.shape).cpu()
        top1 = (logits.argmax(-1) == targets).cpu()
        if base.device.type == "cuda":
            torch.cuda.synchronize(base.device)
        share = (time.perf_counter() - t0) / len(jobs)
        per_forward = self.flops.forward(int(positions.shape[1]), h + 1) if self.flops else float("nan")
        for row, job in enumerate(jobs):
            res = self.results[job.sample]
            res.nll[job.offset:job.offset + h] = nll[row]
            res.top1[job.offset:job.offset + h] = top1[row]
            res.flops += per_forward + job.extra_flops
            res.seconds += share
        self.progress.update(len(jobs))


def new_results(samples: list[Sample]) -> list[Scores]:
    """NaN-filled per-sample scores for the batcher to fill in."""
    return [Scores(torch.full((s.n_targets,), float("nan")), torch.zeros(s.n_targets, dtype=torch.bool))
            for s in samples]


def score_chunked(base, system: ContextSystem, samples: list[Sample], w_max: int) -> list[Scores]:
    """Per-sample NLL/top-1 of ``system`` at working budget ``w_max`` (see module docstring)."""
    results = new_results(samples)
    total = sum(len(chunk_bounds(s.target_start, s.target_end, system.chunk)) for s in samples)
    progress = tqdm(total=total, desc=f"{system.name} w={w_max}", unit="chunk", leave=False, mininterval=5)
    batcher = Batcher(base, results, system.batch_tokens, flop_model(base), progress)
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
