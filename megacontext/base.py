"""Frozen base-model adapter: any Hugging Face causal LM, driven only through its public arguments.

Invariants
- The wrapped model is in ``eval()`` mode and every parameter has ``requires_grad=False``; gradients can
  still flow *through* it (into GistNet/LensNet) because we never wrap calls in ``no_grad`` here.
- Only ``inputs_embeds``, ``position_ids``, ``attention_mask`` and ``past_key_values`` are used, so any
  architecture whose forward accepts them works; nothing reads the stand-in model's sizes.
- ``fingerprint`` identifies the weights independently of device and load dtype (sampled values are
  rounded to bf16 before hashing), so gists made on a bf16 GPU are accepted by an fp32 CPU load of the
  same checkpoint and refused for any other model.

Model families (checked once, when the adapter is built):
- State-space and recurrent models (Mamba, RWKV, RecurrentGemma, hybrids such as Jamba) are refused: the
  engine crops a KV cache to a common prefix and places slots at chosen positions, which a recurrent state
  cannot do.
- A learned absolute position table (GPT-2/GPT-Neo ``wpe``, OPT ``embed_positions``, ...) is detected;
  ``position_limit`` is its size. Such a model cannot read positions past its table, so the API runs it in
  compact positions (slots numbered 0..T-1) and refuses a budget that would read more than the table holds.
- A model whose forward takes no ``position_ids`` (BLOOM, MPT: ALiBi; Falcon with ``alibi``) is warned about:
  positions come from slot order, so gists cannot sit at their span centres (compact positions are what it
  gets, and what the API records). ``position_ids`` are then not passed at all.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.assets import resolve
from megacontext.core.device import log_placement, select_device, select_dtype

log = logging.getLogger(__name__)

_FINGERPRINT_SAMPLES = 4096  # values hashed per tensor: cheap for 3B models, sensitive to any retrain
# model types whose layers keep a recurrent state instead of (or besides) a croppable KV cache
_STATE_SPACE_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "jamba", "bamba", "zamba", "zamba2", "falcon_h1",
    "nemotron_h", "granitemoehybrid", "lfm2", "xlstm", "plamo2", "qwen3_next", "minimax", "lfm2_moe",
})
_STATE_SPACE_MODULES = re.compile(r"Mamba|Rwkv|RecurrentBlock|Rglru|SSM|Mixer2", re.IGNORECASE)
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings", "pos_embed", "embed_pos", "wpe_embedding")


class BaseModelError(ValueError):
    """A base model could not be loaded or does not support what MegaContext needs."""


@dataclass
class BaseOutput:
    logits: Tensor  # [B, T', V] (T' = T, or the kept tail when logits_to_keep is set)
    hidden_states: tuple[Tensor, ...] | None = None  # each [B, T, d]
    past_key_values: object | None = None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Stable short hash of a model's weights: names, shapes and evenly spaced values (as bf16)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, p in sorted(model.state_dict().items()):
        if p.data_ptr() in seen and p.numel() > 0:  # tied weights count once
            continue
        seen.add(p.data_ptr())
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        if flat.numel() > _FINGERPRINT_SAMPLES:
            idx = torch.linspace(0, flat.numel() - 1, _FINGERPRINT_SAMPLES, device=flat.device).long()
            flat = flat[idx]
        if flat.is_floating_point():
            flat = flat.to(torch.bfloat16).view(torch.int16)
        h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def state_space_kind(model: torch.nn.Module) -> str | None:
    """The model type (or recurrent module class) that makes ``model`` a state-space/recurrent model, else None."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type in _STATE_SPACE_TYPES:
        return model_type
    for m in model.modules():
        if _STATE_SPACE_MODULES.search(type(m).__name__):
            return type(m).__name__
    return None


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """Positions a learned absolute position table holds (GPT-2 ``wpe``, OPT ``embed_positions``), else None."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            table = int(m.num_embeddings) - int(getattr(m, "offset", 0))  # OPT keeps 2 extra rows
            cfg = getattr(model, "config", None)
            declared = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
            return min(table, int(declared)) if isinstance(declared, int) and declared > 0 else table
    return None


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class FrozenBase:
    """A frozen causal LM seen as ``embed`` + ``forward(inputs_embeds, position_ids, ...)``."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, name: str = "in-memory"):
        forward_params = inspect.signature(model.forward).parameters
        kind = state_space_kind(model)
        if kind is not None:
            raise BaseModelError(
                f"base model {name!r} ({type(model).__name__}, {kind}) is a state-space/recurrent model: MegaContext "
                "crops a KV cache and places slots at chosen positions, which needs an attention-based causal LM")
        if "inputs_embeds" not in forward_params:
            raise BaseModelError(
                f"base model {name!r} ({type(model).__name__}) does not accept inputs_embeds; "
                "MegaContext feeds gists as input embeddings and needs that argument"
            )
        if model.get_input_embeddings() is None:
            raise BaseModelError(f"base model {name!r} exposes no input embedding table")
        self._keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in forward_params), None)
        # transformers renamed past_key_values -> cache (5.2x); speak whichever this version accepts
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # a learned absolute position table cannot be read past its size; ALiBi-style models take no positions
        self.position_limit = learned_position_limit(model)
        self.takes_positions = "position_ids" in forward_params and \
            not getattr(getattr(model, "config", None), "alibi", False)
        if not self.takes_positions:
            log.warning("base model %s (%s) takes no position_ids (ALiBi or similar): positions come from slot order, "
                        "so gists cannot sit at their span centres; MegaContext reads it in compact positions",
                        name, type(model).__name__)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.native_window_override: int | None = None
        self.fingerprint = weights_fingerprint(model)
        with torch.no_grad():
            table = model.get_input_embeddings().weight.float()
            self.embed_norm = float(table.norm(dim=-1).mean())  # target norm for gists

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> FrozenBase:
        """Load any HF causal LM from a local directory, an embedded model name (``base-llama-19m-v2``, see
        :mod:`megacontext.core.assets`) or a hub id (hub ids need network or cache)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        name_or_path = resolve(name_or_path)
        looks_local = (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
                       or os.path.exists(name_or_path))
        path = os.path.expanduser(name_or_path)
        if looks_local and not os.path.isdir(path):
            raise BaseModelError(f"base model path {name_or_path!r} does not exist or is not a directory")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise BaseModelError(f"could not load a model config from {name_or_path!r}: {e}") from e
        dev = device if isinstance(device, torch.device) else select_device(device)
        dt = select_dtype(dtype, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except ValueError as e:
            raise BaseModelError(
                f"{name_or_path!r} (model_type={getattr(config, 'model_type', '?')!r}) is not a causal LM "
                f"that AutoModelForCausalLM can load: {e}"
            ) from e
        except OSError as e:
            raise BaseModelError(f"could not load weights from {name_or_path!r}: {e}") from e
        model.to(dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as e:  # a base without tokenizer still works on ids
            log.warning("no tokenizer for %s (%s); token ids only", name_or_path, e)
            tokenizer = None
        log_placement(f"base model {name_or_path}", dev, dt)
        return cls(model, tokenizer, name=name_or_path)

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.model.config

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def native_window(self) -> int:
        """Training context length. ``max_position_embeddings`` is often a RoPE extrapolation limit
        rather than the trained window, so explicit fields win; ``native_window_override`` (set by
        the caller, e.g. from a model card) wins over everything."""
        if self.native_window_override:
            return self.native_window_override
        for key in ("native_window", "original_max_position_embeddings", "n_positions", "max_position_embeddings"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BaseModelError(f"base model {self.name!r} has no tokenizer; pass token ids instead of text")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise BaseModelError(f"base model {self.name!r} has no tokenizer; cannot decode ids")
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ compute
    def embed(self, token_ids: Tensor) -> Tensor:
        """[..., T] int -> [..., T, d] in the model's dtype, on the model's device."""
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values=None, use_cache: bool = False, output_hidden_states: bool = False,
                logits_to_keep: int = 0) -> BaseOutput:
        """inputs_embeds [B, T, d], position_ids [B, T] (or [T]) -> logits [B, T, V].

        ``logits_to_keep=k`` returns only the last k positions' logits (saves the vocab projection)."""
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)
        if attention_mask is None:
            # Always pass a mask: without one, transformers >= 5 reads any position jump (a gist at its span
            # centre, a gap) as the start of a new packed sequence and silently blocks attention across it.
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            attention_mask = torch.ones(inputs_embeds.shape[0], past + inputs_embeds.shape[1],
                                        dtype=torch.long, device=self.device)
        kwargs = {}
        if past_key_values is not None:
            kwargs[self._cache_arg] = past_key_values
        if logits_to_keep and self._keep_arg:
            kwargs[self._keep_arg] = logits_to_keep
        if self.takes_positions:
            kwargs["position_ids"] = position_ids.to(self.device)
        out = self.model(
            inputs_embeds=inputs_embeds.to(self.dtype),
            attention_mask=attention_mask.to(self.device),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = out.logits
        if logits_to_keep and not self._keep_arg:
            logits = logits[:, -logits_to_keep:]
        return BaseOutput(logits=logits, hidden_states=out.hidden_states if output_hidden_states else None,
                          past_key_values=_cache_of(out) if use_cache else None)

    def nll(self, inputs_embeds: Tensor, position_ids: Tensor, targets: Tensor,
            attention_mask: Tensor | None = None) -> Tensor:
        """Per-token NLL (float32) of a horizon that forms the last H input slots.

        inputs_embeds [B, T, d] ends with the embeddings of ``targets`` [B, H]; slot T-H-1+i predicts
        target i, so the first horizon token is conditioned on the whole context. Returns [B, H]."""
        h = targets.shape[-1]
        logits = self.forward(inputs_embeds, position_ids, attention_mask, logits_to_keep=h + 1).logits
        logits = logits[:, -h - 1:-1].float()  # [B, H, V]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1), reduction="none"
        ).view(targets.shape)
