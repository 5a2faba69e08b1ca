"""MegaContext Tree: the whole history on disk (LOD0 tokens, LOD1/LOD2 gists) and its read API.

- :mod:`~megacontext.tree.format`: level-file header layout and validation.
- :mod:`~megacontext.tree.level_file`: one level file (staged rows, fsync, count publication, memmap reads).
- :mod:`~megacontext.tree.compressor`: the compressor protocol and the mean-pool baseline.
- :mod:`~megacontext.tree.history`: the read API (``HistorySource``) and ``InMemoryHistory``.
- :mod:`~megacontext.tree.store`: ``MegaContextTree``, the append-only crash-safe store.
"""

from megacontext.tree.compressor import Compressor, MeanPoolCompressor
from megacontext.tree.format import TreeFormatError
from megacontext.tree.history import HistorySource, InMemoryHistory
from megacontext.tree.layout import StoreBusyError, StoreMismatchError
from megacontext.tree.store import MegaContextTree, TreeConfig

__all__ = [
    "Compressor", "HistorySource", "InMemoryHistory", "MeanPoolCompressor", "MegaContextTree", "StoreBusyError",
    "StoreMismatchError", "TreeConfig", "TreeFormatError",
]
