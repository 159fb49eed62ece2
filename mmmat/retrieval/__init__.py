"""Embedding lookup: a FAISS index of crystal embeddings, searched with a crystal, pattern, image or text.

:class:`EmbeddingIndex` is the index itself (exact or IVF, with its material table); the functions below are
the Python side of ``mmmat embed``, ``mmmat index build``/``add`` and ``mmmat search``.
"""

from mmmat.retrieval.api import (
    add_to_index,
    build_index,
    check_model,
    collect_queries,
    embed_query,
    embed_records,
    embed_shards,
    embedding_matrix,
    load_image,
    load_model,
    material_table,
    model_fingerprint,
    open_index,
    search,
    search_queries,
    shard_records,
)
from mmmat.retrieval.index import (
    DEFAULT_APPROX_THRESHOLD,
    DEFAULT_NPROBE,
    DuplicateIdError,
    EmbeddingIndex,
    Hit,
    RetrievalError,
    default_nlist,
    set_threads,
)

__all__ = [
    "DEFAULT_APPROX_THRESHOLD",
    "DEFAULT_NPROBE",
    "DuplicateIdError",
    "EmbeddingIndex",
    "Hit",
    "RetrievalError",
    "add_to_index",
    "build_index",
    "check_model",
    "collect_queries",
    "default_nlist",
    "embed_query",
    "embed_records",
    "embed_shards",
    "embedding_matrix",
    "load_image",
    "load_model",
    "material_table",
    "model_fingerprint",
    "open_index",
    "search",
    "search_queries",
    "set_threads",
    "shard_records",
]
