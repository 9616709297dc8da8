"""The graph contract every backend implements (PyTorch reference, ONNX Runtime, TensorRT,
llama.cpp), in numpy at the boundary so the Pipeline is the same over all of them:

  vision:  pixel_values [N_tiles, 3, H, W] (+ pixel_attention_mask [N_tiles, H, W]) -> [N_tiles, T, D]
  embed:   input_ids [B, S] int64 -> inputs_embeds [B, S, D]
  decoder: inputs_embeds [B, S, D], attention_mask [B, past+S], position_ids [B, S], cache
           -> logits of the last position [B, V]; the cache grows by S in place.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class KVCache(Protocol):
    @property
    def length(self) -> int:
        """Number of positions already in the cache."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None) -> np.ndarray: ...

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray: ...

    def new_cache(self, batch_size: int) -> KVCache: ...

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               cache: KVCache) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        """What really runs: device, providers, threads, precision."""

# Optional: `decode_ids(input_ids [1, S], position_ids [1, S], cache) -> logits [1, V]`, for text tokens
# of a batch-1 generation, where the backend looks embeddings up itself (Pipeline.decode_step uses it).
# Optional: `thread_safe` (True: the Pipeline lets generations run at once; else it serialises them
# under `generation_lock` where the backend has one), `cache_capacity` ((sequences, positions) one
# cache holds over all rows: generate_batch answers row by row beyond it) and `n_ctx` (positions the
# backend holds, when fewer than the model's context window).
