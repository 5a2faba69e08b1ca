"""The base model's side of a read: a KV cache over the slots it has read, keyed by what each slot holds.

Both ``score`` and ``generate`` read "the working context followed by some raw tokens". Consecutive reads
mostly share a long prefix (the LOD1/LOD2 gists of the old history do not move when one raw block is
collapsed near the end), so :class:`KVReader` keeps the HF cache of its last read plus a key per slot and,
for the next read, crops the cache to the common key prefix and runs the base only over the rest.

Slot keys (int64): a raw token -> its absolute index in the stream; a gist -> ``level * 2^40 + index``.
Equal key prefixes mean equal inputs *and* equal positions: with absolute positions a slot's position is a
function of its key, and with compact positions it is its slot index, which is equal along a common prefix.
So a cropped-and-extended read gives the logits of a full re-read (up to float rounding; tested).

Invariants
- ``keys`` always describes exactly the slots in ``cache`` (same length, same order).
- At least one slot is re-read per call, because the caller needs logits from the suffix.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK
from megacontext.wc import TAIL_SLOT, Materialized, materialize_tiling

log = logging.getLogger(__name__)

GIST_KEY = 1 << 40  # slot keys: raw token -> its absolute index; gist -> level * 2^40 + index


# one StaticCache (per model and size) and one compiled decode step per model, shared by successive readers:
# new buffers or a new compiled wrapper per generate() call would re-capture CUDA graphs (or recompile) each time.
# A reader checks that it still owns the shared cache before it reuses what it holds.
_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {static_len: [cache, owner ref]}
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> torch.compile(model)
_UNSUPPORTED: weakref.WeakSet = weakref.WeakSet()  # models whose fast path failed once: not tried again


def slot_keys(m: Materialized, levels: Tensor, indices: Tensor, num_tokens: int) -> Tensor:
    """What each slot of a materialised WC holds, as an int64 key [T] (see the module doc)."""
    dev = m.slot_entry.device
    t = m.slot_entry.shape[0]
    s = torch.arange(t, device=dev)
    lv = torch.cat([levels.to(dev), levels.new_zeros(1).to(dev)])  # a dummy entry for tail slots
    ix = torch.cat([indices.to(dev), indices.new_zeros(1).to(dev)])
    first = torch.cat([m.entry_first_slot, m.entry_first_slot.new_zeros(1)])
    tail = m.slot_entry == TAIL_SLOT
    e = torch.where(tail, lv.shape[0] - 1, m.slot_entry)
    entry_key = torch.where(lv[e] == 0, ix[e] * BLOCK + (s - first[e]), lv[e] * GIST_KEY + ix[e])
    tail_len = int(tail.sum())
    tail_key = num_tokens - tail_len + (s - (t - tail_len))
    return torch.where(tail, tail_key, entry_key)


def tiling_keys(levels: Tensor, indices: Tensor, num_tokens: int) -> Tensor:
    """The same keys as :func:`slot_keys`, straight from a tiling (no materialisation): [T] int64 on CPU.
    Lets a reader find out how much of its cache still holds before it gathers any gist."""
    lv, ix = levels.cpu().long(), indices.cpu().long()
    width = torch.where(lv == 0, BLOCK, 1)  # [E] slots per entry
    entry = torch.repeat_interleave(torch.arange(lv.shape[0]), width)  # [S] entry of each slot
    first = torch.cumsum(width, 0) - width
    off = torch.arange(entry.shape[0]) - first[entry]
    body = torch.where(lv[entry] == 0, ix[entry] * BLOCK + off, lv[entry] * GIST_KEY + ix[entry])
    tail = torch.arange(num_tokens - num_tokens % BLOCK, num_tokens)
    return torch.cat([body, tail])


def materialize_suffix(wc, source, embed, p: int) -> tuple[Tensor, Tensor]:
    """Slots ``[p, T)`` of a WC: (inputs_embeds [T - p, d], position_ids [T - p]), gathering only the entries
    from the one holding slot ``p`` on (a reader that keeps a cached prefix needs no more)."""
    lv = wc.levels
    width = torch.where(lv == 0, BLOCK, 1)  # [E]
    ends = torch.cumsum(width, 0)
    e0 = int((ends <= p).sum())  # the entry holding slot p (== E when p is in the tail)
    s0 = int(ends[e0 - 1]) if e0 else 0  # its first slot
    m = materialize_tiling(lv[e0:], wc.indices[e0:], wc.num_tokens, source, embed, wc.cfg.position_mode)
    pos = m.position_ids[p - s0:]
    if wc.cfg.position_mode == "compact":
        pos = pos + s0
    return m.inputs_embeds[p - s0:], pos


def common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def rewind_static(cache, keep: int) -> None:
    """Make a static cache hold only its first ``keep`` slots, its buffers keeping their addresses (CUDA graphs
    captured over them stay valid). Version-agnostic, by feature detection: where every layer can ``crop``
    (recent transformers: moves the write position), crop; else (e.g. transformers 5.17, whose ``StaticLayer``
    has no ``crop``) re-prefill: copy the kept prefix out, ``reset()`` the cache and write the prefix back
    through the public ``Cache.update`` (which appends at the write position). Raises NotImplementedError
    where neither applies (sliding-window or non-KV layers), which the reader turns into its logged fallback."""
    held = int(cache.get_seq_length())
    if keep >= held:
        return
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(cache).__name__} exposes no layers to rewind")
    if all(callable(getattr(layer, "crop", None)) for layer in layers):
        cache.crop(keep - held)  # negative = drop that many
        return
    if any(getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None for layer in layers):
        raise NotImplementedError("static cache layers without crop and without plain key/value buffers")
    kept = [(layer.keys[:, :, :keep].clone(), layer.values[:, :, :keep].clone()) for layer in layers] if keep else []
    cache.reset()
    for i, (k, v) in enumerate(kept):
        cache.update(k, v, i)
    if int(cache.get_seq_length()) != keep:
        raise NotImplementedError(f"re-prefilled static cache holds {int(cache.get_seq_length())} slots, not {keep}")


class KVReader:
    """A KV cache over the slots last read, plus their keys [T] (CPU int64).

    ``static_len > 0`` keeps the cache in a preallocated HF ``StaticCache`` of that many slots (rewinding it,
    :func:`rewind_static`, keeps the buffers' addresses), and ``compile_decode`` runs the one-token
    decode step through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Any failure of either (a model
    or a transformers version without the support) logs a warning and falls back to the dynamic cache with one
    full re-read, so results never depend on the fast path being available."""

    def __init__(self, base, reuse: bool = True, static_len: int = 0, compile_decode: bool = False):
        self.base = base
        self.reuse = reuse
        self.static_len = static_len if reuse and base.model not in _UNSUPPORTED else 0
        self.compile_decode = compile_decode and self.static_len > 0
        self.cache = None
        self.keys: Tensor | None = None
        self._step = None  # the compiled model call

    def _owns(self) -> bool:
        """Static cache: whether the shared buffers still hold this reader's slots."""
        slot = _STATIC.get(self.base.model, {}).get(self.static_len)
        return slot is not None and slot[1]() is self

    def reusable(self, keys: Tensor, need: int) -> int:
        """How many leading slots of ``keys`` the cache already holds, leaving >= ``need`` slots to read."""
        if not self.reuse or self.cache is None or self.keys is None or (self.static_len and not self._owns()):
            return 0
        return max(min(common_prefix(self.keys, keys), keys.shape[0] - need), 0)

    def _fallback(self, why: Exception | str) -> None:
        log.warning("static KV cache / compiled decode unavailable (%s); using the dynamic cache", why)
        if self.static_len and self._owns():
            del _STATIC[self.base.model][self.static_len]  # its state is unknown after a failure
        if isinstance(why, Exception):
            _UNSUPPORTED.add(self.base.model)
        self.static_len, self.compile_decode, self._step = 0, False, None
        self.cache, self.keys = None, None

    def _empty(self):
        """An empty cache for a read from slot 0: the static buffers rewound, a new static cache, or None."""
        if not self.static_len:
            return None
        per_model = _STATIC.setdefault(self.base.model, {})
        slot = per_model.get(self.static_len)
        if slot is None:
            from transformers import StaticCache  # here: only the fast path needs it

            slot = per_model[self.static_len] = [StaticCache(config=self.base.model.config,
                                                             max_cache_len=self.static_len), None]
        cache = slot[0]
        rewind_static(cache, 0)  # rewind what the last reader left: the buffers keep their addresses
        slot[1] = weakref.ref(self)
        return cache

    def _mask(self, t: int) -> Tensor | None:
        """Static cache: an all-ones mask over every slot (causality hides the stale and unwritten ones)."""
        return torch.ones(1, self.static_len, dtype=torch.long, device=self.base.device) if self.static_len else None

    def read(self, embeds: Tensor, positions: Tensor, keys: Tensor, p: int, logits_to_keep: int) -> Tensor:
        """Run the base over slots ``[p, T)`` (``embeds`` [T - p, d], ``positions`` [T - p]) after the cached
        prefix of ``p`` slots; ``keys`` [T] describes all T slots. Returns logits [logits_to_keep, V]."""
        if self.static_len and keys.shape[0] > self.static_len:
            self._fallback(f"{keys.shape[0]} slots > static_len={self.static_len}")
            if p:
                raise NeedFullRead()
        if self.static_len:
            try:
                if p == 0:
                    self.cache = self._empty()
                elif p < self.keys.shape[0]:
                    rewind_static(self.cache, p)
                out = self.base.forward(embeds[None], positions[None], attention_mask=self._mask(keys.shape[0]),
                                        past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep)
            except Exception as e:  # noqa: BLE001 - any failure of the optional path falls back
                self._fallback(e)
                raise NeedFullRead() from e
        else:
            if p == 0:
                self.cache = None
            elif p < self.keys.shape[0]:
                self.cache.crop(p - self.keys.shape[0])  # negative = drop that many: same in transformers 4/5
            out = self.base.forward(embeds[None], positions[None], past_key_values=self.cache, use_cache=True,
                                    logits_to_keep=logits_to_keep)
        self.cache = out.past_key_values if self.reuse else None
        self.keys = keys if self.reuse else None
        log.debug("read %d of %d slots (reused %d)", keys.shape[0] - p, keys.shape[0], p)
        return out.logits[0]

    def decode(self, token: int, position: int, key: int) -> Tensor:
        """One cached step: the slot ``key`` holding ``token`` at ``position`` -> next-token logits [V]."""
        if self.static_len and not self._owns():
            raise NeedFullRead()  # another reader used the shared buffers: re-read into them
        if self.static_len and self.keys.shape[0] + 1 > self.static_len:
            self._fallback(f"{self.keys.shape[0] + 1} slots > static_len={self.static_len}")
            raise NeedFullRead()  # the caller re-reads (the dynamic cache takes over)
        emb = self.base.embed(torch.tensor([[token]]))  # [1, 1, d]
        pos = torch.tensor([[position]], device=self.base.device)
        try:
            if self.compile_decode:
                logits = self._compiled(emb, pos)
            else:
                out = self.base.forward(emb, pos, attention_mask=self._mask(0), past_key_values=self.cache,
                                        use_cache=True, logits_to_keep=1)
                self.cache, logits = out.past_key_values, out.logits[0, -1]
        except Exception as e:  # noqa: BLE001 - any failure of the optional path falls back
            if not self.static_len:
                raise
            self._fallback(e)
            raise NeedFullRead() from e
        self.keys = torch.cat([self.keys, torch.tensor([key])])
        return logits

    def _compiled(self, emb: Tensor, pos: Tensor) -> Tensor:
        b = self.base
        if self._step is None:
            if b.model not in _COMPILED:
                _COMPILED[b.model] = torch.compile(b.model, mode="reduce-overhead", dynamic=False)
            self._step = _COMPILED[b.model]
        kw = {b._cache_arg: self.cache, "attention_mask": self._mask(0), "use_cache": True}
        if b._keep_arg:
            kw[b._keep_arg] = 1
        if b.takes_positions:
            kw["position_ids"] = pos
        out = self._step(inputs_embeds=emb.to(b.dtype), **kw)
        return out.logits[0, -1].clone()  # a graph's output buffer is overwritten by the next replay


class NeedFullRead(Exception):
    """The fast path cannot take this step: the caller re-reads every slot through the dynamic cache."""
