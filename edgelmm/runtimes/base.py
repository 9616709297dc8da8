"""The graph contract every backend implements (PyTorch reference, ONNX Runtime, TensorRT,
llama.cpp), in numpy at the boundary so the Pipeline is the same over all of them:

  vision:  pixel_values [N_tiles, 3, H, W] (+ pixel_attention_mask [N_tiles, H, W]) -> [N_tiles, T, D]
  embed:   input_ids [B, S] int64 -> inputs_embeds [B, S, D]
  decoder: inputs_embeds [B, S, D], attention_mask [B, past+S], position_ids [B, S], cache
           -> logits of the last position [B, V]; the cache grows by S in place.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# Optional values: `cache_capacity` ((sequences, positions) one cache holds over all rows:
# generate_batch answers row by row beyond it), `n_ctx` (positions the backend holds, when fewer than
# the model's context window), `generation_lock` (the lock a backend that is not thread-safe shares
# between the Pipelines over it).


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the contract, declared as its class attribute `capabilities`."""
    thread_safe: bool = False    # generations may run at once (else the Pipeline runs one at a time)
    decode_ids: bool = False     # decode_ids(input_ids [1, S], position_ids [1, S], cache) -> logits [1, V]:
                                 # text tokens of a batch-1 generation, embeddings looked up inside
    greedy_ids: bool = False     # decode_greedy(inputs_embeds, attention_mask, position_ids, cache) -> ids [B]:
                                 # decode and each row's argmax, taken where the logits are (on a GPU
                                 # one id per row crosses to the host, not the vocabulary's logits)
    tokenize: bool = False       # tokenize(text, add_special) -> ids: its own tokenizer (verify compares it)
    close: bool = False          # close(): releases what it holds before garbage collection


def capabilities_of(backend) -> Capabilities:
    """A backend's Capabilities; for a backend that declares none (a wrapper, another project's), what
    its attributes show."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    return Capabilities(thread_safe=bool(getattr(backend, "thread_safe", False)),
                        decode_ids=callable(getattr(backend, "decode_ids", None)),
                        greedy_ids=callable(getattr(backend, "decode_greedy", None)),
                        tokenize=callable(getattr(backend, "tokenize", None)),
                        close=callable(getattr(backend, "close", None)))
