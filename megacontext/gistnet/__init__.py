"""GistNet: the 32 -> 1 compressor, its substitution helpers and its training loop."""
