"""TensorRT engines from a bundle's ONNX graphs, built on the device that will run them (engines are
tied to the GPU and the TensorRT version). Needs TensorRT 10.3+ or 11 and a GPU; not torch or
transformers.

One path for both versions: strongly typed networks (TensorRT 11 has no other kind; 10.x is asked
for it with NetworkDefinitionCreationFlag.STRONGLY_TYPED), so no precision builder flag is set on
either and an engine's precision is the graph's own types (export/engine_graphs.py: fp16 graphs with
fp32 kept where needed, the calibrated s8 QDQ vision graph, blocked INT4 DequantizeLinear weights).
Per engine: the ONNX parser, optimization profiles (tiles for vision; for the decoder one for
decode steps and one for prefill, so long prompts do not run through decode-shaped kernels), a
timing cache shared by every build on this GPU, and a report of the compute layers that run in a
wider type than the graph asks for.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import update_bundle
from ..errors import ExportError
from .engine_graphs import ENGINE_VARIANTS, VARIANT_COMPUTE, graph_io, make_engine_graph

# precision -> per graph, the variant of the graph its engine is built from (fp32, fp16, int8, int4)
ENGINE_PRECISIONS = ENGINE_VARIANTS
PREFILL_OPT_TOKENS = 256      # the prefill profile's optimal prompt length
# Image sizes whose tiles the vision profile must cover (camera frames up to 1080p).
_PROFILE_IMAGE_SIZES = ((224, 224), (480, 640), (720, 1280), (1080, 1920), (64, 48), (40, 56))


@dataclass
class EngineOptions:
    precisions: Sequence[str] = ("fp16",)
    max_images: int = 8              # images per prompt the vision engine takes at once
    max_context: int = 4096          # positions (prompt + answer) the decoder engine holds
    max_batch: int = 1
    workspace_mib: int = 2048
    timing_cache: str | None = None  # default ~/.cache/edgelmm/tensorrt/<gpu>-trt<version>.timing
    optimization_level: int | None = None  # TensorRT's builder optimization level (default 3)
    int4_block_size: int = 32
    device_index: int = 0
    verify: bool = True
    overwrite: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precisions": list(self.precisions)}


def _dims(shape: list) -> list[int | str]:
    return [d if isinstance(d, int) and d > 0 else str(d) for d in shape]


def tile_range(family) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(most tiles one image becomes, smallest (H, W) tile, largest (H, W) tile) over camera-like sizes."""
    most, hs, ws = 1, [], []
    for h, w in _PROFILE_IMAGE_SIZES:
        vis = family.preprocess([np.zeros((h, w, 3), np.uint8)])
        most = max(most, vis.tiles_per_image[0])
        hs += [g.shape[-2] for g in vis.tile_groups()]
        ws += [g.shape[-1] for g in vis.tile_groups()]
    return most, (min(hs), min(ws)), (max(hs), max(ws))


def profiles(graph: str, inputs: list[dict], family, text: dict, opts: EngineOptions,
             context_length: int | None) -> list[dict[str, list[list[int]]]]:
    """The engine's optimization profiles, each name -> [min, opt, max] shapes. Static dims are kept;
    the dynamic ones come from the options (images, context, batch) and the family's tiling. The
    decoder has two: decode steps (one new token; listed first, the runtime takes the first that
    fits) and prefill (up to the whole context at once)."""
    B = opts.max_batch
    ctx = min(opts.max_context, context_length or opts.max_context)
    if graph == "vision":
        out = {}
        per_image, (h0, w0), (h1, w1) = tile_range(family)
        tiles = max(1, opts.max_images * per_image)
        for inp in inputs:
            shape = inp["shape"]
            lo, opt, hi = [], [], []
            for axis, d in enumerate(shape):
                if isinstance(d, int) and d > 0:
                    lo.append(d), opt.append(d), hi.append(d)
                elif axis == 0:
                    lo.append(1), opt.append(min(tiles, 2 * per_image)), hi.append(tiles)
                else:  # a tile's height or width (families with variable tile sizes)
                    spatial = axis - (len(shape) - 2)  # 0 = H, 1 = W
                    lo.append((h0, w0)[spatial]), opt.append((h1, w1)[spatial]), hi.append((h1, w1)[spatial])
            out[inp["name"]] = [lo, opt, hi]
        return [out]
    if graph == "embed":
        return [{"input_ids": [[1, 1], [1, 1], [B, ctx]]}]
    kv, hd, D = text["num_kv_heads"], text["head_dim"], text["hidden_size"]
    opt_past = min(512, ctx)
    opt_prompt = min(PREFILL_OPT_TOKENS, ctx)

    def decoder(seq_hi: int, seq_opt: int, past_opt: int) -> dict[str, list[list[int]]]:
        out = {"inputs_embeds": [[1, 1, D], [1, seq_opt, D], [B, seq_hi, D]],
               # one hidden slot in front of the cache (see runtimes/tensorrt.py): past is never empty
               "attention_mask": [[1, 2], [1, past_opt + seq_opt], [B, ctx + 1]],
               "position_ids": [[1, 1], [1, seq_opt], [B, seq_hi]]}
        for inp in inputs[3:]:
            out[inp["name"]] = [[1, kv, 1, hd], [1, kv, past_opt, hd], [B, kv, ctx, hd]]
        return out
    return [decoder(1, 1, opt_past), decoder(ctx, opt_prompt, 1)]


def default_timing_cache(target: dict[str, Any]) -> Path:
    name = f"{target['gpu'].replace(' ', '_')}-sm{target['compute_capability']}-trt{target['tensorrt']}.timing"
    return Path(os.environ.get("EDGELMM_CACHE", Path.home() / ".cache" / "edgelmm")) / "tensorrt" / name


def build_engine(trt, onnx_path: Path, engine_path: Path, shapes: list[dict[str, list[list[int]]]], wanted: str,
                 opts: EngineOptions, timing_cache: Path) -> dict[str, Any]:
    """Parse, configure, build and serialise one engine from a strongly typed graph (no precision
    flags: the graph's types are the engine's); returns its build record for the manifest. `wanted`
    is what its compute layers should run in, for the layer report."""
    from ..runtimes.tensorrt import engine_layer_report, strongly_typed_network, trt_logger

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path.name}: TensorRT's ONNX parser refused the graph: " + " | ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for the layer precision report
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile_shapes in shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            if name in names:
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path.name}: TensorRT could not build an engine: " + " | ".join(logger.errors))
    seconds = time.perf_counter() - start
    engine_path.write_bytes(memoryview(plan))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    layers = engine_layer_report(inspector.get_engine_information(trt.LayerInformationFormat.JSON), wanted)
    return {"strongly_typed": True, "profiles": shapes, "build_seconds": round(seconds, 1),
            "workspace_mib": opts.workspace_mib, "layers": layers, "size_bytes": engine_path.stat().st_size}


def build_engines(bundle_dir: str | Path, options: EngineOptions | None = None, *,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build TensorRT engines for `options.precisions` into the bundle at `bundle_dir`: files go to a
    hidden directory inside it and the manifest is replaced in one rename at the end, so a failed or
    interrupted build leaves the bundle as it was. Each engine is then checked against the bundle's
    fp32 ONNX graphs on ONNX Runtime's CPU provider (no PyTorch needed on the device)."""
    from ..loading import pipeline_for_bundle
    from ..families import detect
    from ..modelfiles import ModelFiles
    from ..runtimes.tensorrt import current_engine_target
    from ..runtimes.tensorrt import import_tensorrt
    from ..verify import verify as run_verify

    opts = options or EngineOptions()
    say = progress or (lambda _msg: None)
    unknown = [p for p in opts.precisions if p not in ENGINE_PRECISIONS]
    if unknown or not opts.precisions:
        raise ExportError(f"unknown engine precision(s) {unknown or list(opts.precisions)}; choose from "
                          f"{', '.join(ENGINE_PRECISIONS)}")
    root = Path(bundle_dir)
    with update_bundle(root) as txn:
        bundle = txn.bundle
        fp32 = {a["graph"]: a for a in bundle.artifacts(format="onnx", precision="fp32")}
        if len(fp32) < 3:
            raise ExportError(f"{root}: engines are built from the bundle's fp32 ONNX graphs and it has none "
                              "(export with --format onnx)")
        have = set(bundle.precisions("tensorrt"))
        present = [p for p in opts.precisions if p in have]
        if present and not opts.overwrite:
            raise ExportError(f"{root}: already has {present} engines; pass --overwrite to rebuild them")
        needs_int8 = any(ENGINE_PRECISIONS[p]["vision"] == "int8" for p in opts.precisions)
        int8_vision = next((a for a in bundle.artifacts(graph="vision", format="onnx")
                            if a["file"].endswith("vision.int8.onnx")), None)
        if needs_int8:
            if int8_vision is None:
                raise ExportError(f"{root}: INT8 vision engines are built from the calibrated QDQ vision graph; run "
                                  "`edgelmm calibrate BUNDLE --precision int8-vision+int4 --activations s8` first")
            activations = {c.get("options", {}).get("activations") for c in bundle.manifest.get("calibration", {}).values()}
            if "s8" not in activations:
                raise ExportError(f"{root}: the INT8 vision graph was calibrated with unsigned (asymmetric) activations for "
                                  "CPU kernels; TensorRT takes symmetric INT8 only: recalibrate with "
                                  "`edgelmm calibrate BUNDLE --precision int8-vision+int4 --activations s8 --overwrite`")

        trt = import_tensorrt()
        target = current_engine_target(opts.device_index)
        timing_cache = Path(opts.timing_cache) if opts.timing_cache else default_timing_cache(target)
        files = ModelFiles.open(root)
        family = detect(files, prompt_style=bundle.manifest.get("prompt_style"))
        work = txn.work
        (work / "graphs").mkdir(exist_ok=True)
        graphs: dict[tuple[str, str], dict[str, Any]] = {}   # (graph, variant) -> its typed graph, made once
        built: dict[tuple[str, str], dict[str, Any]] = {}    # (graph, variant) -> its engine, built once
        artifacts = []
        for precision in opts.precisions:
            for graph, variant in ENGINE_PRECISIONS[precision].items():
                key = (graph, variant)
                if key not in graphs:
                    say(f"{variant} {graph} graph for a strongly typed network")
                    graphs[key] = make_engine_graph(
                        variant, graph, bundle.path(fp32[graph]), work / "graphs" / f"{graph}.{variant}.onnx",
                        int8_src=bundle.path(int8_vision) if int8_vision else None,
                        int4_block_size=opts.int4_block_size)
                if key not in built:
                    # A name no generation of the manifest uses: the engines it lists stay untouched.
                    out = txn.new_file(f"tensorrt/{graph}.{variant}.engine")
                    say(f"building the {graph} engine ({variant} graph)")
                    shapes = profiles(graph, fp32[graph]["inputs"], family, bundle.manifest["text"], opts,
                                      files.context_length)
                    record = build_engine(trt, graphs[key]["file"], out, shapes, VARIANT_COMPUTE[variant], opts,
                                          timing_cache)
                    inputs, outputs = graph_io(graphs[key]["file"])
                    built[key] = {"path": out, "record": record, "inputs": inputs, "outputs": outputs}
                out, record = built[key]["path"], built[key]["record"]
                typed = {k: v for k, v in graphs[key].items() if k != "file"}
                engine = {"target": target, "source": variant, "tensorrt_version": target["tensorrt"], "graph": typed,
                          **record}
                artifacts.append({"graph": graph, "format": "tensorrt", "precision": precision, "path": out,
                                  "inputs": built[key]["inputs"], "outputs": built[key]["outputs"], "engine": engine})
        for leftover in (work / "graphs").glob("*"):   # the typed graphs are not part of the bundle
            leftover.unlink()

        # Each engine is hashed once, in the work dir: moving it into tensorrt/ does not change it.
        hashed = {b["path"]: txn.entries(b["path"])[0] for b in built.values()}

        def with_engines(before_commit: bool) -> dict[str, Any]:
            """The manifest with the new engines listed where they are before or after the commit."""
            arts = []
            for art in artifacts:
                entry = hashed[art["path"]]
                entry = txn.where_now([entry])[0] if before_commit else entry
                arts.append({**{k: v for k, v in art.items() if k != "path"}, "file": entry["file"], "files": [entry],
                             "sha256": entry["sha256"]})
            kept = [a for a in bundle.manifest["artifacts"]
                    if not (a["format"] == "tensorrt" and a["precision"] in opts.precisions)]
            return {**bundle.manifest, "artifacts": kept + arts}

        # Verify the engines where they are (the work dir), so a failure changes nothing in the bundle.
        trial = txn.trial(with_engines(before_commit=True))
        verified = {}
        if opts.verify:
            reference = pipeline_for_bundle(bundle, backend="onnxruntime", provider="cpu", precision="fp32")
            for precision in opts.precisions:
                say(f"verifying the {precision} engines against the fp32 ONNX graphs (ONNX Runtime CPU)")
                candidate = pipeline_for_bundle(trial, backend="tensorrt", precision=precision)
                report = run_verify(candidate, reference, precision)  # TensorRT's limits: verify.thresholds_for
                verified[precision] = {k: report[k] for k in ("summary", "passed", "failures")}
                del candidate
                if not report["passed"]:
                    raise ExportError(f"the {precision} TensorRT engines failed parity with the fp32 ONNX graphs: "
                                      + "; ".join(report["failures"]) + ". Nothing was added to the bundle.")
        manifest = with_engines(before_commit=False)
        manifest["tensorrt"] = {"target": target, "options": opts.as_dict(), "timing_cache": str(timing_cache),
                                "verify": {**bundle.manifest.get("tensorrt", {}).get("verify", {}), **verified}}
        txn.commit(manifest)  # engines into tensorrt/, then the manifest in one rename
    return {"bundle": str(root), "target": target, "engines": manifest["artifacts"][-len(artifacts):],
            "timing_cache": str(timing_cache), "verify": verified}
