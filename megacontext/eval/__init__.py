"""Evaluation: how well gists substitute for the tokens they replace, with bootstrap intervals.

Layering: eval sits on top (it may import base, gistnet, tree, data); nothing below imports it.
``stats`` is generic (reused by other benchmarks); ``meanpool`` is the untrained baseline compressor;
``gist`` runs the batched substitutability evaluation; ``cramming`` the per-sample optimised upper
bound; ``report`` renders results with their provenance; ``commands`` is the CLI front end.
"""
