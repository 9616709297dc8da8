"""Calibration: quantized precisions of a bundle's ONNX graphs, measured and gated.

`calibrate(bundle, samples=SRC, precisions=[...])` starts from the bundle's fp32 graphs (which
export verified against PyTorch), draws calibration prompts from SRC, writes the quantized graphs,
measures each precision against fp32 on held-out prompts (never calibrated on), and adds them to
the manifest only when they pass the quality gate. It needs `onnx` and onnxruntime, not torch
(HQQ aside), so it runs on the workstation or on the device itself.

Precisions (each a full vision/embed/decoder set; the token embedding always stays fp32):
  int8              INT8 static vision + dynamic INT8 decoder
  int4              fp32 vision + INT4 weight-only decoder
  int8-vision+int4  INT8 static vision + INT4 weight-only decoder
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import Bundle, graph_file, update_bundle
from ..errors import CalibrationError, QualityGateError
from .sources import CalibSample, CalibSet, collect

# precision -> the variant of each graph it runs (file names: vision.int8.onnx, decoder.int4.onnx ...)
QUANTIZED_PRECISIONS: dict[str, dict[str, str]] = {
    "int8": {"vision": "int8", "embed": "fp32", "decoder": "int8"},
    "int4": {"vision": "fp32", "embed": "fp32", "decoder": "int4"},
    "int8-vision+int4": {"vision": "int8", "embed": "fp32", "decoder": "int4"},
}


@dataclass
class CalibrationOptions:
    samples: str = "synthetic"          # the source spec (see calib.sources)
    calib_samples: int = 64             # prompts drawn from it (some are held out to measure quality)
    seed: int = 0
    vision_method: str = "minmax"       # INT8 ranges: minmax | entropy | percentile
    vision_cosine_target: float = 0.995  # the sensitivity pass keeps nodes in float until this holds
    exclude_sensitive_ops: bool = True
    sensitivity: bool = True
    activations: str = "u8"             # u8 for CPU kernels, s8 (symmetric) for TensorRT
    int4_algorithm: str = "rtn"         # rtn | hqq | gptq
    int4_block_size: int = 32
    int4_accuracy_level: int | None = 4  # MatMulNBits compute: 4 = int8 (fastest on CPU), 0 = fp32
    quantize_lm_head: bool = False
    gate: bool = True
    max_accuracy_drop: float = 2.0      # points of held-out accuracy
    min_vision_cosine: float = 0.99
    eval_samples: int | None = None     # None: all 900 when the model answers edgelmm's synthetic tasks
    image_root: str | None = None

    def validate(self) -> None:
        """Check every field, cheaply (the source is looked up, not read), so a bad option fails
        before minutes of work. Called by calibrate(), export() and the CLI."""
        import os

        from ..errors import CalibrationOptionError as bad
        from ..options import check_choice, check_int, check_number
        from .quantize import INT4_ALGORITHMS, VISION_METHODS
        from .sources import check_source

        check_int("calibration samples (--calib-samples)", self.calib_samples, 1, error=bad)
        check_int("seed (--seed)", self.seed, 0, error=bad)   # like every seed edgelmm takes (numpy refuses < 0)
        check_choice("INT8 calibration method (--vision-method)", self.vision_method, VISION_METHODS, error=bad)
        check_number("vision cosine target (vision_cosine_target)", self.vision_cosine_target, 0, 1, lo_open=True,
                     error=bad)
        check_choice("INT8 activations (--activations)", self.activations, ("u8", "s8"), error=bad)
        check_choice("INT4 algorithm (--int4-algorithm)", self.int4_algorithm, INT4_ALGORITHMS, error=bad)
        block = check_int("INT4 block size (--block-size)", self.int4_block_size, error=bad)
        if block < 16 or block & (block - 1):  # what ONNX Runtime's MatMulNBits takes
            raise bad(f"INT4 block size (--block-size) must be a power of two >= 16, got {block}")
        if self.int4_accuracy_level is not None:  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
            check_int("INT4 accuracy level (--accuracy-level)", self.int4_accuracy_level, 0, 4, error=bad)
        for flag in ("exclude_sensitive_ops", "sensitivity", "quantize_lm_head", "gate"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        check_number("max accuracy drop (--max-accuracy-drop)", self.max_accuracy_drop, 0, 100, error=bad)
        check_number("min vision cosine (--min-vision-cosine)", self.min_vision_cosine, -1, 1, error=bad)
        if self.eval_samples is not None:  # 0: accuracy not measured
            check_int("eval samples (--eval-samples)", self.eval_samples, 0, error=bad)
        check_source(self.samples)
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise bad(f"image root (--image-root) {self.image_root!r} is not a folder")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CalibrationResult:
    bundle: Path
    precisions: list[str]
    calibration: dict[str, Any]
    quality: dict[str, dict[str, Any]]
    passed: bool
    failures: list[str] = field(default_factory=list)


def _records(pipe, samples: list[CalibSample], with_answers: bool):
    """(prepared prompt, vision feeds, decoder prefill feeds, fp32 features, fp32 embeddings) per sample."""
    out = []
    for s in samples:
        messages = s.messages if with_answers or s.messages[-1]["role"] != "assistant" else s.messages[:-1]
        prep = pipe.prepare(messages, s.images)
        feats = pipe.image_features(prep.vision)
        embeds = pipe.merged_embeddings(prep, feats)
        v = pipe.backend.vision_feeds(prep.vision.pixel_values, prep.vision.pixel_attention_mask)
        out.append((prep, v, pipe.backend.prefill_feeds(embeds), feats, embeds))
    return out


def _per_tile(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """One feed per image tile: prompts have different image counts, and ORT's histogram calibrators
    (entropy, percentile) need every feed of one shape."""
    return [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(f["pixel_values"].shape[0])]


def calibrate(bundle_dir: str | Path, precisions: Sequence[str], options: CalibrationOptions | None = None, *,
              progress: Callable[[str], None] | None = None, overwrite: bool = False,
              verify_checksums: bool = True) -> CalibrationResult:
    """Add quantized `precisions` to the bundle at `bundle_dir`. Files are written into a hidden
    directory inside the bundle and the manifest is replaced atomically at the end, so an
    interrupted or refused calibration leaves the bundle exactly as it was."""
    (options or CalibrationOptions()).validate()  # every option, before the bundle is hashed or read
    from ..api import pipeline_for_bundle
    from .quantize import quantize_decoder_int4, quantize_decoder_int8_dynamic, quantize_vision_int8

    opts = options or CalibrationOptions()
    say = progress or (lambda _msg: None)
    unknown = [p for p in precisions if p not in QUANTIZED_PRECISIONS]
    if unknown or not precisions:
        raise CalibrationError(f"unknown quantized precision(s) {unknown or list(precisions)}; "
                               f"choose from {', '.join(QUANTIZED_PRECISIONS)}")
    root = Path(bundle_dir)
    with update_bundle(root, verify_checksums=verify_checksums) as txn:
        bundle = txn.bundle
        have = {a["precision"] for a in bundle.manifest["artifacts"] if a["format"] == "onnx"}
        if "fp32" not in have:
            raise CalibrationError(f"{root}: calibration starts from the fp32 ONNX graphs and this bundle has none "
                                   "(export with --format onnx --precision fp32)")
        present = [p for p in precisions if p in have]
        if present and not overwrite:
            raise CalibrationError(f"{root}: already has {present}; pass overwrite=True / --overwrite to recalibrate")

        say(f"reading calibration samples from {opts.samples}")
        calib_set = collect(opts.samples, opts.calib_samples, opts.seed, image_root=opts.image_root)
        calib_samples, held_out = calib_set.split(held_out=min(16, max(2, len(calib_set.samples) // 8)))
        reference = pipeline_for_bundle(bundle, backend="onnxruntime", provider="cpu", precision="fp32")
        say(f"running {len(calib_samples)} calibration prompts through the fp32 graphs")
        calib_records = _records(reference, calib_samples, with_answers=True)
        held_records = _records(reference, held_out, with_answers=False)

        variants = {(g, v) for p in precisions for g, v in QUANTIZED_PRECISIONS[p].items() if v != "fp32"}
        new_files: dict[str, Path] = {}   # bundle name (onnx/vision.int8.onnx) -> where it is written
        details: dict[str, dict[str, Any]] = {}
        src = {g: bundle.path(bundle.artifact(g, "onnx", "fp32")) for g in ("vision", "decoder")}
        if ("vision", "int8") in variants:
            out = new_files["onnx/" + graph_file("vision", "int8")] = txn.new_file("onnx/" + graph_file("vision", "int8"))
            res = quantize_vision_int8(src["vision"], out, _per_tile([r[1] for r in calib_records]),
                                       _per_tile([r[1] for r in held_records]),
                                       method=opts.vision_method, cosine_target=opts.vision_cosine_target,
                                       exclude_sensitive_ops=opts.exclude_sensitive_ops, sensitivity=opts.sensitivity,
                                       activations=opts.activations, progress=say)
            details["vision.int8"] = {"scheme": "int8 static QDQ", **res.as_dict()}
        if ("decoder", "int4") in variants:
            say(f"INT4 decoder ({opts.int4_algorithm}, block {opts.int4_block_size})")
            out = new_files["onnx/" + graph_file("decoder", "int4")] = txn.new_file("onnx/" + graph_file("decoder", "int4"))
            details["decoder.int4"] = quantize_decoder_int4(
                src["decoder"], out, algorithm=opts.int4_algorithm, block_size=opts.int4_block_size,
                accuracy_level=opts.int4_accuracy_level, calib=[r[2] for r in calib_records],
                quantize_lm_head=opts.quantize_lm_head)
        if ("decoder", "int8") in variants:
            say("dynamic INT8 decoder")
            out = new_files["onnx/" + graph_file("decoder", "int8")] = txn.new_file("onnx/" + graph_file("decoder", "int8"))
            details["decoder.int8"] = quantize_decoder_int8_dynamic(src["decoder"], out)

        # Each new graph hashed once (with its external data); a trial manifest sees the graphs where
        # they are now (the work dir) to measure them, the final one where the commit puts them.
        final_entries = {name: txn.entries(path) for name, path in new_files.items()}
        trial_entries = {name: [{**e, "file": txn.trial_rel(txn.work / e["file"])} for e in entries]
                         for name, entries in final_entries.items()}
        trial = _with_artifacts(bundle.manifest, precisions, trial_entries)
        quality, failures = {}, []
        accuracy_samples = _accuracy_samples(reference, opts, say)
        baseline = _accuracy(reference, accuracy_samples, say, "fp32") if accuracy_samples else None
        references = reference_outputs(reference, held_records)
        for p in precisions:
            candidate = pipeline_for_bundle(Bundle(root, trial), backend="onnxruntime", provider="cpu", precision=p)
            say(f"measuring {p} against fp32 on {len(held_records)} held-out prompts")
            report = measure(candidate, held_records, references)
            report["size_bytes"] = precision_size(trial, p)
            report["graphs"] = {g: v for g, v in QUANTIZED_PRECISIONS[p].items()}
            if baseline is not None:
                acc = _accuracy(candidate, accuracy_samples, say, p)
                report["accuracy"] = acc
                report["accuracy_fp32"] = baseline
                report["accuracy_drop_points"] = round(100 * (baseline - acc), 3)
            else:
                report["accuracy"] = None
                report["accuracy_note"] = ("not measured: the model does not answer edgelmm's synthetic tasks "
                                           "(it was not trained on them), so held-out accuracy means nothing here")
            report["failures"] = gate_failures(report, opts)
            report["passed"] = not report["failures"]
            failures += [f"{p}: {f}" for f in report["failures"]]
            quality[p] = report
            del candidate
        calibration = {**calib_set.summary(), "held_out": len(held_out), "calibrated_on": len(calib_samples),
                       "options": opts.as_dict(), "graphs": details}
        if failures and opts.gate:
            raise QualityGateError("quantization broke the model beyond the quality gate: " + "; ".join(failures)
                                   + ". Nothing was added to the bundle. Try more or more varied --calib-samples, "
                                   "another --vision-method or --int4-algorithm, or pass --no-quality-gate to keep "
                                   "it anyway.", {"quality": quality, "calibration": calibration})
        final = _with_artifacts(bundle.manifest, precisions, final_entries)
        final["quality"] = {**final.get("quality", {}), **quality}
        final["calibration"] = {**final.get("calibration", {}), **{p: calibration for p in precisions}}
        del reference
        txn.commit(final)
    return CalibrationResult(root, list(precisions), calibration, quality, not failures, failures)


def _with_artifacts(manifest: dict[str, Any], precisions: Sequence[str],
                    entries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The manifest plus one artifact per graph and precision. `entries` maps a quantized graph's
    bundle name (onnx/decoder.int4.onnx) to its hashed files, graph first, as they are listed now;
    fp32 graphs are shared with the fp32 set."""
    out = {**manifest, "artifacts": [a for a in manifest["artifacts"]
                                     if not (a["format"] == "onnx" and a["precision"] in precisions)]}
    fp32 = {a["graph"]: a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32"}
    for p in precisions:
        for graph, variant in QUANTIZED_PRECISIONS[p].items():
            base = fp32[graph]
            if variant == "fp32":
                out["artifacts"].append({**base, "precision": p})
                continue
            files = entries["onnx/" + graph_file(graph, variant)]
            out["artifacts"].append({**base, "precision": p, "file": files[0]["file"], "files": files,
                                     "sha256": files[0]["sha256"], "quantized_from": base["file"]})
    return out


def precision_size(manifest: dict[str, Any], precision: str) -> int:
    """Bytes on disk of one ONNX precision's graph set (a file shared by two graphs counts once)."""
    files = {e["file"]: e["size"] for a in manifest["artifacts"]
             if a["format"] == "onnx" and a["precision"] == precision for e in a["files"]}
    return sum(files.values())


GREEDY_TOKENS = 16


def reference_outputs(reference, held_records) -> list[tuple[np.ndarray, list[int]]]:
    """The fp32 prefill logits and greedy tokens of each held-out prompt: computed once, compared
    with every precision."""
    from ..pipeline import SamplingParams
    from ..verify import prefill_logits

    out = []
    for prep, _v, _d, ref_feats, ref_embeds in held_records:
        n = ref_embeds.shape[1]
        logits = prefill_logits(reference, ref_embeds, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None])
        out.append((logits, list(reference.stream_tokens(prep, SamplingParams(max_new_tokens=GREEDY_TOKENS),
                                                         features=ref_feats))))
    return out


def measure(candidate, held_records, references: list[tuple[np.ndarray, list[int]]]) -> dict[str, Any]:
    """Quality of `candidate` against the fp32 `references` (from reference_outputs) on held-out
    prompts: per graph (vision features; the decoder alone on the fp32 input embeddings) and end to end."""
    from ..pipeline import SamplingParams
    from ..verify import cosine_min, kl_divergence, prefill_logits, token_match

    rows = []
    for (prep, _v, _d, ref_feats, ref_embeds), (rl, rt) in zip(held_records, references):
        n = ref_embeds.shape[1]
        ones, pos = np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None]
        feats = candidate.image_features(prep.vision)
        dl = prefill_logits(candidate, ref_embeds, ones, pos)
        cl = prefill_logits(candidate, candidate.merged_embeddings(prep, feats), ones, pos)
        ct = list(candidate.stream_tokens(prep, SamplingParams(max_new_tokens=GREEDY_TOKENS), features=feats))
        rows.append({"vision_cosine_min": cosine_min(ref_feats, feats),
                     "vision_max_abs": float(np.abs(ref_feats - feats).max()),
                     "decoder_logits_max_abs": float(np.abs(rl - dl).max()),
                     "decoder_logits_cosine": cosine_min(rl, dl), "decoder_kl": kl_divergence(rl, dl),
                     "logits_kl": kl_divergence(rl, cl), "token_match": token_match(rt, ct)})
    return {
        "held_out_prompts": len(rows),
        "vision_cosine_min": min(r["vision_cosine_min"] for r in rows),
        "vision_max_abs": max(r["vision_max_abs"] for r in rows),
        "decoder_logits_max_abs": max(r["decoder_logits_max_abs"] for r in rows),
        "decoder_logits_cosine_min": min(r["decoder_logits_cosine"] for r in rows),
        "decoder_kl_max": max(r["decoder_kl"] for r in rows),
        "logits_kl_max": max(r["logits_kl"] for r in rows),
        "logits_kl_mean": float(np.mean([r["logits_kl"] for r in rows])),
        "token_match_mean": float(np.mean([r["token_match"] for r in rows])),
        "token_match_min": min(r["token_match"] for r in rows),
    }


def gate_failures(report: dict[str, Any], opts: CalibrationOptions) -> list[str]:
    failures = []
    if report["vision_cosine_min"] < opts.min_vision_cosine:
        failures.append(f"vision feature cosine {report['vision_cosine_min']:.4f} < {opts.min_vision_cosine}")
    if report.get("accuracy") is not None and report["accuracy_drop_points"] > opts.max_accuracy_drop:
        failures.append(f"held-out accuracy {report['accuracy']:.1%} is {report['accuracy_drop_points']:.1f} points "
                        f"below fp32 ({report['accuracy_fp32']:.1%}; limit {opts.max_accuracy_drop} points)")
    return failures


# Enough to tell a model that learned the synthetic tasks (the reference model: ~94%) from one that
# did not (random or foreign checkpoints: ~0%), at two samples per task.
PROBE_SAMPLES = 18
PROBE_MIN_ACCURACY = 0.5
# The whole held-out set. On 180 samples one answer is 0.56 points, too coarse for a 2-point gate:
# the reference model's int8-vision+int4 lost 2.2 points on the first 180 and 0.6 on all 900.
# Costs ~15 s per precision on the reference model.
DEFAULT_EVAL_SAMPLES = 900


def _accuracy_samples(reference, opts: CalibrationOptions, say) -> int:
    if opts.eval_samples is not None:
        return opts.eval_samples
    say("checking whether the model answers edgelmm's synthetic tasks")
    return DEFAULT_EVAL_SAMPLES if _accuracy(reference, PROBE_SAMPLES, say, "probe") >= PROBE_MIN_ACCURACY else 0


def _accuracy(pipe, samples: int, say, label: str) -> float:
    from ..evaluate import evaluate

    say(f"held-out accuracy ({label}, {samples} samples)")
    return evaluate(pipe, samples=samples).accuracy


__all__ = ["QUANTIZED_PRECISIONS", "CalibrationOptions", "CalibrationResult", "CalibSample", "CalibSet",
           "calibrate", "collect", "measure", "precision_size"]
