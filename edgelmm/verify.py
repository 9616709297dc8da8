"""Parity harness: any backend/precision against the PyTorch reference, on a fixed set of
multi-image prompts. Reports, per graph and end to end: image-feature max |diff| and cosine,
prefill-logit max |diff| and KL divergence, batch-2 (left-padded) logits, greedy token match."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .pipeline import Pipeline, left_pad
from .prompt import IMAGE_MARKER, VIDEO_MARKER
from .runtimes.base import capabilities_of
from .runtimes.registry import BACKENDS, TENSORRT_LIMITS as _TENSORRT_LIMITS

THRESHOLDS: dict[str, dict[str, float]] = {
    # ONNX graph sets
    "fp32": {"vision_max_abs": 1e-4, "vision_cosine_min": 0.9999, "logits_max_abs": 1e-3, "logits_kl_max": 1e-4,
             "decoder_logits_max_abs": 1e-3, "batch2_logits_max_abs": 1e-3, "token_match_min": 1.0},
    # fp16 rounds every activation (~1e-3 relative), so absolute differences scale with the model's
    # logits and are reported, not gated; what must hold is direction, distribution and answers.
    "fp16": {"vision_cosine_min": 0.999, "logits_kl_max": 5e-3, "batch2_logits_kl_max": 5e-3, "token_match_min": 0.95},
    # GGUF types (llama.cpp). ggml's GELU is the tanh approximation (and goes through an fp16 table),
    # so even F32 image features differ from PyTorch's erf GELU by ~1e-2 absolute at cosine > 0.99999;
    # the decoder alone (same input embeddings) must match to 1e-3 with an F32 KV cache.
    "f32": {"vision_cosine_min": 0.999, "decoder_logits_max_abs": 1e-3, "batch2_logits_max_abs": 1e-3,
            "logits_kl_max": 1e-3, "token_match_min": 1.0},
    "f16": {"vision_cosine_min": 0.999, "logits_kl_max": 5e-3, "batch2_logits_kl_max": 5e-3, "token_match_min": 0.95},
    # Quantized LLMs: the mmproj stays F16 (gated); what the LLM's quantization costs is measured and
    # reported here and judged by the calibration quality gate on a trained model, where it means something.
    # Calibrated ONNX precisions: what quantization costs is measured against fp32 on held-out
    # prompts and gated at calibration (`edgelmm calibrate`); here only the vision graph is gated.
    "int8": {"vision_cosine_min": 0.99},
    "int4": {"vision_cosine_min": 0.9999},
    "int8-vision+int4": {"vision_cosine_min": 0.99},
    "q8_0": {"vision_cosine_min": 0.999},
    "q4_k_m": {"vision_cosine_min": 0.999},
}


# TensorRT computes in TF32 or fp16 whatever the graph's precision, so it is judged as fp16; its
# quantized engines on the vision cosine (the table lives with the backends: runtimes/registry.py).
TENSORRT_LIMITS = _TENSORRT_LIMITS


def thresholds_for(candidate: Pipeline, precision: str) -> dict[str, float]:
    """The limits a candidate is judged by: its precision's, unless its runtime computes below it."""
    about = candidate.backend.describe()
    spec = BACKENDS.get(about["backend"])     # the PyTorch reference is judged by its precision
    key = spec.limits(about, precision) if spec else precision
    return THRESHOLDS.get(key, THRESHOLDS["fp32"])


@dataclass
class Case:
    name: str
    prompt: str
    sizes: list[tuple[int, int]]                        # the images', in order
    video: tuple[int, tuple[int, int]] | None = None     # (frames, (H, W)) of the clip at the <video> marker


CASES = [
    Case("1-image", "What is in <image>?", [(48, 64)]),
    Case("2-images", "Compare <image> with <image>. What changed?", [(64, 40), (30, 90)]),
    Case("3-images", "Image 1 <image>, image 2 <image>, image 3 <image>: which one is abnormal?",
         [(72, 72), (50, 33), (40, 56)]),
]
# Models that read videos are also verified on a clip between text and an image (two frame pairs
# whose frames differ: what a backend must merge in time).
VIDEO_CASE = Case("image+video", "Here is <image>. Then <video> What changed?", [(48, 64)], video=(4, (40, 56)))


def cases_for(pipe: Pipeline) -> list[Case]:
    return CASES + ([VIDEO_CASE] if pipe.family.reads_videos else [])


# Image tiles the verify prompts may take, per runtime. Every tile is a full vision-tower pass in the
# reference and again in each candidate, and SmolVLM's processor makes 9-17 tiles of every image
# (78 for the three cases: ~2 s each on two cores, three times over). The first two cases always
# run (one image; two images with their own token counts); later ones while the total stays within.
VERIFY_TILES = 48


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Lowest cosine over feature rows: one bad token should not hide in an average."""
    a2, b2 = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a2 * b2).sum(-1)
    den = np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-30
    return float((num / den).min())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float:
    lp, lq = _log_softmax(ref_logits), _log_softmax(cand_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def token_match(ref: list[int], cand: list[int]) -> float:
    n = max(len(ref), len(cand))
    return 1.0 if n == 0 else sum(a == b for a, b in zip(ref, cand)) / n


def prefill_logits(pipe: Pipeline, embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return pipe.backend.decode(embeds, mask, pos, pipe.backend.new_cache(embeds.shape[0]))


def pixel_digest(vision) -> str:
    """sha256 of a prompt's preprocessed tiles (and mask): what the reference saw, without keeping it."""
    h = hashlib.sha256()
    for a in [*vision.tile_groups(), vision.pixel_attention_mask]:
        if a is not None:
            h.update(str((a.dtype, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class ReferenceCase:
    prepared: Any               # PreparedPrompt, its tiles dropped (SmolVLM: up to 17 tiles an image, 3 MB each)
    pixels: str                 # pixel_digest of the dropped tiles
    features: np.ndarray        # [tiles, T, D]
    embeds: np.ndarray          # [1, n, D] merged prompt embeddings
    logits: np.ndarray          # [1, V] prefill logits
    tokens: list[int]           # greedy continuation


@dataclass
class ReferenceRun:
    """What the PyTorch reference computed on the verify prompts. Kept instead of the model, so the
    reference's weights can be released before a candidate's runtime loads the same weights again:
    verify's peak memory is the larger of the two, not their sum."""
    cases: list[ReferenceCase]
    max_new_tokens: int
    backend: dict[str, Any]
    skipped: list[dict[str, Any]]   # cases left out by the tile budget: name, reason


def case_images(pipe: Pipeline, i: int, case: Case) -> list[Any]:
    """Case i's images (and clip), at the sizes the family verifies at (Family.verify_image_sizes: a
    Qwen2.5-VL tower with attention windows gets images that span several of them)."""
    from .images import sample_images
    from .video import Video

    media: list[Any] = sample_images(len(case.sizes), seed=100 + i, sizes=pipe.family.verify_image_sizes(case.sizes))
    if case.video:
        frames, size = case.video
        clip = Video(sample_images(frames, seed=200 + i, sizes=pipe.family.verify_image_sizes([size])), fps=2.0)
        markers = re.findall(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}", case.prompt)
        media.insert(markers.index(VIDEO_MARKER), clip)
    return media


def reference_run(reference: Pipeline, max_new_tokens: int = 16) -> ReferenceRun:
    cases, skipped, tiles = [], [], 0
    plan = cases_for(reference)
    for i, case in enumerate(plan):
        images = case_images(reference, i, case)
        prep = reference.prepare(case.prompt, images)
        n_tiles = sum(prep.vision.tiles_per_image)
        if i >= 2 and tiles + n_tiles > VERIFY_TILES:
            skipped += [{"case": c.name, "reason": f"tile budget: {tiles} tiles verified, at most {VERIFY_TILES}"}
                        for c in plan[i:]]
            break
        tiles += n_tiles
        features = reference.image_features(prep.vision)
        embeds = reference.merged_embeddings(prep, features)
        logits, tokens = reference.greedy_from_embeddings(embeds, max_new_tokens, reference.prompt_positions(prep))
        kept = replace(prep, vision=prep.vision.without_pixels())
        cases.append(ReferenceCase(kept, pixel_digest(prep.vision), features, embeds, logits, tokens))
    return ReferenceRun(cases, max_new_tokens, reference.backend.describe(), skipped)


def verify(candidate: Pipeline, reference: Pipeline | ReferenceRun, precision: str = "fp32", max_new_tokens: int = 16,
           thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Judge `candidate` against the reference (a Pipeline, or a ReferenceRun computed earlier with
    the same max_new_tokens, so that several candidates share one reference pass)."""
    if not isinstance(reference, ReferenceRun):
        reference = reference_run(reference, max_new_tokens)
    elif reference.max_new_tokens != max_new_tokens:
        raise ValueError(f"the reference run generated {reference.max_new_tokens} tokens, not {max_new_tokens}")
    limits = dict(thresholds or thresholds_for(candidate, precision))
    cases, ref_embeds, ref_positions, ref_logits = [], [], [], []
    for i, (case, ref) in enumerate(zip(cases_for(candidate), reference.cases)):
        images = case_images(candidate, i, case)
        prep = ref.prepared
        cand_prep = candidate.prepare(case.prompt, images)
        ids_equal = cand_prep.input_ids.tolist() == prep.input_ids.tolist()
        pixels_equal = pixel_digest(cand_prep.vision) == ref.pixels
        rf, cf = ref.features, candidate.image_features(cand_prep.vision)
        re_, ce = ref.embeds, candidate.merged_embeddings(prep, cf)
        n = re_.shape[1]
        positions = candidate.prompt_positions(prep)
        ones, pos = np.ones((1, n), np.int64), candidate.as_position_ids(positions[:, None])
        rl, rt = ref.logits, ref.tokens
        cl, ct = candidate.greedy_from_embeddings(ce, max_new_tokens, positions)
        # The decoder alone: the candidate's decoder on the reference's own input embeddings.
        dl = prefill_logits(candidate, re_, ones, pos)
        cases.append({"case": case.name, "images": len(case.sizes), "videos": int(case.video is not None),
                      "prompt_tokens": n, "prompt_ids_equal": ids_equal,
                      "pixels_equal": pixels_equal,
                      "vision_max_abs": float(np.abs(rf - cf).max()), "vision_cosine_min": cosine_min(rf, cf),
                      "logits_max_abs": float(np.abs(rl - cl).max()), "logits_kl": kl_divergence(rl, cl),
                      "decoder_logits_max_abs": float(np.abs(rl - dl).max()),
                      "token_match": token_match(rt, ct), "reference_tokens": rt, "candidate_tokens": ct})
        tokenize = candidate.backend.tokenize if capabilities_of(candidate.backend).tokenize else None
        if tokenize is not None:  # the backend's own tokenizer (llama.cpp's), as stock tools would use it
            own = tokenize(prep.expanded, prep.add_special)
            cases[-1]["backend_tokenizer_equal"] = own == prep.input_ids.tolist()
            cases[-1]["backend_tokenizer_first_difference"] = next(
                (i for i, (a, b) in enumerate(zip(own, prep.input_ids.tolist())) if a != b),
                None if len(own) == len(prep.input_ids) else min(len(own), len(prep.input_ids)))
        ref_embeds.append(re_[0])
        ref_positions.append(positions)
        ref_logits.append(rl[0])

    # Batch 2, left padded: each row must give the logits the reference gives it alone.
    embeds, mask, pos = left_pad(ref_embeds[:2], ref_positions[:2])
    batch_logits = prefill_logits(candidate, embeds, mask, candidate.as_position_ids(pos))
    batch2 = float(max(np.abs(batch_logits[0] - ref_logits[0]).max(), np.abs(batch_logits[1] - ref_logits[1]).max()))
    batch2_kl = max(kl_divergence(ref_logits[0], batch_logits[0]), kl_divergence(ref_logits[1], batch_logits[1]))

    summary = {
        "vision_max_abs": max(c["vision_max_abs"] for c in cases),
        "vision_cosine_min": min(c["vision_cosine_min"] for c in cases),
        "logits_max_abs": max(c["logits_max_abs"] for c in cases),
        "logits_kl_max": max(c["logits_kl"] for c in cases),
        "decoder_logits_max_abs": max(c["decoder_logits_max_abs"] for c in cases),
        "batch2_logits_max_abs": batch2,
        "batch2_logits_kl_max": batch2_kl,
        "token_match_min": min(c["token_match"] for c in cases),
    }
    if "backend_tokenizer_equal" in cases[0]:
        # Reported, not gated: edgelmm's pipeline tokenizes with the HF tokenizer on every backend.
        summary["backend_tokenizer_match"] = sum(c["backend_tokenizer_equal"] for c in cases) / len(cases)
        differing = [c for c in cases if not c["backend_tokenizer_equal"]]
        if differing:
            c = differing[0]
            summary["backend_tokenizer_note"] = (
                f"llama.cpp's own tokenizer differs from the HF tokenizer on {len(differing)} of {len(cases)} prompts "
                f"(first at token {c['backend_tokenizer_first_difference']} of {c['case']}); edgelmm feeds the HF "
                "tokenizer's ids to every backend, so only stock llama.cpp tools (llama-mtmd-cli) see this. "
                "A known cause: llama.cpp's sentencepiece path adds a space prefix after every special token.")
    failures = []
    for key, limit in limits.items():
        value = summary[key]
        bad = value < limit if key.endswith("_min") else value > limit
        if bad:
            failures.append(f"{key} = {value:.3g} (limit {limit:.3g})")
    if not all(c["prompt_ids_equal"] for c in cases):
        failures.append("prompt token ids differ between the bundle and the reference")
    if not all(c["pixels_equal"] for c in cases):
        failures.append("preprocessed pixels differ between the bundle and the reference")
    return {"precision": precision, "backend": candidate.backend.describe(), "thresholds": limits,
            "summary": summary, "cases": cases, "skipped_cases": reference.skipped, "passed": not failures,
            "failures": failures}
