"""Foundations every layer may use; imports nothing else of MegaContext.

- :mod:`.config`: typed dataclass configs (YAML, generated CLI flags, validation).
- :mod:`.lod`: LOD geometry: spans, costs, centres and bounds of entries (BLOCK = 32).
- :mod:`.assets`: where the embedded models are found (``$MEGACONTEXT_MODELS``, then the package).
- :mod:`.device`, :mod:`.checkpoint`, :mod:`.layers`, :mod:`.distributed`: placement, safetensors
  checkpoints, shared network blocks, DDP helpers.
- :mod:`.stats`, :mod:`.provenance`: bootstrap intervals and run provenance for every evaluation.
"""
