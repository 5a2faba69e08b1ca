"""GistNet evaluation: how well gists substitute for the tokens they replace.

- :mod:`.substitution`: the batched substitutability evaluation (raw / gist / drop / mean-pool variants).
- :mod:`.cramming`: the per-sample optimised upper bound (crammed vectors).
- :mod:`.report`: summaries with bootstrap intervals and their markdown rendering.
- :mod:`.run`: ``eval gist`` end to end: windows from token caches -> scores -> report files.
"""
