"""The llama.cpp backend over a bundle's GGUF pair (LLM + mmproj), through llama-cpp-python's
bindings of llama.cpp's C API and its mtmd (multimodal) library.

It runs behind the same graph contract as every other backend, so the Pipeline keeps owning the
prompt (HF tokenizer and chat template), image preprocessing, feature merging and sampling:
  - vision: each preprocessed tile goes to mtmd as one 8-bit bitmap of exactly the model's input
    size, so mtmd neither resizes nor splits it (the tiles came from 8-bit images, so turning the
    normalised floats back into bytes is lossless), and mtmd_encode_chunk returns its features.
  - embed: rows of token_embd.weight read from the GGUF (dequantized on demand).
  - decoder: llama_decode on embedding batches; each batch row is a llama.cpp sequence, left
    padding is simply not fed, and the KV cache lives in the llama.cpp context. M-RoPE models
    (Qwen2-VL's qwen2vl architecture) take the Pipeline's three position components per token
    (llama.cpp's batches carry four, the last unused); llama.cpp's causal mask orders tokens of one
    temporal position by (height, width), which is the prompt order of an image's tokens.
  - Qwen2-VL images keep their own sizes: mtmd's own token budget (8..4096 tokens by default) is
    opened so that it takes each image at the size the Pipeline resized it to.
Because the prompt never goes through llama.cpp's tokenizer, prompt tokens are identical to the
HF tokenizer's by construction; `tokenize` exposes llama.cpp's own tokenizer so verify can report
whether stock llama.cpp (llama-mtmd-cli) would tokenize the same text the same way.

One llama.cpp context holds one KV cache: a new cache (a new generation) supersedes the last one.
So the backend is not thread-safe (`thread_safe = False`): a Pipeline over it runs one generation
at a time, and a batch whose rows do not fit the one context together is answered row by row.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailable, BundleError, EdgeLMMError, ImageError, PromptError
from ..gguf_file import LLM, QWEN_PROJECTORS, TokenEmbeddings, validate_gguf
from ..gguf_names import TEXT_ARCHES
from ..options import check_int, default_threads
from .base import Capabilities

_GGML_TYPE_F32, _GGML_TYPE_F16 = 0, 1
_FLASH_ATTN_DISABLED, _FLASH_ATTN_AUTO = 0, -1
_MTMD_CHUNK_IMAGE = 1
_LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4

# Positions a llama.cpp context holds unless max_context says otherwise (the model's own limit if lower).
DEFAULT_CONTEXT = 8192

_log_tail: deque[str] = deque(maxlen=20)
_log_callback = None  # kept alive for as long as llama.cpp may call it
_backend_ready = False


def quiet_llamacpp() -> None:
    """llama.cpp logs every tensor it loads to stderr; keep only warnings/errors, for error messages.
    Also initialises llama.cpp's backends (once per process)."""
    global _log_callback, _backend_ready
    if _backend_ready:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd_cpp

    @llama_cpp.llama_log_callback
    def on_log(level, text, _user):
        if level >= 3 and text:
            _log_tail.append(text.decode("utf-8", errors="replace").rstrip())

    _log_callback = on_log
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _backend_ready = True


def _recent_log() -> str:
    return " | ".join(list(_log_tail)[-3:]) or "no message from llama.cpp"


def llamacpp_gpu_offload() -> bool:
    """Was llama.cpp built with a GPU backend (CUDA on Jetson/desktop) and is a GPU there?"""
    import llama_cpp

    from .onnxruntime import nvidia_gpu_present

    return bool(llama_cpp.llama_supports_gpu_offload()) and nvidia_gpu_present()


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later), from /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def extra_buffer_types_safe() -> bool:
    """llama_model_params.use_extra_bufts on this CPU. ggml's AMX matmul (an "extra" CPU buffer type
    that takes Q8_0/Q4_K weights on Sapphire Rapids and later) kills the process with SIGSEGV in
    ggml_backend_amx_mul_mat (seen here on every quantized test model; upstream llama.cpp#20824, on
    full-size models too). Without the extra buffer types the same weights run on the AVX-512
    kernels, unrepacked; off even with GPU offload, since layers left on the CPU would take AMX."""
    return not cpu_has_amx()


class LlamaCppCache:
    def __init__(self, generation: int, batch_size: int):
        self.generation = generation
        self.batch_size = batch_size
        self.length = 0


class LlamaCppBackend:
    name = "llamacpp"
    # One context, one KV cache, and llama.cpp asserts (aborts the process) when two threads decode
    # on it: the Pipeline serialises generations on backends that are not thread-safe.
    thread_safe = False
    capabilities = Capabilities(thread_safe=False, decode_ids=True, tokenize=True, close=True)

    def __init__(self, bundle: Bundle, precision: str = "f16", threads: int | None = None,
                 gpu_layers: int | None = None, max_batch: int = 4, context_length: int | None = None):
        try:
            import llama_cpp
            import llama_cpp.mtmd_cpp as mtmd_cpp
        except (ImportError, OSError) as exc:
            raise BackendUnavailable("llama-cpp-python is not installed (pip install 'edgelmm[llamacpp]'; "
                                     f"CMAKE_ARGS='-DGGML_CUDA=on' for a GPU build): {exc}") from None
        self.L, self.M = llama_cpp, mtmd_cpp
        self._model = self._ctx = self._mctx = None
        self._batch = self._token_batch = None
        llm_art, mm_art = bundle.artifact("llm", "gguf", precision), bundle.artifact("mmproj", "gguf", precision)
        llm_path, mm_path = bundle.path(llm_art), bundle.path(mm_art)
        # Checked before llama.cpp opens them: some malformed files abort the process inside C code.
        llm_info = validate_gguf(llm_path, LLM)
        mm_info = validate_gguf(mm_path, "clip")
        quiet_llamacpp()

        self.precision = precision
        self.threads = threads or default_threads() or max(1, (os.cpu_count() or 1))
        offload = llamacpp_gpu_offload()
        self.gpu_layers = (999 if offload else 0) if gpu_layers is None else gpu_layers
        if self.gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            raise BackendUnavailable("gpu_layers > 0 but this llama-cpp-python was built without a GPU backend; "
                                     "reinstall with CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall "
                                     "--no-cache-dir llama-cpp-python")
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = self.gpu_layers
        self.extra_buffer_types = mp.use_extra_bufts = extra_buffer_types_safe()
        # Read the weights, do not map them: on a CPU llama.cpp repacks the k-quant weights into
        # interleaved copies for its GEMM kernels, and a mapped file keeps the pages it read from
        # resident beside them (Mantis-1B q4_k_m: 2.13 GB mapped, 1.69 GB read, the same speed).
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        self._model = llama_cpp.llama_model_load_from_file(str(llm_path).encode(), mp)
        if not self._model:
            raise BundleError(f"llama.cpp could not load this model ({_recent_log()})", path=str(llm_path))

        # llama.cpp allocates the KV cache for the whole context up front: at a model's 131072 tokens
        # that is 4.3 GB of f16 cache for a 0.8 GB 1B model. Take what is asked, by default at most
        # DEFAULT_CONTEXT.
        self.arch = llm_info.architecture
        model_ctx = int(llm_info.metadata[f"{self.arch}.context_length"])
        if context_length is not None:
            check_int("max_context", context_length, 16, model_ctx)
        n_ctx = int(context_length or min(model_ctx, DEFAULT_CONTEXT))
        self.n_batch = min(n_ctx, 512)
        self.max_batch = max_batch
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, self.n_batch, self.n_batch
        cp.n_seq_max, cp.kv_unified = max_batch, True
        cp.n_threads = cp.n_threads_batch = self.threads
        # F32 bundles are parity references: an F32 KV cache and plain attention (the default F16
        # cache alone adds ~3e-3 to the logits); the other types run as llama.cpp users run them.
        exact = precision == "f32"
        cp.type_k = cp.type_v = _GGML_TYPE_F32 if exact else _GGML_TYPE_F16
        cp.flash_attn_type = _FLASH_ATTN_DISABLED if exact else _FLASH_ATTN_AUTO
        cp.embeddings, cp.no_perf = False, True
        self.kv_type = "f32" if exact else "f16"
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise BackendUnavailable(f"llama.cpp could not create a context of {n_ctx} tokens ({_recent_log()})")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx
        # The sequences of a batch share the context's positions (a unified KV cache).
        self.cache_capacity = (max_batch, n_ctx)
        self.generation_lock = threading.RLock()  # taken by every Pipeline over this backend

        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = self.gpu_layers > 0
        mparams.n_threads = self.threads
        mparams.print_timings = False
        mparams.warmup = False
        mparams.flash_attn_type = _FLASH_ATTN_DISABLED if exact else _FLASH_ATTN_AUTO
        if mm_info.metadata["clip.projector_type"] in QWEN_PROJECTORS:
            # Images come already at the processor's size (multiples of the token size): no token
            # budget of mtmd's own may resize them (its default minimum is 8 tokens).
            mparams.image_min_tokens, mparams.image_max_tokens = 1, 1 << 20
        self._mctx = mtmd_cpp.mtmd_init_from_file(str(mm_path).encode(), self._model, mparams)
        if not self._mctx:
            raise BundleError(f"llama.cpp's mtmd could not load this projector ({_recent_log()})", path=str(mm_path))

        meta = mm_info.metadata
        self.image_size = int(meta["clip.vision.image_size"])
        self._mean = np.asarray(meta["clip.vision.image_mean"], np.float32)[:, None, None]
        self._std = np.asarray(meta["clip.vision.image_std"], np.float32)[:, None, None]
        self.embed_rows = TokenEmbeddings(llm_info)
        self.hidden = int(llama_cpp.llama_model_n_embd(self._model))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._init_batches()
        self._generation = 0

    def _init_batches(self) -> None:
        """One embedding batch and one token batch (decode_ids) of n_batch tokens, reused by every call.
        M-RoPE (qwen2vl): an embedding batch carries four positions per token, component-major
        (t..., h..., w..., 0...), where llama_batch_init made room for one: the batch points at a
        buffer of ours while it lives (its own pointer goes back before llama_batch_free)."""
        L = self.L
        self._batch = L.llama_batch_init(self.n_batch, self.hidden, 1)
        self.positions_per_token = 4 if TEXT_ARCHES[self.arch].mrope else 1
        self._pos_buffer = (L.llama_pos * (self.n_batch * self.positions_per_token))()
        # (an address, not the field: a ctypes pointer read from a struct field aliases the field)
        self._batch_pos = ctypes.cast(self._batch.pos, ctypes.c_void_p).value
        self._batch.pos = ctypes.cast(self._pos_buffer, ctypes.POINTER(L.llama_pos))
        self._token_batch = L.llama_batch_init(self.n_batch, 0, 1)

    # ---- vision ----
    def _to_bitmap_bytes(self, tile: np.ndarray, index: int) -> np.ndarray:
        """Normalised float tile [3, H, W] -> the 8-bit HWC image it came from."""
        values = (tile * self._std + self._mean) * 255.0
        u8 = np.clip(np.rint(values), 0, 255)
        if float(np.abs(values - u8).max(initial=0.0)) > 0.05:
            raise ImageError(f"tile {index + 1}: llama.cpp takes 8-bit images, and these pixel values are not a "
                             "normalised 8-bit image (preprocess with the bundle's family)")
        return np.ascontiguousarray(u8.astype(np.uint8).transpose(1, 2, 0))

    def _encode_tile(self, frames: list[np.ndarray], index: int) -> np.ndarray:
        """One tile's features: a single image, or (Qwen2-VL) a video's pair of frames, which mtmd
        merges in time into one image chunk when both bitmaps are marked mergeable."""
        M = self.M
        h, w, _ = frames[0].shape
        datas = [(ctypes.c_uint8 * f.size).from_buffer_copy(f.tobytes()) for f in frames]
        bitmaps = [M.mtmd_bitmap_init(w, h, d) for d in datas]
        chunks = M.mtmd_input_chunks_init()
        try:
            if len(bitmaps) > 1:
                for b in bitmaps:
                    self._set_mergeable(b)
            parts = [M.mtmd_input_part() for _ in bitmaps]
            for part, bitmap in zip(parts, bitmaps):
                part.text, part.bitmap = None, bitmap
            array = (ctypes.POINTER(M.mtmd_input_part) * len(parts))(*(ctypes.pointer(p) for p in parts))
            if M.mtmd_tokenize_from_parts(self._mctx, chunks, array, len(parts), False) != 0:
                raise ImageError(f"tile {index + 1}: mtmd could not take a {w}x{h} image ({_recent_log()})")
            images = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            images = [c for c in images if M.mtmd_input_chunk_get_type(c) == _MTMD_CHUNK_IMAGE]
            # The idefics3 preprocessor always emits an overview and the slices; for a tile of exactly the
            # model's size both are that tile unchanged, so one of them is encoded. A frame pair is one chunk.
            if not 1 <= len(images) <= (1 if len(frames) > 1 else 2):
                raise ImageError(f"tile {index + 1}: mtmd split one {w}x{h} tile into {len(images)} images; the "
                                 "mmproj's preprocessing size should equal its image size")
            n_tokens = M.mtmd_input_chunk_get_n_tokens(images[0])
            if M.mtmd_encode_chunk(self._mctx, images[0]) != 0:
                raise ImageError(f"tile {index + 1}: mtmd failed to encode it ({_recent_log()})")
            out = M.mtmd_get_output_embd(self._mctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * self.hidden,)).reshape(n_tokens, self.hidden).copy()
        finally:
            M.mtmd_input_chunks_free(chunks)
            for b in bitmaps:
                M.mtmd_bitmap_free(b)

    def _set_mergeable(self, bitmap) -> None:
        fn = getattr(self.M, "mtmd_bitmap_set_mergeable", None)
        if fn is None:  # llama-cpp-python before mtmd's video support
            raise BackendUnavailable("this llama-cpp-python has no mtmd_bitmap_set_mergeable: it cannot encode "
                                     "video frame pairs (update llama-cpp-python)")
        fn(bitmap, True)

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        """Tiles [N, 3, H, W], or frame pairs [N, 2, 3, H, W] (Qwen2-VL: an image is a pair of equal
        frames, which mtmd takes as one bitmap; a video's pairs go in as two mergeable bitmaps)."""
        pixels = np.asarray(pixel_values, np.float32)
        feats = []
        for i, tile in enumerate(pixels):
            if pixel_attention_mask is not None:  # padded tiles (Idefics): hand over the real pixels only
                rows, cols = np.nonzero(pixel_attention_mask[i].any(1))[0], np.nonzero(pixel_attention_mask[i].any(0))[0]
                tile = tile[:, : rows.max() + 1, : cols.max() + 1] if rows.size else tile
            frames = list(tile) if tile.ndim == 4 else [tile]
            if all(np.array_equal(frames[0], f) for f in frames[1:]):
                frames = frames[:1]
            feats.append(self._encode_tile([self._to_bitmap_bytes(f, i) for f in frames], i))
        if len({f.shape for f in feats}) > 1:
            raise ImageError(f"tiles gave different token counts {[f.shape[0] for f in feats]}")
        return np.stack(feats) if feats else np.zeros((0, 0, self.hidden), np.float32)

    # ---- text ----
    def embed_tokens(self, input_ids):
        ids = np.asarray(input_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed_rows.tensor.shape[-1]):
            raise PromptError(f"token id {int(ids.max())} is outside the model's vocabulary")
        return self.embed_rows(ids)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's own tokenizer (what stock llama.cpp would feed the model for this text)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:
            buf = (self.L.llama_token * -n)()
            n = self.L.llama_tokenize(self._vocab, raw, len(raw), buf, -n, add_special, True)
        return list(buf[:n])

    # ---- decoder ----
    def new_cache(self, batch_size: int = 1) -> LlamaCppCache:
        if batch_size > self.max_batch:
            raise PromptError(f"batch of {batch_size} but this llama.cpp context holds {self.max_batch} sequences")
        self.L.llama_memory_clear(self._memory, True)
        self._generation += 1
        return LlamaCppCache(self._generation, batch_size)

    def _check_room(self, cache: LlamaCppCache, new_positions: int) -> None:
        """The cache is this context's current one and has room for `new_positions` more."""
        if cache.generation != self._generation:
            raise EdgeLMMError("this KV cache was superseded by a newer one: a llama.cpp context holds one "
                               "cache, so finish one generation before starting the next")
        if cache.length + new_positions > self.n_ctx:
            raise PromptError(f"{cache.length + new_positions} positions exceed the llama.cpp context of {self.n_ctx}")

    def _llama_decode(self, batch) -> None:
        rc = self.L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise PromptError(f"llama_decode failed ({rc}): " + ("no room left in the KV cache" if rc == 1
                                                                  else _recent_log()))

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: LlamaCppCache):
        embeds = np.ascontiguousarray(inputs_embeds, np.float32)
        B, S, D = embeds.shape
        self._check_room(cache, S)
        mask = np.asarray(attention_mask)[:, -S:]
        # Left padding is simply not fed: llama.cpp keeps each row as its own sequence.
        items = [(b, j) for b in range(B) for j in range(S) if mask[b, j]]
        last = {b: j for b, j in items}
        if len(last) != B:
            raise PromptError("a batch row has no unmasked token to decode")
        logits = np.zeros((B, self.n_vocab), np.float32)
        positions = self._positions(position_ids, B, S)
        batch = self._batch
        for start in range(0, len(items), self.n_batch):
            chunk = items[start:start + self.n_batch]
            rows = np.stack([embeds[b, j] for b, j in chunk])
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            pos = np.zeros((self.positions_per_token, len(chunk)), np.int32)
            index = tuple(np.asarray(chunk).T)
            pos[:positions.shape[0]] = positions[(slice(None), *index)]
            ctypes.memmove(self._pos_buffer, pos.ctypes.data, pos.nbytes)
            want = []
            for k, (b, j) in enumerate(chunk):
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = b
                batch.logits[k] = 1 if j == last[b] else 0
                if j == last[b]:
                    want.append((k, b))
            batch.n_tokens = len(chunk)
            self._llama_decode(batch)
            for k, b in want:
                ptr = self.L.llama_get_logits_ith(self._ctx, k)
                logits[b] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        cache.length += S
        return logits

    def _positions(self, position_ids, batch: int, length: int) -> np.ndarray:
        """[P, B, S] positions as this model takes them: P = 1, or 3 (t, h, w) with M-RoPE."""
        pos = np.asarray(position_ids, np.int64)
        want = (3, batch, length) if self.positions_per_token > 1 else (batch, length)
        if pos.shape != want:
            raise PromptError(f"position_ids of shape {list(pos.shape)}; this {self.arch} model takes {list(want)}")
        return pos if pos.ndim == 3 else pos[None]

    def decode_ids(self, input_ids, position_ids, cache: LlamaCppCache):
        """Batch-1 text tokens by id: llama.cpp gathers (and dequantizes) the embedding rows inside
        its graph, as stock llama.cpp does, instead of edgelmm doing it on the host."""
        ids = np.asarray(input_ids, np.int64).reshape(-1)
        self._check_room(cache, ids.size)
        if cache.batch_size != 1 or ids.size > self.n_batch:
            raise PromptError("decode_ids takes one sequence of at most n_batch tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise PromptError(f"token id {int(ids.max())} is outside the model's vocabulary")
        batch = self._token_batch
        # A text token's position components are equal: llama.cpp takes one and repeats it.
        pos = self._positions(position_ids, 1, ids.size)[0].reshape(-1)
        for k, (token, p) in enumerate(zip(ids.tolist(), pos.tolist())):
            batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, p, 1, 0
            batch.seq_id[k][0] = 0
        batch.logits[ids.size - 1] = 1
        batch.n_tokens = int(ids.size)
        self._llama_decode(batch)
        cache.length += int(ids.size)
        ptr = self.L.llama_get_logits_ith(self._ctx, int(ids.size) - 1)
        return np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab)).copy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "architecture": self.arch, "precision": self.precision, "threads": self.threads,
                "gpu_layers": self.gpu_layers, "kv_cache_type": self.kv_type, "n_ctx": self.n_ctx,
                "gpu_offload_built": bool(self.L.llama_supports_gpu_offload()),
                "extra_buffer_types": self.extra_buffer_types,   # off on AMX CPUs: extra_buffer_types_safe
                "llama_cpp_python": getattr(self.L, "__version__", "?")}

    def close(self) -> None:
        if self._batch is not None:
            self._batch.pos = ctypes.cast(self._batch_pos, ctypes.POINTER(self.L.llama_pos))
            self.L.llama_batch_free(self._batch)
            self._batch = None
        if self._token_batch is not None:
            self.L.llama_batch_free(self._token_batch)
            self._token_batch = None
        if self._mctx:
            self.M.mtmd_free(self._mctx)
            self._mctx = None
        if self._ctx:
            self.L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self.L.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may already be gone
            pass


def _write_probe_gguf(path) -> None:
    """A one-layer llama of width 32 with a 8-token vocabulary and fixed weights: small enough to
    write on the fly for `doctor`, real enough that llama.cpp loads and decodes it."""
    import gguf

    rng = np.random.default_rng(0)
    hidden, ffn, heads, vocab = 32, 64, 2, 8
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    t("token_embd.weight", vocab, hidden)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{name}.weight", hidden, hidden)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    t("blk.0.ffn_gate.weight", ffn, hidden)
    t("blk.0.ffn_up.weight", ffn, hidden)
    t("blk.0.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_probe_model(gpu_layers: int = 0) -> tuple[bool, str]:
    """Load a tiny generated GGUF into llama.cpp, decode 4 tokens, check the logits are finite and
    not all equal (for `doctor`: a library that imports may still fail to load or run a model)."""
    import tempfile
    from pathlib import Path

    import llama_cpp

    quiet_llamacpp()
    with tempfile.TemporaryDirectory(prefix="edgelmm-probe-") as tmp:
        path = Path(tmp) / "probe.gguf"
        _write_probe_gguf(path)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers
        mp.use_extra_bufts = extra_buffer_types_safe()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            return False, f"llama.cpp could not load a probe model ({_recent_log()})"
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch, cp.no_perf = 64, 64, 1, 1, True
        ctx = llama_cpp.llama_init_from_model(model, cp)
        try:
            if not ctx:
                return False, f"llama.cpp could not create a context ({_recent_log()})"
            tokens = (llama_cpp.llama_token * 4)(1, 3, 4, 5)
            rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 4))
            if rc != 0:
                return False, f"llama_decode returned {rc} ({_recent_log()})"
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(8,)).copy()
            ok = bool(np.isfinite(logits).all() and np.ptp(logits) > 0)
            where = f"{gpu_layers} layer(s) offloaded" if gpu_layers else "CPU"
            if not mp.use_extra_bufts:
                where += "; AMX CPU: extra buffer types off, llama.cpp#20824"
            return ok, f"loaded and decoded a probe model ({where})" + ("" if ok else f"; bad logits {logits}")
        finally:
            if ctx:
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)


def open_bundle_backend(bundle: Bundle, family, files, request) -> tuple["LlamaCppBackend", str, str]:
    """The registry's opener (runtimes/registry.py): the backend over the bundle's GGUF pair."""
    from ..memory import check_load_budget, kv_cache_bytes
    from .onnxruntime import nvidia_gpu_present
    from .registry import BACKENDS, auto_precision

    precision, why = (request.precision, "asked for") if request.precision != "auto" else \
        auto_precision(bundle, "gguf", BACKENDS["llamacpp"].preference, "smallest GGUF type")
    if request.gpu_layers == 0 or not nvidia_gpu_present():   # on a GPU its own memory is the limit
        # An out-of-range max_context is the backend's OptionError to raise, not a budget question.
        positions = min(request.max_context or DEFAULT_CONTEXT, files.context_length)
        check_load_budget(bundle, "gguf", precision, request.max_memory,
                          kv_cache_bytes(bundle.manifest["text"], positions))
    runtime = LlamaCppBackend(bundle, precision=precision, threads=request.threads, gpu_layers=request.gpu_layers,
                              context_length=request.max_context,
                              **({"max_batch": request.max_batch} if request.max_batch else {}))
    return runtime, precision, why
