"""MegaContext: a virtually unbounded memory for any frozen Hugging Face causal LM.

Dependency order (each layer imports only layers above it):
data -> base -> tree / gistnet -> working_context + allocator -> lensnet -> engine -> api, cli, eval.
"""

__version__ = "0.1.0"
