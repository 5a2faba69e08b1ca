"""GistNet: the 32 -> 1 compressor (:mod:`.model`, :mod:`.levels`), its objective and training loop
(:mod:`.objective`, :mod:`.train`, :mod:`.windows`), substitution helpers (:mod:`.substitute`), the tree-facing
compressor (:mod:`.compressor`) and its evaluation (:mod:`.eval`)."""
