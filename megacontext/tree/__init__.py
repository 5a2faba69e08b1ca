"""MegaContext Tree: the whole history on disk (LOD0 tokens, gists of LOD1, LOD2, LOD3, ...) and its read API.

- :mod:`~megacontext.tree.format`: level-file header layout and validation (format 2: checksummed).
- :mod:`~megacontext.tree.checksum`: chunk digests and the ``LODk.sum`` files that hold them.
- :mod:`~megacontext.tree.level_file`: one level file (staged rows, fsync, count publication, verified reads).
- :mod:`~megacontext.tree.layout`: file names, ``meta.json``, the writer lock, cross-file checks.
- :mod:`~megacontext.tree.compressor`: the compressor protocol and the mean-pool baseline.
- :mod:`~megacontext.tree.history`: the read API (``HistorySource``), ``InMemoryHistory``, id checks.
- :mod:`~megacontext.tree.opening`, :mod:`~megacontext.tree.commit`, :mod:`~megacontext.tree.rebuild`: making
  and opening a store's files, one crash-safe commit, recomputing or adding gist levels.
- :mod:`~megacontext.tree.store`: ``MegaContextTree``, the append-only crash-safe store.
- :mod:`~megacontext.tree.integrity`: the full check of a tree (``megacontext fsck``).
"""

from megacontext.tree.compressor import Compressor, MeanPoolCompressor
from megacontext.tree.format import TreeFormatError
from megacontext.tree.history import HistorySource, InMemoryHistory
from megacontext.tree.layout import StoreBusyError, StoreMismatchError
from megacontext.tree.store import CommitFailedError, MegaContextTree, TreeConfig

__all__ = [
    "CommitFailedError", "Compressor", "HistorySource", "InMemoryHistory", "MeanPoolCompressor", "MegaContextTree",
    "StoreBusyError", "StoreMismatchError", "TreeConfig", "TreeFormatError",
]
