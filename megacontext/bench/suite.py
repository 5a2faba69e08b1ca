"""A benchmark suite: its typed config (``configs/bench_<suite>.yaml``) and the samples it asks for.

Input paths have no defaults: the suite YAML names them (``configs/bench_smoke.yaml`` reads the developer
layout ``../shared``; GPU runs point them at copies under ``carry/``, see ``benchmarks/run_suite.sh``), and
a task whose input is not named is refused when the config is built. Every task is optional: ``tasks``
lists the ones to run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megacontext.bench.system import Sample
from megacontext.bench.tasks import TASKS, far_recall_samples, passkey_samples, perplexity_samples, qmsum_samples
from megacontext.core.assets import BASE_MODEL
from megacontext.core.config import Config, check

log = logging.getLogger(__name__)

_DISTANCES = (4096, 8192, 16384, 32768, 65536, 98304)  # log-spaced, 4k..~100k as in the issue


@dataclass
class BenchConfig(Config):
    name: str = "custom"
    base_model: str = BASE_MODEL  # a directory, an embedded model name or a hub id
    device: str = "auto"
    dtype: str = "auto"
    w_max: tuple[int, ...] = (1024, 2048)
    chunk: int = 128
    batch_tokens: int = 65536
    systems: tuple[str, ...] = ("full", "truncation", "sinks", "bm25", "llmlingua")
    system_options: dict = field(default_factory=dict)  # per system name: its config fields
    tasks: tuple[str, ...] = TASKS
    seed: int = 0
    books_dir: str = ""  # directory of held-out .txt books (books_ppl, far_recall, passkey); required by those
    books_max_docs: int | None = None
    ppl_max_tokens: int = 131072
    code_root: str | None = None  # None: this interpreter's standard library
    code_max_docs: int = 16
    code_min_tokens: int = 8192
    probe_docs_max_tokens: int = 131072  # haystack documents for far recall / passkey
    far_recall_distances: tuple[int, ...] = _DISTANCES
    passkey_distances: tuple[int, ...] = _DISTANCES
    per_distance: int = 32
    qmsum_paths: tuple[str, ...] = ()  # QMSum split directories (qmsum task); required by it
    qmsum_max_meetings: int | None = None
    qmsum_max_queries: int | None = None
    position_buckets: tuple[int, ...] = (0, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    n_boot: int = 2000
    out_dir: str = "docs/results/bench"

    def __post_init__(self):
        check(len(self.w_max) > 0 and all(w >= 2 for w in self.w_max), f"w_max={self.w_max} must list budgets >= 2")
        check(1 <= self.chunk < min(self.w_max), f"chunk={self.chunk} must be in [1, min(w_max)={min(self.w_max)})")
        check(self.batch_tokens >= max(self.w_max),
              f"batch_tokens={self.batch_tokens} must hold at least one row of max(w_max)={max(self.w_max)}")
        unknown = sorted(set(self.tasks) - set(TASKS))
        check(not unknown, f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
        check(len(self.systems) > 0, "systems must name at least one system")
        check(isinstance(self.system_options, dict), f"system_options={self.system_options!r} must be a mapping")
        check(list(self.position_buckets) == sorted(set(self.position_buckets)) and len(self.position_buckets) >= 2,
              f"position_buckets={self.position_buckets} must be >= 2 strictly increasing edges")
        check(self.per_distance >= 1, f"per_distance={self.per_distance} must be >= 1")
        check(self.n_boot >= 1, f"n_boot={self.n_boot} must be >= 1")
        book_tasks = sorted(set(self.tasks) & {"books_ppl", "far_recall", "passkey"})
        check(bool(self.books_dir) or not book_tasks,
              f"books_dir is empty but tasks {book_tasks} read books: set books_dir (--books-dir DIR or the YAML)")
        check(bool(self.qmsum_paths) or "qmsum" not in self.tasks,
              "qmsum_paths is empty but the qmsum task is requested: set qmsum_paths (--qmsum-paths DIR ...)")

    def options_for(self, system: str) -> dict:
        """Shared chunk/batch settings overlaid with the system's own options."""
        return {"chunk": self.chunk, "batch_tokens": self.batch_tokens, **(self.system_options.get(system) or {})}


def build_samples(cfg: BenchConfig, encode) -> dict[str, list[Sample]]:
    """Read and tokenize the suite's inputs, then generate each requested task's samples."""
    from megacontext.bench import corpora

    out: dict[str, list[Sample]] = {}
    books = None
    if any(t in cfg.tasks for t in ("books_ppl", "far_recall", "passkey")):
        cap = max(cfg.ppl_max_tokens, cfg.probe_docs_max_tokens)
        books = corpora.load_books(cfg.books_dir, encode, cfg.books_max_docs, cap)
    for task in cfg.tasks:
        if task == "books_ppl":
            out[task] = perplexity_samples(books, cfg.ppl_max_tokens, task)
        elif task == "code_ppl":
            code = corpora.load_code(encode, cfg.code_root, cfg.code_max_docs, cfg.code_min_tokens,
                                     cfg.ppl_max_tokens)
            out[task] = perplexity_samples(code, cfg.ppl_max_tokens, task)
        elif task == "far_recall":
            out[task] = far_recall_samples(books, cfg.far_recall_distances, cfg.per_distance, cfg.seed)
        elif task == "passkey":
            out[task] = passkey_samples(books, encode, cfg.passkey_distances, cfg.per_distance, cfg.seed + 1)
        elif task == "qmsum":
            meetings = corpora.load_meetings(list(cfg.qmsum_paths), cfg.qmsum_max_meetings)
            out[task] = qmsum_samples(meetings, encode, cfg.qmsum_max_queries)
        log.info("%s: %d samples, %d targets", task, len(out[task]), sum(s.n_targets for s in out[task]))
    return out
