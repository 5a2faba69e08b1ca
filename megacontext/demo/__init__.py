"""The README's demo: a generated ship's log with planted facts (:mod:`.input`), recall scoring
(:mod:`.recall`) and the run comparing MegaContext with truncation at the same window (:mod:`.run`)."""
