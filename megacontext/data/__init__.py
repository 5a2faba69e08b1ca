"""Data pipeline: corpus readers -> token cache (memmap + index) -> block-aligned training windows."""

from megacontext.data.corpora import (
    Document,
    read_book_parts,
    read_python_sources,
    read_text_documents,
)
from megacontext.data.qmsum import read_qmsum
from megacontext.data.token_cache import TokenCache, TokenCacheError
from megacontext.data.windows import Batch, Window, WindowConfig, WindowSampler, doc_split

__all__ = [
    "Batch", "Document", "TokenCache", "TokenCacheError", "Window", "WindowConfig", "WindowSampler", "doc_split",
    "read_book_parts", "read_python_sources", "read_qmsum", "read_text_documents",
]
