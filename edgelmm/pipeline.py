"""The generate loop, the same over every backend: build the prompt, preprocess and encode the
images, merge image features into the token embeddings, prefill, then decode with the KV cache
and sample. Backends only run graphs; the behaviour lives here, so parity compares like with like."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import PromptError
from .families import Family, VisionInputs
from .images import ImageInput, load_image
from .modelfiles import ModelFiles
from .prompt import MARKERS, VIDEO_MARKER, PromptInput, messages_as_plain_text, parse_prompt, render_chat
from .runtimes.base import Backend, capabilities_of
from .video import Video, VideoFrames, load_video


@dataclass
class PreparedPrompt:
    text: str                      # the prompt after templating, before image-token expansion
    input_ids: np.ndarray          # [S] int64, image tokens expanded
    vision: VisionInputs
    expanded: str = ""             # the text that was tokenized (image markers expanded)
    add_special: bool = True       # whether the tokenizer added BOS itself
    positions: np.ndarray | None = None  # [position_dims, S] (Family.positions); None: 0..S-1


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False       # generate max_new_tokens whatever comes (load tests, benchmarks)

    def validate(self) -> None:
        from .options import check_int, check_number

        check_int("max_new_tokens", self.max_new_tokens, 1, error=PromptError)
        check_number("temperature", self.temperature, 0, error=PromptError)  # NaN and inf refused too
        check_number("top_p", self.top_p, 0, 1, lo_open=True, error=PromptError)
        if self.seed is not None:  # numpy's default_rng takes only non-negative seeds
            check_int("seed", self.seed, 0, error=PromptError)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str             # "stop" (an EOS token) or "length"
    timings_ms: dict[str, float] = field(default_factory=dict)


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (np.cumsum(sorted_p) - sorted_p) < params.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def left_pad(rows: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[S_i, D] embedding rows -> a left-padded batch: embeds [B, S, D], attention mask [B, S] and
    position ids that count each row's own tokens from 0 (pads sit at position 0, masked). With
    each row's [P, S_i] `positions` (M-RoPE), those left-padded instead: [P, B, S]."""
    width = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), width, rows[0].shape[-1]), np.float32)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        embeds[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    if positions is None:
        return embeds, mask, np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    padded = np.zeros((positions[0].shape[0], len(rows), width), np.int64)
    for i, p in enumerate(positions):
        padded[:, i, width - p.shape[1]:] = p
    return embeds, mask, padded


class Pipeline:
    def __init__(self, files: ModelFiles, family: Family, backend: Backend, selection: dict | None = None,
                 precision_reason: str | None = None):
        self.files = files
        self.selection = selection  # backend="auto": what was chosen and what was passed over, and why
        self.precision_reason = precision_reason  # a bundle's artifact set: asked for, or why auto took it
        self.family = family
        self.backend = backend
        self.tokenizer = files.tokenizer
        self.eos_ids = set(files.eos_token_ids)
        # The model's context window, or less where the backend holds fewer positions (a llama.cpp
        # context or TensorRT profile sized to what was asked).
        self.context_length = min(files.context_length, getattr(backend, "n_ctx", None) or files.context_length)
        self._bos = files.special_token("bos_token")
        # A backend that is not thread-safe (llama.cpp: one context, one KV cache) runs one
        # generation at a time: a second thread's generate waits for the first to finish. The lock
        # is the backend's own where it has one, so Pipelines sharing a backend share the lock.
        self._exclusive = (nullcontext() if capabilities_of(backend).thread_safe
                           else getattr(backend, "generation_lock", None) or threading.RLock())

    # ---- prompt ----
    def prepare(self, prompt: PromptInput, images: Sequence[ImageInput | Video] | None = None,
                chat: bool = True) -> PreparedPrompt:
        """The prompt's token ids, positions and preprocessed media. `images` holds the images (and, for
        a model that reads videos, the `Video`s) of the prompt's markers, in their order."""
        parsed = parse_prompt(prompt, videos=self.family.reads_videos)
        if parsed.inline_images and images:
            raise PromptError("images were given both inside the messages and as images=; use one or the other")
        sources = list(parsed.inline_images or images or [])
        self._check_media_fits_markers(parsed, sources)
        videos = parsed.media_kinds.count("video")
        template = self.files.chat_template if chat else None
        if template:
            text = render_chat(template, parsed.messages, self.files.special_tokens_map)
            kept = self.family.count_image_markers(text)
            if kept != len(sources) - videos:
                raise PromptError(f"the chat template kept {kept} of {len(sources) - videos} image markers")
            if videos and self.family.count_video_markers(text) != videos:
                raise PromptError(f"the chat template kept {self.family.count_video_markers(text)} of {videos} "
                                  "video markers")
        else:
            text = messages_as_plain_text(parsed.messages)
        vision = self.family.preprocess_media(self._load_media(sources))
        expanded = self.family.expand_prompt(text, vision)
        # As HF's apply_chat_template: a template that writes BOS itself gets no second one.
        add_special = not (self._bos and expanded.startswith(self._bos))
        ids = np.asarray(self.tokenizer.encode(expanded, add_special_tokens=add_special).ids, dtype=np.int64)
        self._check_media_tokens(ids, vision, len(sources), videos)
        positions = self.family.positions(ids, vision) if self.family.position_dims > 1 else None
        return PreparedPrompt(text=text, input_ids=ids, vision=vision, expanded=expanded, add_special=add_special,
                              positions=positions)

    def _check_media_fits_markers(self, parsed, sources: list) -> None:
        """As many images and videos as the prompt has markers, each of the kind its marker asks for,
        and videos only for a model that reads them."""
        videos = parsed.media_kinds.count("video")
        if videos and not self.family.reads_videos:
            raise PromptError(f"the prompt has {videos} {VIDEO_MARKER} marker(s), and {self.family.name} models "
                              "read images only")
        given = sum(isinstance(s, Video) for s in sources)
        if given and not self.family.reads_videos:
            raise PromptError(f"a Video was given, and {self.family.name} models read images only")
        if parsed.n_image_parts != len(sources):
            what = f"{len(sources)} image(s)" if not given else f"{len(sources) - given} image(s) and {given} video(s)"
            raise PromptError(f"the prompt has {parsed.describe_markers()} but {what} were given")
        for i, (kind, src) in enumerate(zip(parsed.media_kinds, sources)):
            if (kind == "video") != isinstance(src, Video):
                raise PromptError(f"marker {i + 1} of the prompt is {MARKERS[kind]} but item {i + 1} of its media "
                                  f"is {'a Video' if isinstance(src, Video) else 'an image'}")

    def _load_media(self, sources: list) -> list:
        """Images as arrays and videos as VideoFrames; a clip too long for the context is refused from
        its frame count and size, before its frames are resized (in float32 they can be gigabytes)."""
        numbers = np.cumsum([isinstance(s, Video) for s in sources])  # each video's number among the videos
        media = [load_video(s, i, int(numbers[i])) if isinstance(s, Video) else load_image(s, index=i)
                 for i, s in enumerate(sources)]
        counts = {m.label: self.family.video_tokens(m) for m in media if isinstance(m, VideoFrames)}
        if sum(counts.values()) >= self.context_length:
            each = ", ".join(f"{label} {n}" for label, n in counts.items())
            raise PromptError(f"the prompt's videos are {sum(counts.values())} tokens ({each}) but the model's "
                              f"context window is {self.context_length}: give fewer or smaller frames")
        return media

    def _check_media_tokens(self, ids: np.ndarray, vision: VisionInputs, n_media: int, videos: int) -> None:
        """The tokenized prompt holds exactly its media's tokens (no stray image or video tokens typed
        into the text) and fits the context window."""
        tokens = [self.family.image_token] + ([self.family.video_token] if self.family.reads_videos else [])
        for token, token_id in zip(tokens, self.family.media_token_ids):
            found = int((ids == token_id).sum())
            expected = sum(r.count(token) for r in vision.replacements)
            if found != expected:
                raise PromptError(f"prompt text contains {found - expected:+d} stray {token!r} tokens beyond the "
                                  f"{n_media} image(s)" + (" and video(s)" if videos else ""))
        if len(ids) >= self.context_length:
            media_tokens = int(np.isin(ids, self.family.media_token_ids).sum())
            raise PromptError(f"the prompt is {len(ids)} tokens ({media_tokens} of them image"
                              f"{' and video' if videos else ''} tokens) but the model's context window is "
                              f"{self.context_length}")

    def prompt_positions(self, prepared: PreparedPrompt) -> np.ndarray:
        """[P, S] position ids of the prompt's tokens (P = the family's position_dims)."""
        if prepared.positions is not None:
            return prepared.positions
        return np.arange(len(prepared.input_ids), dtype=np.int64)[None]

    def as_position_ids(self, positions: np.ndarray) -> np.ndarray:
        """[P, B, S] -> the decoder's position_ids: [B, S] for 1-D positions, [3, B, S] for M-RoPE."""
        return positions[0] if self.family.position_dims == 1 else positions

    # ---- graphs ----
    def image_features(self, vision: VisionInputs) -> np.ndarray:
        """[N_tiles, T, D] features of all tiles of the prompt's images (empty when no image). Where
        images keep their own sizes, each size is one graph run however the sizes alternate in the
        prompt (in-context examples: A B A B is two runs, not four), the rows put back in prompt order,
        and they come back as one [1, rows, D] array when their token counts differ."""
        if vision.num_images == 0:
            return np.zeros((0, 0, 0), np.float32)
        if isinstance(vision.pixel_values, np.ndarray):  # one size (masks, if any, go with it)
            return self.backend.encode_images(vision.pixel_values, vision.pixel_attention_mask)
        items = vision.pixel_values
        by_size: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            by_size.setdefault(item.shape[1:], []).append(i)
        rows: list[np.ndarray] = [np.empty(0)] * len(items)
        for members in by_size.values():
            out = self.backend.encode_images(np.concatenate([items[i] for i in members]), None)
            start = 0
            for i in members:
                rows[i], start = out[start:start + len(items[i])], start + len(items[i])
        if len({r.shape[1] for r in rows}) == 1:
            return np.concatenate(rows)
        return np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])[None]

    def merged_embeddings(self, prepared: PreparedPrompt, features: np.ndarray | None = None) -> np.ndarray:
        embeds = self.backend.embed_tokens(prepared.input_ids[None, :])
        if prepared.vision.num_images:
            feats = self.image_features(prepared.vision) if features is None else features
            flat = feats.reshape(-1, feats.shape[-1])
            # Images and videos in prompt order, as their features come back.
            slots = np.isin(prepared.input_ids, self.family.media_token_ids)
            if int(slots.sum()) != flat.shape[0]:
                raise PromptError(f"{int(slots.sum())} image tokens in the prompt but the vision graph "
                                  f"returned {flat.shape[0]} feature rows")
            embeds[0, slots] = flat.astype(embeds.dtype)
        return embeds

    # ---- generation ----
    def stream_tokens(self, prepared: PreparedPrompt, params: SamplingParams,
                      timings: dict[str, float] | None = None, features: np.ndarray | None = None) -> Iterator[int]:
        """Generate token ids; `features` reuses image features already computed for this prompt.
        On a backend that is not thread-safe, holds the pipeline's lock until the generator ends."""
        params.validate()
        with self._exclusive:
            yield from self._stream_tokens(prepared, params, {} if timings is None else timings, features)

    def _stream_tokens(self, prepared: PreparedPrompt, params: SamplingParams, timings: dict[str, float],
                       features: np.ndarray | None) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        t0 = time.perf_counter()
        feats = features
        if feats is None and prepared.vision.num_images:
            feats = self.image_features(prepared.vision)
        t1 = time.perf_counter()
        embeds = self.merged_embeddings(prepared, feats)
        n = embeds.shape[1]
        budget = min(params.max_new_tokens, self.context_length - n)
        positions = self.prompt_positions(prepared)
        cache = self.backend.new_cache(1)
        logits = self.backend.decode(embeds, np.ones((1, n), np.int64), self.as_position_ids(positions[:, None]), cache)
        after = int(positions.max()) + 1 if n else 0
        t2 = time.perf_counter()
        timings.update(vision_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3, decode_ms=0.0)
        ends = () if params.ignore_eos else self.eos_ids
        greedy = params.temperature <= 0
        token = sample_token(logits[0], params, rng)
        for i in range(budget):
            yield token
            if token in ends or i == budget - 1:
                break
            t = time.perf_counter()
            token = self.greedy_step(token, after + i, cache) if greedy else \
                sample_token(self.decode_step(token, after + i, cache)[0], params, rng)
            timings["decode_ms"] += (time.perf_counter() - t) * 1e3

    def greedy_from_embeddings(self, embeds: np.ndarray, max_new_tokens: int,
                               positions: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
        """Prefill `embeds` [1, n, D] (at `positions` [P, n], default 0..n-1) and decode greedily:
        (the prefill's logits [1, V], generated ids). The steps of stream_tokens (decode_step, EOS,
        context budget), keeping the prefill's logits: verify judges both from one prefill instead
        of running it twice."""
        n = embeds.shape[1]
        if positions is None:  # text positions: every component the token's index
            positions = np.repeat(np.arange(n, dtype=np.int64)[None], self.family.position_dims, axis=0)
        budget = min(max_new_tokens, self.context_length - n)
        after = int(positions.max()) + 1 if n else 0
        with self._exclusive:
            cache = self.backend.new_cache(1)
            logits = self.backend.decode(embeds, np.ones((1, n), np.int64), self.as_position_ids(positions[:, None]),
                                         cache)
            tokens = [int(np.argmax(logits[0]))] if budget > 0 else []
            for i in range(1, budget):
                if tokens[-1] in self.eos_ids:
                    break
                tokens.append(self.greedy_step(tokens[-1], after + i - 1, cache))
        return logits, tokens

    def decode_step(self, token: int, position: int, cache) -> np.ndarray:
        """One generated token (batch 1) at `position` through the decoder -> logits [1, V]. A
        backend that takes token ids itself (`decode_ids`: llama.cpp looks the row up inside its
        graph) skips the host-side embedding lookup, which on a small model costs a third of a step."""
        ids = np.array([[token]], np.int64)
        pos = self.as_position_ids(np.full((self.family.position_dims, 1, 1), position, np.int64))
        by_id = self.backend.decode_ids if capabilities_of(self.backend).decode_ids else None
        if by_id is not None:
            return by_id(ids, pos, cache)
        # The mask covers the cache; with M-RoPE a token's position is not its index in the cache.
        return self.backend.decode(self.backend.embed_tokens(ids), np.ones((1, cache.length + 1), np.int64), pos,
                                   cache)

    def greedy_step(self, token: int, position: int, cache) -> int:
        """decode_step's greedy choice. A backend that takes the argmax where its logits are
        (`greedy_ids`: ONNX Runtime's fused decoder) sends back one id instead of the logits."""
        if capabilities_of(self.backend).greedy_ids and not capabilities_of(self.backend).decode_ids:
            ids = np.array([[token]], np.int64)
            pos = self.as_position_ids(np.full((self.family.position_dims, 1, 1), position, np.int64))
            return int(self.backend.decode_greedy(self.backend.embed_tokens(ids), np.ones((1, cache.length + 1), np.int64),
                                                  pos, cache)[0])
        return int(np.argmax(self.decode_step(token, position, cache)[0]))

    def generate_batch(self, requests: Sequence[tuple[PromptInput, Sequence[ImageInput] | None]], *,
                       chat: bool = True, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None) -> list[Generation]:
        """Answer several (prompt, images) requests in one batch (stream_batch): each answer is the one
        the request gets alone. Row i samples with seed + i."""
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        params.validate()
        if isinstance(requests, (str, bytes, dict)) or not hasattr(requests, "__iter__"):
            raise PromptError(f"requests must be a list of (prompt, images) pairs, got {type(requests).__name__}")
        requests = list(requests)
        if not requests:
            return []
        for i, request in enumerate(requests):  # a bare prompt or a triple would fail to unpack, untyped
            if isinstance(request, (str, bytes, dict)) or not isinstance(request, Sequence) or len(request) != 2:
                size = f" of {len(request)}" if isinstance(request, Sequence) and not isinstance(request, str) else ""
                raise PromptError(f"request {i} must be a (prompt, images) pair, got {type(request).__name__}{size}")
        prepared = [self.prepare(prompt, images, chat=chat) for prompt, images in requests]
        row_params = [replace(params, seed=None if seed is None else seed + i) for i in range(len(prepared))]
        outputs: list[list[int]] = [[] for _ in prepared]
        t0 = time.perf_counter()
        for row, token in self.stream_batch(prepared, row_params):
            outputs[row].append(token)
        elapsed = (time.perf_counter() - t0) * 1e3
        return [Generation(self.decode_text(ids), ids, len(p.input_ids),
                           "stop" if ids and ids[-1] in self.eos_ids else "length", {"batch_ms": elapsed})
                for ids, p in zip(outputs, prepared)]

    def stream_batch(self, prepared: Sequence[PreparedPrompt], params: Sequence[SamplingParams],
                     stop: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int]]:
        """Generate for several prompts at once, each with its own sampling parameters, yielding
        (row, token) a decode step at a time. A row ends at an EOS token, at its max_new_tokens or
        the context's end, or once `stop(row)` is true (a cancelled request, a stop string: the
        caller decides); the batch ends when every row has. Each row gets the tokens stream_tokens
        gives it alone: prompts are left-padded to the longest, each row's positions count its own
        tokens, each samples with its own generator, and a row that has ended only rides along
        (its tokens are dropped). Where one cache cannot hold the rows together (llama.cpp shares
        one context between its sequences), they run one after another."""
        if len(prepared) != len(params) or not prepared:
            raise PromptError(f"stream_batch needs one SamplingParams per prompt, got {len(params)} for {len(prepared)}")
        for p in params:
            p.validate()
        stop = stop or (lambda row: False)
        lengths = [len(p.input_ids) for p in prepared]
        budgets = [min(p.max_new_tokens, self.context_length - n) for p, n in zip(params, lengths)]
        with self._exclusive:
            together = (len(prepared) > 1 and max(lengths) + max(budgets) <= self.context_length
                        and self._fits_one_cache(lengths, max(budgets)))
            if together:
                yield from self._batch_steps(list(prepared), list(params), budgets, stop)
                return
            for row, (one, p) in enumerate(zip(prepared, params)):
                tokens = self._stream_tokens(one, p, {}, None)
                while not stop(row):
                    token = next(tokens, None)
                    if token is None:
                        break
                    yield row, token
                tokens.close()

    def _fits_one_cache(self, lengths: list[int], budget: int) -> bool:
        """Whether rows of these prompt lengths, each generating `budget` tokens, fit one cache of the
        backend. `cache_capacity` (optional): (sequences, positions over all rows) one cache holds."""
        capacity = getattr(self.backend, "cache_capacity", None)
        if capacity is None:
            return True
        sequences, positions = capacity
        return len(lengths) <= sequences and sum(lengths) + len(lengths) * budget <= positions

    def _batch_steps(self, prepared: list[PreparedPrompt], params: list[SamplingParams], budgets: list[int],
                     stop: Callable[[int], bool]) -> Iterator[tuple[int, int]]:
        embeds, mask, positions = left_pad([self.merged_embeddings(p)[0] for p in prepared],
                                           [self.prompt_positions(p) for p in prepared])
        batch = mask.shape[0]
        after = positions.max(axis=(0, 2)) + 1      # each row's next position (pads are 0)
        positions = self.as_position_ids(positions)
        rngs = [np.random.default_rng(p.seed) for p in params]
        cache = self.backend.new_cache(batch)
        logits = self.backend.decode(embeds, mask, positions, cache)
        # Every row greedy: the steps' ids come from the backend where it takes the argmax itself.
        greedy_ids = capabilities_of(self.backend).greedy_ids and all(p.temperature <= 0 for p in params)
        made = [0] * batch
        done = [stop(i) for i in range(batch)]
        ids = None
        while not all(done):
            if ids is not None:
                tokens = [int(ids[i]) if not done[i] else 0 for i in range(batch)]
            else:
                tokens = [sample_token(logits[i], params[i], rngs[i]) if not done[i] else 0 for i in range(batch)]
            for i, token in enumerate(tokens):
                if done[i]:
                    continue
                yield i, token
                made[i] += 1
                done[i] = (token in self.eos_ids and not params[i].ignore_eos) or made[i] >= budgets[i] or stop(i)
            done = [d or stop(i) for i, d in enumerate(done)]
            if all(done):
                break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = self.as_position_ids(np.tile(after[None, :, None], (self.family.position_dims, 1, 1)))
            after = after + 1
            step = (self.backend.embed_tokens(np.asarray(tokens, np.int64)[:, None]), mask, positions, cache)
            if greedy_ids:
                ids = self.backend.decode_greedy(*step)
            else:
                logits = self.backend.decode(*step)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt: PromptInput, images: Sequence[ImageInput] | None = None, *, chat: bool = True,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        prepared = self.prepare(prompt, images, chat=chat)
        params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        timings: dict[str, float] = {}
        ids = list(self.stream_tokens(prepared, params, timings))
        finish = "stop" if ids and ids[-1] in self.eos_ids else "length"
        return Generation(self.decode_text(ids), ids, len(prepared.input_ids), finish, timings)

    def stream(self, prompt: PromptInput, images: Sequence[ImageInput] | None = None, *, chat: bool = True,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (whole characters only)."""
        prepared = self.prepare(prompt, images, chat=chat)
        ids: list[int] = []
        shown = ""
        for token in self.stream_tokens(prepared, SamplingParams(max_new_tokens, temperature, top_p, seed)):
            ids.append(token)
            text = self.decode_text(ids)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
            shown = text

    def describe(self) -> dict[str, Any]:
        out = {**self.family.describe(), **self.backend.describe(), "model": str(self.files.root),
               "context_length": self.context_length}
        if self.selection:
            out["selection"] = self.selection
        if self.precision_reason:
            out["precision_reason"] = self.precision_reason
        return out
