"""Substitutability of gists: does the frozen base model predict a horizon as well from gists as from
the raw tokens they replace?

A window is ``context + horizon`` tokens. A *setting* replaces the oldest ``gisted`` context tokens by
one vector per span of its level (LOD1: per 32 tokens; LOD2: per 1,024) placed at span centres, and
keeps the rest raw at its own positions. Variants of a setting, scored by mean horizon NLL per window:

- ``raw``: the whole window raw (the reference the gists should match);
- ``drop``: the gisted part removed (raw tail keeps its absolute positions);
- ``gist``: GistNet's vectors; ``gist_lod1`` (LOD2 settings only): the same span as 32 LOD1 gists;
- ``gist_wrong``: the gists of *another* window of the batch in the same slots (a control: the share of
  ``gist`` that is block-specific content rather than topic, style or a learned bias);
- ``meanpool``: untrained baseline (block mean rescaled to the embedding norm);
- ``cram`` (on a subset): per-window optimised vectors, see :mod:`megacontext.gistnet.eval.cramming`.

The *copy probe* appends to the context a copy of one 32-token block drawn from the gisted region and
scores that copy (its first token excluded: nothing announces which block repeats, so it is
unpredictable in every variant); a gist that carries the block's content lets the model copy it.
The *reconstruction probe* (:mod:`megacontext.gistnet.eval.reconstruction`) asks the base to regenerate one block
from its gist alone.

Design choices
- Batched: all windows of a batch go through the base together; variants whose inputs have the same
  length and positions (gist, meanpool, cram) are stacked into one forward; ``raw`` is computed once per
  context length and shared by the settings. Per-window results stay on the device until the end.
- Settings are slices of one sampled window: LOD1 settings use its last ``context + horizon`` tokens,
  the LOD2 setting (1,024 gisted + ``lod2_recent`` raw) may need a longer window. Position ids count
  from the start of each setting's slice.
- bf16 autocast on CUDA; float32 NLLs. Every forward passes an explicit all-ones attention mask (see
  :func:`window_nll`).
- Random choices (copy-probe blocks) are drawn once for all windows, so results do not depend on the
  batch size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from megacontext.base import FrozenBase
from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, centre_tensor, span
from megacontext.gistnet.eval.cramming import CramConfig, cram
from megacontext.gistnet.eval.reconstruction import ReconConfig, probe_blocks, recon_scores
from megacontext.gistnet.levels import read_lod1_inputs
from megacontext.gistnet.substitute import splice

log = logging.getLogger(__name__)

Compressor = Callable[[Tensor, int], Tensor]  # (x [n, 32, d], level) -> [n, d]
Scores = dict[str, dict[str, dict[str, np.ndarray]]]  # probe -> setting -> variant -> [N] per-window NLL
WINDOW = "window_index"  # extra column in every setting: which input window each row scored


@dataclass
class GistEvalConfig(Config):
    context: int = 1024  # context tokens of the LOD1 settings
    horizon: int = 64  # scored tokens after the context
    gisted: tuple[int, ...] = (512, 896)  # LOD1 settings: oldest tokens gisted (half; all but the last 128)
    lod2: bool = False  # add the LOD2 setting (needs a GistNet trained at level 2)
    lod2_recent: int = 128  # raw context tokens after the 1,024 LOD2-gisted ones in the LOD2 setting
    copy_probe: bool = True
    wrong_gist: bool = True  # add the gist_wrong control (each window read with the previous window's gists)
    batch_size: int = 32
    n_boot: int = 2000
    seed: int = 0
    cram: CramConfig = field(default_factory=CramConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)

    def __post_init__(self):
        if isinstance(self.cram, dict):
            self.cram = CramConfig.from_dict(self.cram)
        if isinstance(self.recon, dict):
            self.recon = ReconConfig.from_dict(self.recon)
        self.gisted = tuple(int(g) for g in self.gisted)
        check(self.context > 0 and self.context % BLOCK == 0,
              f"context={self.context} must be a positive multiple of {BLOCK}")
        check(self.horizon >= 1, f"horizon={self.horizon} must be >= 1")
        for g in self.gisted:
            check(0 < g < self.context and g % BLOCK == 0,
                  f"gisted={g} must be a multiple of {BLOCK} in (0, context={self.context})")
        check(self.lod2_recent >= BLOCK and self.lod2_recent % BLOCK == 0,
              f"lod2_recent={self.lod2_recent} must be a multiple of {BLOCK} and >= {BLOCK}")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.n_boot >= 1, f"n_boot={self.n_boot} must be >= 1")
        check(bool(self.gisted) or self.lod2, "no setting to evaluate: gisted is empty and lod2 is off")

    def settings(self) -> list[Setting]:
        out = [Setting(1, g, self.context) for g in self.gisted]
        if self.lod2:
            out.append(Setting(2, span(2), span(2) + self.lod2_recent))
        return out

    @property
    def window(self) -> int:
        """Tokens per sampled window (the longest setting's context + horizon)."""
        return max(s.context for s in self.settings()) + self.horizon


@dataclass(frozen=True)
class Setting:
    level: int  # level of the substituted vectors
    gisted: int  # oldest context tokens replaced
    context: int  # context tokens (the window slice is context + horizon)

    @property
    def name(self) -> str:
        return f"lod{self.level}-{self.gisted}of{self.context}"

    @property
    def slots(self) -> int:
        return self.gisted // span(self.level)

    def positions(self, device) -> Tensor:
        """Position ids [P] of the substituted vectors: centres of their spans."""
        idx = torch.arange(self.slots, device=device)
        return centre_tensor(torch.full_like(idx, self.level), idx)


def window_nll(base: FrozenBase, tokens: Tensor, horizon: int, raw_start: int, prefix: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
    """Horizon NLL [B, H] of tokens [B, L] with slots [0, raw_start) replaced by ``prefix`` (or dropped).

    Passes an explicit all-ones attention mask: with ``attention_mask=None`` transformers reads every jump
    in the position ids (gists sit at span centres) as the start of a new packed sequence and hides all
    earlier slots, which would make every gist invisible and the gist variant identical to ``drop``."""
    embeds, pos = splice(base, tokens, raw_start, prefix, positions)  # [B, T, d], [B, T]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # [B, T]
    return base.nll(embeds, pos, tokens[:, -horizon:], attention_mask=mask)


def compress(base: FrozenBase, compressor: Compressor, tokens: Tensor, level: int) -> Tensor:
    """tokens [B, g] -> [B, g / span(level), d]: LOD1 vectors per block, then (level 2) one per 32 of them.
    A compressor with ``lod1_inputs`` (GistNet) chooses what LOD1 reads; others read token embeddings."""
    bsz, g = tokens.shape
    x = read_lod1_inputs(compressor, base, tokens.reshape(-1, BLOCK)).reshape(bsz, g, -1)  # [B, g, d]
    d = x.shape[-1]
    for lvl in range(1, level + 1):
        n = x.shape[1] // BLOCK
        x = compressor(x.reshape(bsz * n, BLOCK, d), lvl).reshape(bsz, n, d)  # [B, n, d]
    return x


def stacked_prefix_nll(base: FrozenBase, tokens: Tensor, horizon: int, raw_start: int,
                       prefixes: Mapping[str, Tensor], positions: Tensor) -> dict[str, Tensor]:
    """Horizon NLL [B, H] for several same-shaped prefixes [B, P, d] in a single forward of V*B rows."""
    if not prefixes:
        return {}
    names = list(prefixes)
    stacked = torch.cat([prefixes[n].to(base.dtype) for n in names], dim=0)  # [V*B, P, d]
    reps = tokens.repeat(len(names), 1)  # [V*B, L]
    nll = window_nll(base, reps, horizon, raw_start, stacked, positions)  # [V*B, H]
    return dict(zip(names, nll.chunk(len(names), dim=0), strict=True))


def setting_nlls(base: FrozenBase, compressors: Mapping[str, Compressor], tokens: Tensor, horizon: int,
                 setting: Setting, raw: Tensor | None = None,
                 extra_prefixes: Mapping[str, Tensor] | None = None,
                 wrong_tokens: Tensor | None = None) -> dict[str, Tensor]:
    """All variants of one setting on tokens [B, context + horizon] -> {variant: horizon NLL [B, H]}.

    ``raw`` may be passed in when another setting already computed it for the same tokens;
    ``extra_prefixes`` (e.g. crammed vectors) join the stacked forward of the compressors' prefixes;
    ``wrong_tokens`` [B, >= gisted] adds ``gist_wrong``: each window read with the gists of these other
    windows' gisted span (the control for block-specific content)."""
    g = setting.gisted
    out = {"raw": raw if raw is not None else window_nll(base, tokens, horizon, 0),
           "drop": window_nll(base, tokens, horizon, g)}
    prefixes = {name: compress(base, c, tokens[:, :g], setting.level) for name, c in compressors.items()}
    if wrong_tokens is not None and "gist" in compressors:
        prefixes["gist_wrong"] = compress(base, compressors["gist"], wrong_tokens[:, :g], setting.level)
    prefixes.update(extra_prefixes or {})
    out.update(stacked_prefix_nll(base, tokens, horizon, g, prefixes, setting.positions(tokens.device)))
    if setting.level == 2 and "gist" in compressors:  # how much the second compression step costs
        lod1 = Setting(1, g, setting.context)
        prefix = compress(base, compressors["gist"], tokens[:, :g], 1)
        out["gist_lod1"] = window_nll(base, tokens, horizon, g, prefix, lod1.positions(tokens.device))
    return out


def copy_blocks(setting: Setting, n: int, seed: int) -> Tensor:
    """Which gisted block each of n windows repeats [n]: seeded per setting, so adding or removing other
    settings (or changing the batch size) leaves a setting's probe unchanged."""
    rng = np.random.default_rng([seed, setting.level, setting.gisted, setting.context])
    return torch.from_numpy(rng.integers(0, setting.gisted // BLOCK, size=n))


def copy_windows(tokens: Tensor, setting: Setting, blocks: Tensor) -> Tensor:
    """tokens [B, >= context] with one gisted block index per window [B] -> [B, context + 32]: the context
    followed by a copy of that block."""
    ctx = tokens[:, :setting.context]  # [B, C]
    offs = blocks.to(tokens.device)[:, None] * BLOCK + torch.arange(BLOCK, device=tokens.device)  # [B, 32]
    return torch.cat([ctx, ctx.gather(1, offs)], dim=1)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compressors(base: FrozenBase, gistnet: Compressor | None, meanpool: Compressor) -> dict[str, Compressor]:
    out: dict[str, Compressor] = {}
    if gistnet is not None:
        out["gist"] = gistnet
    out["meanpool"] = meanpool
    return out


@torch.no_grad()
def score_windows(base: FrozenBase, windows: Tensor, cfg: GistEvalConfig, gistnet: Compressor | None,
                  meanpool: Compressor, desc: str = "windows") -> Scores:
    """Per-window mean NLLs of every probe, setting and variant for windows [N, >= cfg.window]."""
    if windows.dim() != 2 or windows.shape[1] < cfg.window:
        raise ValueError(f"windows must be [N, >= {cfg.window}] token ids, got shape {tuple(windows.shape)}")
    windows = windows[:, windows.shape[1] - cfg.window:]
    n = windows.shape[0]
    settings = cfg.settings()
    comps = _compressors(base, gistnet, meanpool)
    blocks = {s.name: copy_blocks(s, n, cfg.seed) for s in settings}
    acc: dict[str, dict[str, dict[str, list[Tensor]]]] = {}

    def add(probe, setting, nlls):
        for variant, v in nlls.items():
            acc.setdefault(probe, {}).setdefault(setting.name, {}).setdefault(variant, []).append(v.float())

    with _autocast(base.device):
        for start in tqdm(range(0, n, cfg.batch_size), desc=desc, unit="batch", leave=False):
            batch = windows[start:start + cfg.batch_size].to(base.device)  # [B, window]
            rows = torch.arange(start, start + batch.shape[0])
            # the control reads the previous window's gists (of the whole sample, so batching cannot change it)
            prev = windows[(rows - 1) % n].to(base.device) if cfg.wrong_gist and n >= 2 else None
            raw_by_context: dict[int, Tensor] = {}
            for s in settings:
                cut = batch.shape[1] - s.context - cfg.horizon
                toks = batch[:, cut:]  # [B, C + H]
                wrong = None if prev is None else prev[:, cut:]
                nlls = setting_nlls(base, comps, toks, cfg.horizon, s, raw=raw_by_context.get(s.context),
                                    wrong_tokens=wrong)
                raw_by_context[s.context] = nlls["raw"]
                add("horizon", s, {k: v.mean(-1) for k, v in nlls.items()})
                if cfg.copy_probe:
                    cw = copy_windows(toks, s, blocks[s.name][start:start + batch.shape[0]])  # [B, C + 32]
                    cn = setting_nlls(base, comps, cw, BLOCK, s, wrong_tokens=wrong)
                    add("copy", s, {k: v[:, 1:].mean(-1) for k, v in cn.items() if k != "gist_lod1"})
    scores: Scores = {p: {s: {v: torch.cat(x).cpu().numpy() for v, x in vs.items()} | {WINDOW: np.arange(n)}
                          for s, vs in ss.items()}
                      for p, ss in acc.items()}
    if cfg.recon.enabled:
        blocks = probe_blocks(windows, cfg.window - cfg.horizon, cfg.seed)  # [N, 32]
        with _autocast(base.device):
            scores["recon"] = {"lod1-block": recon_scores(base, blocks, cfg.recon, gistnet, meanpool, cfg.seed)
                               | {WINDOW: np.arange(n)}}
    if cfg.cram.windows > 0:
        subset = cram_subset(n, cfg.cram.windows, cfg.seed)
        scores["cram"] = cram_scores(base, windows[subset], cfg, gistnet, meanpool, desc)
        for cols in scores["cram"].values():
            cols[WINDOW] = subset.numpy()
    return scores


def cram_subset(n: int, k: int, seed: int) -> Tensor:
    """Sorted indices of the k (at most n) windows that get crammed: a seeded random subset, because
    samplers may return windows in document order and the first k would all come from one document."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:min(k, n)].sort().values


def cram_scores(base: FrozenBase, windows: Tensor, cfg: GistEvalConfig, gistnet: Compressor | None,
                meanpool: Compressor, desc: str = "cram") -> dict[str, dict[str, np.ndarray]]:
    """Per-window horizon NLLs of all variants plus ``cram`` (and the final KL ``cram_kl`` and the KL at
    its starting point ``init_kl``) on a small subset of windows [n, >= cfg.window]."""
    comps = _compressors(base, gistnet, meanpool)
    init_name = "gist" if cfg.cram.init == "gist" and gistnet is not None else "meanpool"
    acc: dict[str, dict[str, list[Tensor]]] = {}
    batches = range(0, windows.shape[0], cfg.cram.batch)
    with _autocast(base.device):
        for s in cfg.settings():
            for start in tqdm(batches, desc=f"{desc} cram {s.name}", unit="batch", leave=False):
                batch = windows[start:start + cfg.cram.batch].to(base.device)
                toks = batch[:, batch.shape[1] - s.context - cfg.horizon:]  # [B, C + H]
                with torch.no_grad():
                    init = compress(base, comps[init_name], toks[:, :s.gisted], s.level)  # [B, P, d]
                with torch.enable_grad():
                    vecs, kl0, kl1 = cram(base, toks, s.gisted, init, s.positions(toks.device),
                                          cfg.cram.steps, cfg.cram.lr)
                with torch.no_grad():
                    nlls = setting_nlls(base, comps, toks, cfg.horizon, s, extra_prefixes={"cram": vecs})
                row = {k: v.mean(-1) for k, v in nlls.items()} | {"init_kl": kl0, "cram_kl": kl1}
                for k, v in row.items():
                    acc.setdefault(s.name, {}).setdefault(k, []).append(v.float())
    log.info("crammed %d windows x %d settings (%d Adam steps each, init=%s)", windows.shape[0],
             len(cfg.settings()), cfg.cram.steps, init_name)
    return {s: {k: torch.cat(v).cpu().numpy() for k, v in vs.items()} for s, vs in acc.items()}
