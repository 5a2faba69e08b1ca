"""Substitutability objective: the base model should predict the same after gists as after the raw tokens.

A window ``tokens [B, L]`` (L = context C + horizon H) has its oldest ``g`` context blocks replaced by
their LOD1 gists (or its oldest 1024-token spans by LOD2 gists), each at the centre of its span
(:func:`megacontext.core.lod.centre_tensor`); the rest stays raw at its own positions
(:func:`megacontext.gistnet.substitute.splice`). The base model is frozen but not wrapped in ``no_grad``,
so the loss gradients flow through it into GistNet only.

Loss terms (weights in :class:`ObjectiveConfig`)
- ``horizon``: NLL of the last H tokens (the task-level signal; weak for a small base model whose far
  context matters little).
- ``dense``: KL(all-raw || gisted) of the next-token distributions (or plain NLL) on the raw tokens right
  after the gisted span, which depend on the gists most. KL is zero exactly when the gists are perfect
  substitutes, so it has no irreducible noise floor.
- ``copy`` (content-aware substitution): in a share ``copy_frac`` of the windows the last 32 tokens are
  replaced by a copy of one gisted block, and KL(all-raw || gisted) is taken on that copy. The raw model
  copies the block it can see; the gisted model can only do so if the gist carries the block's content,
  so this term rewards content where the plain horizon mostly rewards style and topic.
- ``recon`` (autoencoding, as in ICAE / 500xCompressor): the base reads one gist followed by its own block,
  teacher-forced, and the NLL of the block tokens is the loss: the gist must let the frozen base
  regenerate its 32 tokens.
- hidden-state warm-up (:func:`hidden_regression_loss`): the base model's hidden state at each gist slot
  regresses onto the mean hidden state of the raw block it replaces, a cheap dense start.

"Gap recovered" (:func:`gap_report`) compares three runs on the same tokens after the gisted span:
``raw`` (nothing replaced), ``drop`` (the span removed) and ``gist``; it is
``(nll_drop - nll_gist) / (nll_drop - nll_raw)``: 1 = as good as raw, 0 = as bad as dropping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, span
from megacontext.gistnet.model import GistNet, unwrap
from megacontext.gistnet.substitute import splice


@dataclass
class ObjectiveConfig(Config):
    horizon_weight: float = 1.0
    dense: Literal["kl", "nll", "none"] = "kl"
    dense_weight: float = 1.0
    dense_tokens: int = 256  # raw tokens right after the gisted span that get the dense term; 0 = all of them
    copy_frac: float = 0.0  # share of windows whose last 32 tokens become a copy of one gisted block
    copy_weight: float = 0.0  # weight of KL(raw || gisted) on those copies (first copy token excluded)
    recon_weight: float = 0.0  # weight of the reconstruction NLL: [gist][its block], teacher-forced
    recon_blocks: int = 256  # (gist, block) pairs per batch in the reconstruction term (a random subset)
    distill_weight: float = 0.0  # weight of 1 - cos(gist, optimised target) (needs GistTrainConfig.distill)
    distill_batch: int = 256  # (block, target) pairs per step in the distillation term

    def __post_init__(self):
        check(self.horizon_weight >= 0, f"horizon_weight={self.horizon_weight} must be >= 0")
        check(self.dense_weight >= 0, f"dense_weight={self.dense_weight} must be >= 0")
        check(self.dense in ("kl", "nll", "none"), f"dense={self.dense!r} must be one of kl, nll, none")
        check(self.dense_tokens >= 0, f"dense_tokens={self.dense_tokens} must be >= 0")
        check(0.0 <= self.copy_frac <= 1.0, f"copy_frac={self.copy_frac} must lie in [0, 1]")
        check(self.copy_weight >= 0, f"copy_weight={self.copy_weight} must be >= 0")
        check(self.recon_weight >= 0, f"recon_weight={self.recon_weight} must be >= 0")
        check(self.recon_blocks >= 1, f"recon_blocks={self.recon_blocks} must be >= 1")
        check(self.distill_weight >= 0, f"distill_weight={self.distill_weight} must be >= 0")
        check(self.distill_batch >= 1, f"distill_batch={self.distill_batch} must be >= 1")
        check(self.horizon_weight > 0 or (self.dense != "none" and self.dense_weight > 0)
              or self.copy_weight > 0 or self.recon_weight > 0 or self.distill_weight > 0,
              "objective has no term: set horizon_weight, a dense term, copy_, recon_ or distill_weight > 0")


def make_prefix(tokens: Tensor, base: FrozenBase, lod1: GistNet, n_lod1: int, lod2: GistNet | None = None,
                n_lod2: int = 0) -> tuple[Tensor, Tensor, int]:
    """Gists of the oldest part of ``tokens [B, L]``: ``n_lod2`` LOD2 gists (1024 tokens each, made from
    LOD1 gists of ``lod1``) then ``n_lod1`` LOD1 gists. Returns (prefix [B, P, d] float32,
    positions [P] int64, raw_start = number of tokens replaced)."""
    bsz = tokens.shape[0]
    d = base.d_model
    s1, s2 = span(1), span(2)
    n_tok1 = n_lod2 * (s2 // s1) + n_lod1  # LOD1 gists needed (LOD2 inputs come from LOD1 gists)
    raw_start = n_tok1 * s1
    if raw_start >= tokens.shape[1]:
        raise ValueError(f"gisting {raw_start} tokens leaves nothing raw in a window of {tokens.shape[1]}")
    emb = unwrap(lod1).lod1_inputs(base, tokens[:, :raw_start].reshape(bsz * n_tok1, BLOCK))  # [B*g, 32, d]
    g1 = lod1(emb, 1).view(bsz, n_tok1, d)  # [B, g, d]
    parts, pos = [], []
    if n_lod2:
        if lod2 is None:
            raise ValueError(f"n_lod2={n_lod2} LOD2 gists requested but no LOD2 GistNet given")
        g2 = lod2(g1[:, : n_lod2 * BLOCK].reshape(bsz * n_lod2, BLOCK, d), 2).view(bsz, n_lod2, d)  # [B, n2, d]
        parts.append(g2)
        pos.append(torch.arange(n_lod2, device=g2.device) * s2 + s2 // 2)
    parts.append(g1[:, n_lod2 * BLOCK:])
    pos.append(n_lod2 * s2 + torch.arange(n_lod1, device=g1.device) * s1 + s1 // 2)
    return torch.cat(parts, dim=1), torch.cat(pos), raw_start


def full_mask(embeds: Tensor) -> Tensor:
    """All-ones attention mask [B, T]. Needed whenever positions jump (gists at span centres): with
    ``attention_mask=None`` transformers reads every position jump as the start of a new packed sequence
    and masks everything before it, so the gists would silently be invisible to the raw tokens."""
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


def tail_logits(base: FrozenBase, embeds: Tensor, positions: Tensor, n: int) -> Tensor:
    """Logits [B, n, V] (float32) predicting the last ``n`` input slots from the slots before them."""
    return base.forward(embeds, positions, full_mask(embeds), logits_to_keep=n + 1).logits[:, :-1].float()


def raw_tail_logits(base: FrozenBase, tokens: Tensor, n: int) -> Tensor:
    embeds, pos = splice(base, tokens, 0)
    return tail_logits(base, embeds, pos, n)


def _region(raw_len: int, horizon: int, dense_tokens: int) -> int:
    """Length of the dense region (tokens after the gisted span, before the horizon)."""
    avail = raw_len - horizon
    return avail if dense_tokens == 0 else min(dense_tokens, avail)


def plant_copies(tokens: Tensor, gisted_blocks: int, frac: float,
                 gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Content-aware windows: tokens [B, L] -> (tokens', planted [B] bool). In a share ``frac`` of the rows
    (drawn from ``gen``, a CPU generator) the last 32 tokens are replaced by a copy of one of the row's
    first ``gisted_blocks`` blocks, so the copy can only be predicted from the gisted span."""
    bsz = tokens.shape[0]
    planted = torch.rand(bsz, generator=gen) < frac  # [B]
    which = torch.randint(0, max(1, gisted_blocks), (bsz,), generator=gen)  # [B]
    if not bool(planted.any()):
        return tokens, planted
    src = (which[:, None] * BLOCK + torch.arange(BLOCK)[None]).to(tokens.device)  # [B, 32]
    copies = tokens.gather(1, src)  # [B, 32]
    out = tokens.clone()
    out[:, -BLOCK:] = torch.where(planted.to(tokens.device)[:, None], copies, tokens[:, -BLOCK:])
    return out, planted


def _kl(teacher: Tensor, student: Tensor) -> Tensor:
    """KL(teacher || student) per position [..] from logits [.., V] (float32)."""
    t_logp = F.log_softmax(teacher.float(), dim=-1)
    s_logp = F.log_softmax(student.float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def recon_prefix(base: FrozenBase) -> list[int]:
    """Token ids read before the gist in the reconstruction task: the model's BOS (else EOS) token, which
    takes the attention-sink role of the first slot so that the gist is read as content; [] if it has none."""
    cfg = base.config
    tok = getattr(cfg, "bos_token_id", None)
    if tok is None:
        tok = getattr(cfg, "eos_token_id", None)
    if isinstance(tok, list | tuple):
        tok = tok[0] if tok else None
    return [] if tok is None else [int(tok)]


def reconstruction_logits(base: FrozenBase, vectors: Tensor, blocks: Tensor) -> Tensor:
    """The base reads ``[prefix][vector][block]`` (positions 0, 1, ...) for vectors [N, d] and their blocks
    [N, 32]; returns the teacher-forced logits [N, 32, V] (float32) predicting each block token."""
    n = vectors.shape[0]
    pre = torch.tensor(recon_prefix(base), dtype=torch.long, device=base.device).expand(n, -1)  # [N, p]
    emb = torch.cat([base.embed(pre), vectors[:, None].to(base.dtype), base.embed(blocks)], dim=1)  # [N, p+33, d]
    pos = torch.arange(emb.shape[1], device=emb.device)
    return base.forward(emb, pos, full_mask(emb), logits_to_keep=BLOCK + 1).logits[:, :-1].float()


def reconstruction_loss(base: FrozenBase, gists: Tensor, blocks: Tensor, max_pairs: int,
                        gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Autoencoding term: gists [N, d] of blocks [N, 32] -> (mean block NLL, teacher-forced top-1 accuracy),
    on a random subset of at most ``max_pairs`` pairs."""
    n = gists.shape[0]
    if n > max_pairs:
        idx = torch.randperm(n, generator=gen)[:max_pairs]
        gists, blocks = gists[idx.to(gists.device)], blocks[idx.to(blocks.device)]
    logits = reconstruction_logits(base, gists, blocks)  # [N, 32, V]
    targets = blocks.to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [N, 32]
    return nll.mean(), (logits.argmax(-1) == targets).float().mean().detach()


def gist_similarity(gists: Tensor, max_rows: int = 256) -> Tensor:
    """Mean off-diagonal cosine similarity of gists [N, d] (the first ``max_rows``): a collapse detector
    (near 1 = every block gets about the same vector). Detached 0-d tensor."""
    g = F.normalize(gists.detach()[:max_rows].float(), dim=-1)
    n = g.shape[0]
    if n < 2:
        return torch.zeros((), device=g.device)
    gram = g @ g.T  # [n, n]
    return (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))


def substitution_loss(lod1: GistNet, base: FrozenBase, tokens: Tensor, horizon: int, n_lod1: int,
                      cfg: ObjectiveConfig, lod2: GistNet | None = None, n_lod2: int = 0,
                      gen: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss for one batch ``tokens [B, L]`` with the oldest blocks gisted. Returns (loss, metrics);
    metrics are detached 0-d tensors (no host sync here; the caller decides when to read them). ``gen``
    (CPU) draws the planted copies and the reconstruction subset."""
    gisted_blocks = (n_lod2 * (span(2) // span(1)) + n_lod1)
    planted = None
    if cfg.copy_frac > 0:
        tokens, planted = plant_copies(tokens, gisted_blocks, cfg.copy_frac, gen)
    prefix, ppos, raw_start = make_prefix(tokens, base, lod1, n_lod1, lod2, n_lod2)
    embeds, pos = splice(base, tokens, raw_start, prefix, ppos)  # [B, P + L - raw_start, d]
    raw_len = tokens.shape[1] - raw_start
    logits = tail_logits(base, embeds, pos, raw_len)  # [B, raw_len, V] predicting tokens[raw_start:]
    targets = tokens[:, raw_start:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, raw_len]
    metrics: dict[str, Tensor] = {"horizon_nll": nll[:, -horizon:].mean().detach()}
    loss = cfg.horizon_weight * nll[:, -horizon:].mean()
    n_dense = _region(raw_len, horizon, cfg.dense_tokens) if cfg.dense != "none" else 0
    copy_on = planted is not None and bool(planted.any()) and raw_len > BLOCK
    n_copy = BLOCK - 1 if copy_on else 0  # the copy's first token is unpredictable in every variant
    teacher_dense = teacher_copy = None
    if (cfg.dense == "kl" and n_dense > 0) or (copy_on and cfg.copy_weight > 0):
        with torch.no_grad():  # causal: the teacher needs the window only up to the last position it scores
            end = tokens.shape[1] if copy_on else raw_start + n_dense
            keep = end - raw_start
            raw = raw_tail_logits(base, tokens[:, :end], keep)  # [B, keep, V]
            teacher_dense = raw[:, :n_dense] if n_dense else None
            teacher_copy = raw[:, -n_copy:] if copy_on else None
    if cfg.dense != "none" and n_dense > 0:
        if cfg.dense == "nll":
            dense = nll[:, :n_dense].mean()
        else:
            dense = _kl(teacher_dense, logits[:, :n_dense]).mean()
        metrics[f"dense_{cfg.dense}"] = dense.detach()
        loss = loss + cfg.dense_weight * dense
    if copy_on:
        m = planted.to(logits.device).float()  # [B]
        rows = m.sum().clamp_min(1.0)
        metrics["copy_nll"] = ((nll[:, -n_copy:].mean(-1) * m).sum() / rows).detach()
        if teacher_copy is not None:
            raw_nll = F.cross_entropy(teacher_copy.transpose(1, 2), targets[:, -n_copy:], reduction="none")
            metrics["copy_nll_raw"] = ((raw_nll.mean(-1) * m).sum() / rows).detach()
            if cfg.copy_weight > 0:
                copy_kl = (_kl(teacher_copy, logits[:, -n_copy:]).mean(-1) * m).sum() / rows
                metrics["copy_kl"] = copy_kl.detach()
                loss = loss + cfg.copy_weight * copy_kl
    g1 = prefix[:, n_lod2:] if n_lod1 else None  # [B, n_lod1, d] the LOD1 gists in the prefix
    if g1 is not None:
        metrics["gist_cos"] = gist_similarity(g1.reshape(-1, g1.shape[-1]))
    if cfg.recon_weight > 0 and n_lod1 > 0:
        first = n_lod2 * (span(2) // span(1))  # LOD1 gists follow the LOD2-gisted tokens
        blocks = tokens[:, first * BLOCK: (first + n_lod1) * BLOCK].reshape(-1, BLOCK)  # [B * n_lod1, 32]
        recon, acc = reconstruction_loss(base, g1.reshape(-1, g1.shape[-1]), blocks, cfg.recon_blocks, gen)
        metrics["recon_nll"], metrics["recon_acc"] = recon.detach(), acc
        loss = loss + cfg.recon_weight * recon
    metrics["loss"] = loss.detach()
    return loss, metrics


def hidden_regression_loss(lod1: GistNet, base: FrozenBase, tokens: Tensor, n_lod1: int,
                           layer: int | None = None) -> Tensor:
    """Warm-up loss: base hidden state (index ``layer`` of HF ``hidden_states``; None = the middle one) at each
    gist slot vs the mean hidden state of the raw block it replaces, as a relative squared error (scale-free
    across base models)."""
    with torch.no_grad():
        embeds, pos = splice(base, tokens, 0)
        states = base.forward(embeds, pos, output_hidden_states=True, logits_to_keep=1).hidden_states
        layer = len(states) // 2 if layer is None else layer
        h_raw = states[layer]
        bsz, _, d = h_raw.shape
        target = h_raw[:, : n_lod1 * BLOCK].float().view(bsz, n_lod1, BLOCK, d).mean(2)  # [B, g, d]
    prefix, ppos, raw_start = make_prefix(tokens, base, lod1, n_lod1)
    # only the prefix slots are needed: feed the gists plus one raw token (splice needs a non-empty raw part)
    embeds, pos = splice(base, tokens[:, : raw_start + 1], raw_start, prefix, ppos)
    h = base.forward(embeds, pos, full_mask(embeds), output_hidden_states=True, logits_to_keep=1).hidden_states[layer]
    pred = h[:, :n_lod1].float()  # [B, g, d]
    return ((pred - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean().clamp_min(1e-6)


@torch.no_grad()
def gap_report(lod1: GistNet, base: FrozenBase, tokens: Tensor, horizon: int, n_lod1: int, near_tokens: int = 64,
               lod2: GistNet | None = None, n_lod2: int = 0) -> dict[str, Tensor]:
    """Mean NLL of raw / drop / gist runs on the ``near`` tokens right after the gisted span and on the
    horizon, and the gap recovered on each (0-d tensors). The first token after the span is skipped in
    all three runs because the drop run has nothing to predict it from."""
    prefix, ppos, raw_start = make_prefix(tokens, base, lod1, n_lod1, lod2, n_lod2)
    n = tokens.shape[1] - raw_start - 1  # predicted tokens: tokens[raw_start + 1:]
    targets = tokens[:, raw_start + 1:].to(base.device)
    runs = {
        "raw": raw_tail_logits(base, tokens, n),
        "drop": tail_logits(base, *splice(base, tokens, raw_start), n),
        "gist": tail_logits(base, *splice(base, tokens, raw_start, prefix, ppos), n),
    }
    near = min(near_tokens, n - horizon) if n > horizon else 0
    out: dict[str, Tensor] = {}
    for name, logits in runs.items():
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, n]
        out[f"{name}_horizon"] = nll[:, -horizon:].mean()
        if near > 0:
            out[f"{name}_near"] = nll[:, :near].mean()
    for region in ("horizon", "near"):
        if f"raw_{region}" in out:
            gap = out[f"drop_{region}"] - out[f"raw_{region}"]
            out[f"recovered_{region}"] = (out[f"drop_{region}"] - out[f"gist_{region}"]) / gap.clamp_min(1e-6)
    return out
