"""Generation over a working context: decode one token at a time, append each to the memory, refocus every k.

Per token the base does one cached decode step as long as the WC only grew by that token. When the WC changed
(a recency collapse at a block boundary, or the refocus that runs at every multiple of k) the slot keys of the
new WC are compared with the cached ones and only the slots from the first difference on are re-read
(:class:`~megacontext.runtime.reader.KVReader`). Focus work therefore stays off the per-token path: it costs one
policy + allocator step per k tokens, amortised.

Invariants
- Greedy tokens are identical with and without cache reuse (tested), and identical to the base model's own
  greedy decoding when the budget holds the whole history (tested).
- Each generated token is appended before the next is decoded, so the memory is the transcript.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from megacontext.runtime.reader import KVReader, NeedFullRead, materialize_suffix, tiling_keys
from megacontext.runtime.sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)


def generate(e, prompt_ids, sampling: SamplingConfig | None = None) -> Iterator[int]:
    """See :meth:`megacontext.runtime.engine.Engine.generate` (``e`` is the engine)."""
    cfg = sampling or SamplingConfig()
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    e.ingest(prompt, phase="generate")
    if prompt.numel():
        e.focus_on(prompt)
    elif e._stale and e.num_tokens:
        e.settle("generate")
    if e.num_tokens == 0:
        raise ValueError("generate() needs a non-empty prompt or memory to condition on")
    stop = set(cfg.stop_tokens)
    eos = getattr(e.base.tokenizer, "eos_token_id", None) if e.base.tokenizer is not None else None
    if eos is not None:
        stop.add(int(eos))
    sampler = Sampler(cfg, e.base.device)
    mode = e.cfg.fast_decode
    if mode == "auto":
        mode = "compiled" if e.base.device.type == "cuda" else "off"
    static_len = e.cfg.wc.w_max + e.cfg.k if mode in ("static", "compiled") else 0  # the WC plus one window
    reader = KVReader(e.base, reuse=e.cfg.cache_reuse, static_len=static_len, compile_decode=mode == "compiled")
    logits = _logits(e, reader, changed=True)
    for i in range(cfg.max_new_tokens):
        tok = int(sampler(logits))
        n = e.num_tokens
        e._append(torch.tensor([tok]))
        changed = e._sync(n + 1)
        if e.num_tokens % e.cfg.k == 0:
            before = (e.wc.levels, e.wc.indices)
            e.refocus("generate")
            changed = changed or not (torch.equal(before[0], e.wc.levels) and torch.equal(before[1], e.wc.indices))
        yield tok
        if tok in stop or i == cfg.max_new_tokens - 1:
            break
        logits = _logits(e, reader, changed=changed, new_token=tok)


@torch.no_grad()
def _logits(e, reader: KVReader, changed: bool, new_token: int | None = None) -> Tensor:
    """Next-token logits [V] for the current WC. ``changed=False`` promises that the WC only grew by
    ``new_token`` since the last call, which allows the one-slot decode step."""
    if e.cfg.cache_reuse and not changed and reader.cache is not None and new_token is not None:
        n = e.num_tokens
        pos = n - 1 if e.cfg.wc.position_mode == "absolute" else reader.keys.shape[0]
        try:
            with e.timer.stage("decode"):
                out = reader.decode(new_token, pos, n - 1)
            e.read_stats["slots_read"] += 1
            e.read_stats["slots_reused"] += reader.keys.shape[0] - 1
            return out
        except NeedFullRead:  # the fast path gave up (logged once): re-read through the dynamic cache
            pass
    with e.timer.stage("prefill"):
        keys = tiling_keys(e.wc.levels, e.wc.indices, e.num_tokens)
        if keys.shape[0] > e.cfg.wc.w_max:
            raise AssertionError(f"working context of {keys.shape[0]} slots > w_max={e.cfg.wc.w_max}")
        p = reader.reusable(keys, 1)  # re-read >= 1 slot for the logits
        emb, pos = materialize_suffix(e.wc, e.view, e.base.embed, p)  # only the slots from the first change on
        try:
            out = reader.read(emb, pos, keys, p, 1)[-1]
        except NeedFullRead:
            p = 0
            emb, pos = materialize_suffix(e.wc, e.view, e.base.embed, 0)
            out = reader.read(emb, pos, keys, 0, 1)[-1]
        e.read_stats["slots_read"] += keys.shape[0] - p
        e.read_stats["slots_reused"] += p
        return out
