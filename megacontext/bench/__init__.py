"""Benchmark harness: compare MegaContext with baseline long-context systems at the same working budget.

Layout (one concept per module):
- :mod:`.system` — the ``System`` interface every contender implements, and ``ContextSystem`` for the
  baselines that only decide *which tokens the base model sees* (a ``Selection``) before each scored chunk;
- :mod:`.scoring` — batched, chunked NLL evaluation of a ``ContextSystem`` over many samples, and the shared
  ``Batcher`` that groups forwards of equal length (token ids or precomputed embeddings);
- MegaContext contenders: :mod:`.megacontext_systems` (gists + working context + focus policy) and
  :mod:`.chunk_contexts` (each chunk's working context built in batched waves, parity-tested with the Engine);
- baseline families: :mod:`.truncation` (full attention, truncation), :mod:`.sinks`, :mod:`.retrieval`
  (BM25), :mod:`.llmlingua_system`;
- :mod:`.registry` — name -> system factory; the registration point for MegaContext systems;
- :mod:`.tasks` (pure generators over token documents) and :mod:`.corpora` (reads prepared text into them);
- :mod:`.flops` (analytic cost), :mod:`.harness` (runs and aggregates), :mod:`.report` (JSON, markdown, PNG),
  the command itself is :mod:`megacontext.cli.bench` (``megacontext bench``).
"""
