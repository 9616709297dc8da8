"""Graph quantizers over ONNX Runtime's quantization tools (workstation side: needs `onnx`).

- Vision tower: INT8 static QDQ (per-channel weights), calibrated on the sampled images, with
  sensitive nodes kept in float: first by op type (normalisation, nonlinearities, softmax, residual
  and bias adds), then by a per-node sensitivity pass until the feature cosine target is met.
- Decoder: INT4 weight-only MatMulNBits (RTN, HQQ, or GPTQ calibrated on decoder inputs from the
  sampled prompts), or dynamic INT8. The lm_head (a Gemm on the last position in our graphs) of an
  INT4 decoder becomes an 8-bit MatMulNBits by default (LM_HEAD_PRECISIONS); the token embedding (its
  own graph, which ONNX Runtime maps and reads row by row) stays fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import CalibrationError
from ..options import default_threads
from ..verify import cosine_min

VISION_METHODS = ("minmax", "entropy", "percentile")
INT4_ALGORITHMS = ("rtn", "hqq", "gptq")
# Kept in float before any measurement: where INT8 hurts transformers most (outliers in LayerNorm
# inputs and residual streams, the exponent in Softmax, the curvature of GELU).
SENSITIVE_OP_TYPES = ("LayerNormalization", "Softmax", "Add", "Erf", "Tanh", "Pow", "Div", "Gelu", "Sigmoid",
                      "ReduceMean", "Sqrt")
# What INT8 quantizes when the sensitive ops are kept in float: the ops that carry the arithmetic,
# which the sensitivity pass may then keep in float one by one. Elementwise Mul (GELU's inner
# products, attention scaling) stays float as well: ORT's QLinearMul is slower than a float Mul on
# small tensors (reference vision graph 0.362 -> 0.323 ms/image with Mul in float, cosine 0.9984 ->
# 0.9986) and it holds no weights to shrink.
COMPUTE_OP_TYPES = ("MatMul", "Conv", "Gemm")
KEPT_FLOAT_OP_TYPES = SENSITIVE_OP_TYPES + ("Mul",)
# Graphs whose weights pass this are written with external data (protobuf cannot hold 2 GB).
LARGE_GRAPH_BYTES = 1_500_000_000

# The entropy calibrator's histogram: at ORT's default (128 bins for 128 quantized bins) there is one
# candidate threshold, the full range, and it degenerates to MinMax. quantize_static cannot pass it.
ENTROPY_OPTIONS = {"num_bins": 2048, "num_quantized_bins": 255}


def is_large_graph(src: Path) -> bool:
    """Whether the graph at `src` holds more than LARGE_GRAPH_BYTES of weights: the .onnx file and
    its external data together (the exporter writes those beside it, named after it). The .onnx
    file alone of a large model is a few MB."""
    total = sum(p.stat().st_size for p in src.parent.iterdir() if p.name.startswith(src.name) and p.is_file())
    return total > LARGE_GRAPH_BYTES


@contextlib.contextmanager
def quiet_quantization():
    """ORT's quantization tools print progress to stdout and configure the root logger at import;
    keep both out of the user's terminal (and out of --json output)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # A handler of our own stops logging.warning() from calling basicConfig on the root logger.
    root.handlers[:] = [logging.NullHandler()]
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import calls basicConfig)
            root.handlers[:] = [logging.NullHandler()]
            root.setLevel(logging.ERROR)
            yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


class FeedReader:
    """ORT's CalibrationDataReader over a list of feed dicts; re-iterable (GPTQ deep-copies it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def __deepcopy__(self, memo):
        return FeedReader(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = threads or default_threads()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _session_without_arena(path: str):
    """The calibrator's session as ORT makes it (no graph optimization: the augmented outputs keep
    their names) but without the CPU memory arena. The unoptimized graph's activations of one tile
    are gigabytes, and the arena keeps its largest run and grows by doubling: a SigLIP-so400m tower
    held 11.5 GB through calibration, a SmolVLM tower grew 2 GB a tile; without it, each run's
    memory goes back when the run ends (SmolVLM: 0.8 GB between tiles, 3.0 GB at most)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    if default_threads():
        opts.intra_op_num_threads = default_threads()
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@dataclass
class VisionInt8Result:
    method: str
    per_channel: bool
    activations: str
    excluded_by_op_type: list[str]
    excluded_by_sensitivity: list[dict[str, Any]] = field(default_factory=list)
    cosine_min: float = 0.0           # on the held-out tiles, against the fp32 graph
    cosine_target: float = 0.0
    max_abs: float = 0.0
    calibration_tiles: int = 0        # the tiles the activation ranges were computed from
    scored_tiles: int = 0             # the held-out tiles cosine_min and max_abs are measured on

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "per_channel": self.per_channel, "activations": self.activations,
                "excluded_op_types": sorted({n.split(":")[0] for n in self.excluded_by_op_type}),
                "excluded_by_op_type": len(self.excluded_by_op_type),
                "excluded_nodes": [n.split(":", 1)[1] for n in self.excluded_by_op_type]
                + [e["node"] for e in self.excluded_by_sensitivity],
                "excluded_by_sensitivity": self.excluded_by_sensitivity,
                "cosine_min": self.cosine_min, "cosine_target": self.cosine_target, "max_abs": self.max_abs,
                "calibration_tiles": self.calibration_tiles, "scored_tiles": self.scored_tiles}


def quantize_vision_int8(src: Path, dst: Path, calib: Iterable[dict[str, np.ndarray]],
                         held_out: list[tuple[dict[str, np.ndarray], np.ndarray]], *, method: str = "minmax",
                         cosine_target: float = 0.995, exclude_sensitive_ops: bool = True, sensitivity: bool = True,
                         per_channel: bool = True, activations: str = "u8",
                         progress: Callable[[str], None] | None = None) -> VisionInt8Result:
    """INT8 QDQ vision graph at `dst`. `calib` gives the calibration feeds, one tile each (iterated
    once, twice for entropy and percentile: a list, or a calib.TileFeeds that makes them on demand);
    `held_out` pairs held-out tile feeds with the fp32 graph's output for them. Calibration ranges
    are computed once (cached) and reused for every exclusion set the sensitivity pass tries."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in VISION_METHODS:
        raise CalibrationError(f"unknown INT8 calibration method {method!r}; choose from {', '.join(VISION_METHODS)}")
    if activations not in ("u8", "s8"):
        raise CalibrationError(f"activations must be 'u8' (CPU kernels) or 's8' (symmetric, for TensorRT), got {activations!r}")
    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    graph = onnx.load(str(src), load_external_data=False).graph
    by_type = [f"{n.op_type}:{n.name}" for n in graph.node if exclude_sensitive_ops and n.op_type in KEPT_FLOAT_OP_TYPES]
    # Without the exclusions, every op ORT can quantize is (the configuration the gate must refuse).
    op_types = list(COMPUTE_OP_TYPES) if exclude_sensitive_ops else None
    base_excluded = [n.split(":", 1)[1] for n in by_type]
    large = is_large_graph(src)
    extra = {"ActivationSymmetric": activations == "s8"}

    with tempfile.TemporaryDirectory(prefix="edgelmm-int8-", dir=dst.parent) as tmp:
        cache = Path(tmp) / "ranges.json"

        def build(excluded: list[str], out: Path, only: list[str] | None = None) -> None:
            with quiet_quantization(), _as_calibration_error(f"INT8 {method} quantization of {src.name}"):
                quantize_static(str(src), str(out), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8, calibrate_method=calib_method,
                                nodes_to_exclude=excluded, nodes_to_quantize=only, op_types_to_quantize=op_types,
                                calibration_cache_path=str(cache),
                                use_external_data_format=large, extra_options=dict(extra))

        def score(path: Path, pairs=held_out) -> tuple[float, float]:
            sess = _session(path)
            cos, max_abs = 1.0, 0.0
            for feed, ref in pairs:
                out = sess.run(None, feed)[0]
                cos, max_abs = min(cos, cosine_min(ref, out)), max(max_abs, float(np.abs(ref - out).max()))
            return cos, max_abs

        if progress:
            progress(f"calibrating INT8 ranges ({method}, one tile at a time)")
        tiles = _calibrate_ranges(src, calib, calib_method, op_types, cache, Path(tmp), large)
        build(base_excluded, dst)
        cos, max_abs = score(dst)
        result = VisionInt8Result(method, per_channel, activations, by_type, cosine_min=cos,
                                  cosine_target=cosine_target, max_abs=max_abs, calibration_tiles=tiles,
                                  scored_tiles=len(held_out))
        if cos >= cosine_target or not sensitivity:
            return result
        # Per-node sensitivity: quantize each compute node alone and measure what it costs.
        candidates = [n for n in graph.node if n.op_type in COMPUTE_OP_TYPES and n.name not in base_excluded]
        probe = held_out[:4]
        ranking = []
        for i, node in enumerate(candidates):
            if progress:
                progress(f"INT8 sensitivity {i + 1}/{len(candidates)}: {node.name}")
            alone = Path(tmp) / "alone.onnx"
            build(base_excluded, alone, only=[node.name])
            ranking.append((score(alone, probe)[0], node))
        ranking.sort(key=lambda r: r[0])  # lowest cosine = most sensitive
        excluded = list(base_excluded)
        for cos_alone, node in ranking:
            excluded.append(node.name)
            result.excluded_by_sensitivity.append({"node": node.name, "op": node.op_type,
                                                   "cosine_alone": round(cos_alone, 6)})
            if progress:
                progress(f"INT8: keeping {len(result.excluded_by_sensitivity)} sensitive node(s) in float")
            build(excluded, dst)
            result.cosine_min, result.max_abs = score(dst)
            if result.cosine_min >= cosine_target:
                break
        return result


def _calibrate_ranges(src: Path, calib: Iterable[dict[str, np.ndarray]], method, op_types: list[str] | None,
                      cache: Path, tmp: Path, large: bool) -> int:
    """Activation ranges of the tensors quantize_static calibrates, written to its range cache;
    returns the number of tiles. ORT's calibrators hold every output of every feed passed to one
    collect_data call (the histogram methods: every calibrated tensor, ~1.5 GB per 512-px tile of
    SmolVLM's SigLIP), so each tile gets its own call and only running ranges or histograms stay.
    The histogram methods first take each tensor's full range (MinMax) and bin every tile on it,
    as ORT bins data given all at once: in ORT's streaming merge the first tile would set the bin
    width and wider later tiles add bins, thousands more for the entropy search to scan."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # What quantize_static calibrates when it is not told which op types to quantize.
    op_types = op_types or sorted(set(QLinearOpsRegistry) | set(QDQRegistry))

    def stream(kind: CalibrationMethod, seeded=None):
        calibrator = create_calibrator(src, op_types, augmented_model_path=str(tmp / f"augmented-{kind.name}.onnx"),
                                       calibrate_method=kind, use_external_data_format=large,
                                       extra_options=ENTROPY_OPTIONS if kind == CalibrationMethod.Entropy else {})
        calibrator.infer_session = _session_without_arena(calibrator.augmented_model_path)
        if seeded is not None:
            _seed_histograms(calibrator, seeded)
            if kind == CalibrationMethod.Entropy:  # the same thresholds, without ORT's per-bin Python loops
                calibrator.collector.get_entropy_threshold = entropy_threshold
        tiles = 0
        for feed in calib:
            calibrator.collect_data(FeedReader([feed]))
            tiles += 1
        if not tiles:
            raise CalibrationError("no calibration tiles: INT8 ranges need at least one image")
        return calibrator.compute_data(), tiles

    with quiet_quantization(), _as_calibration_error(f"INT8 {method.name} calibration of {src.name}"):
        ranges, tiles = stream(CalibrationMethod.MinMax)
        if method != CalibrationMethod.MinMax:
            ranges, tiles = stream(method, seeded=ranges)
        save_tensors_data(ranges, cache)
    return tiles


def entropy_threshold(histogram, num_quantized_bins: int):
    """ORT's HistogramCollector.get_entropy_threshold (TensorRT's KL-divergence search) with its inner
    loops as array operations: for each candidate range, the outliers folded into the end bins (p),
    the slice merged into `num_quantized_bins` bins and spread back over p's non-zero bins (q), both
    smoothed, then their KL divergence. Every step is ORT's arithmetic in ORT's order and types
    (integer counts, float32 smoothing and divergence), so the thresholds are bit for bit ORT's
    (tests/test_calib_memory.py compares them); ORT sums bins with Python's sum(), ~20x slower:
    minutes per vision tower at 2048 bins."""
    def smooth(counts: np.ndarray, eps: float = 0.0001) -> np.ndarray | None:   # quant_utils.smooth_distribution
        zeros = counts == 0
        n_zeros = int(np.count_nonzero(zeros))
        if n_zeros == counts.size:
            return None
        eps1 = eps * float(n_zeros) / float(counts.size - n_zeros)
        if eps1 >= 1.0:   # ORT asserts here; a candidate this sparse is no candidate
            return None
        out = counts.astype(np.float32)
        out += np.where(zeros, np.float32(eps), np.float32(-eps1))
        return out

    def divergence(pk: np.ndarray, qk: np.ndarray) -> np.float32:   # calibrate.entropy; all bins > 0 here
        pk = pk / np.sum(pk)
        qk = qk / np.sum(qk)
        return np.sum(pk * np.log(pk / qk))

    hist, edges = histogram[0], histogram[1]
    num_bins = hist.size
    zero = num_bins // 2
    half = num_quantized_bins // 2
    cumulative = np.concatenate([[0], np.cumsum(hist)])     # outlier counts without re-summing
    total = cumulative[-1]
    candidates, divergences = [], []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += cumulative[start]
        p[-1] += total - cumulative[end]
        nonzero = (p != 0).astype(np.int64)
        merged = sliced.size // num_quantized_bins
        whole = num_quantized_bins * merged
        quantized = sliced[:whole].reshape(num_quantized_bins, merged).sum(axis=1).astype(np.int64)
        quantized[-1] += sliced[whole:].sum().astype(np.int64)
        norm = nonzero[:whole].reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.where(norm != 0, quantized / np.maximum(norm, 1), 0.0)
        q[:whole] = np.repeat(spread, merged)       # float -> int64 truncates, as ORT's slice assignment does
        q[:whole][np.repeat(norm == 0, merged)] = 0
        p, q = smooth(p), smooth(q)
        candidates.append((edges[start], edges[end]))
        divergences.append(np.inf if p is None or q is None else np.array(divergence(p, q), dtype=edges.dtype))
    lo, hi = candidates[int(np.argmin(np.array(divergences, dtype=np.float64)))]
    if lo < histogram[2]:
        lo = histogram[2]
    if hi > histogram[3]:
        hi = histogram[3]
    return lo, hi


def _seed_histograms(calibrator, ranges) -> None:
    """Give a histogram calibrator an empty histogram per tensor over the tensor's full range (as
    HistogramCollector makes them: collect_value's (counts, edges, min, max, threshold), and for
    symmetric percentile collect_absolute_value's histogram of |x|, (counts, edges, min, max))."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    c = calibrator
    c.collector = HistogramCollector(method=c.method, symmetric=c.symmetric, num_bins=c.num_bins,
                                     num_quantized_bins=c.num_quantized_bins, percentile=c.percentile,
                                     scenario=c.scenario)
    absolute = c.method == "percentile" and c.symmetric
    none = np.empty(0, np.float32)
    for name in c.tensors_to_calibrate:
        lo, hi = (np.float32(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
        top = np.float32(max(abs(lo), abs(hi)))
        if absolute:
            bottom = np.float32(0 if lo <= 0 <= hi else min(abs(lo), abs(hi)))
            counts, edges = np.histogram(none, c.num_bins, range=(bottom, top))
            c.collector.histogram_dict[name] = (counts, edges.astype(np.float32), lo, hi)
        else:
            counts, edges = np.histogram(none, c.num_bins, range=(-top, top))
            c.collector.histogram_dict[name] = (counts, edges, lo, hi, np.array(top, np.float32))


@contextlib.contextmanager
def _as_calibration_error(what: str):
    """ORT's quantizers raise whatever their internals raise; the user needs to know which step failed."""
    try:
        yield
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _clear_value_info(src: Path, dst: Path) -> Path:
    """The dynamo exporter's value_info can carry shapes ONNX shape inference later disagrees with
    (ORT's dynamic quantizer re-infers and fails); the graph does not need them."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    onnx.save(model, str(dst), save_as_external_data=is_large_graph(src))
    return dst


def lm_head_nodes(path: Path) -> list[str]:
    """The node(s) producing the logits output: kept at higher precision by default."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    out = [n for n in graph.node if "logits" in n.output]
    # a head with a bias: MatMul then Add; the MatMul is the head
    out += [producer[i] for n in out if n.op_type == "Add" for i in n.input
            if i in producer and producer[i].op_type in ("MatMul", "Gemm")]
    return [n.name for n in out]


# The lm_head of an INT4 decoder: vocabulary x hidden, a third of a Mantis-1B decoder's weights
# (128256 x 2048: 1.05 GB in fp32 beside 0.62 GB for all 16 layers in INT4), and the one matmul a
# decode step cannot skip. 8 bits (symmetric, blocks of 32) keeps it near-lossless as llama.cpp's
# Q6_K output does (logits cosine 0.99997 on a random 128256 x 2048 head, 4 bits 0.9953) at a quarter
# of the memory, and its kernel is 2.6x faster than the fp32 Gemm on one core.
LM_HEAD_PRECISIONS = {"int8": 8, "int4": 4, "fp32": None}
# Rows of the lm_head packed at a time (bounds the float temporaries to ~100 MB at hidden 2048).
_LM_HEAD_ROWS = 4096


def _pack_nbits(weight_rows: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, K] of a weight (output channels by input) -> MatMulNBits' B [n, blocks, block bytes]
    and scales [n, blocks], symmetric: no zero points, so the kernel's default (2^(bits-1)) applies."""
    n, k = weight_rows.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight_rows
    padded = padded.reshape(n, blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(padded).max(-1) / qmax
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(padded / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.astype(np.uint8)
    if bits == 4:  # two per byte, the even element in the low nibble
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scales.astype(np.float32)


def quantize_lm_head(model, bits: int, block_size: int = 32, accuracy_level: int | None = 4) -> dict[str, Any] | None:
    """Replace the logits projection of `model` (an onnx ModelProto, weights loaded) with a
    MatMulNBits of `bits`, in place. Takes a Gemm (alpha 1, weight [vocab, hidden] with transB, as
    our exporter writes it) or a MatMul on a [hidden, vocab] weight; returns what was done, or None
    when the graph's lm_head is neither (or its weight is shared) and stays as it is."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = [n for n in graph.node if "logits" in n.output]
    inits = {i.name: i for i in graph.initializer}
    if len(nodes) != 1 or len(nodes[0].input) < 2 or nodes[0].input[1] not in inits:
        return None
    node, weight_init = nodes[0], inits[nodes[0].input[1]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if weight_init.data_type != onnx.TensorProto.FLOAT or len(weight_init.dims) != 2:
        return None
    if sum(weight_init.name in n.input for n in graph.node) != 1:
        return None
    if node.op_type == "Gemm" and attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 \
            and (len(node.input) < 3 or attrs.get("beta", 1.0) == 1.0):
        rows_of = lambda w, a, b: w[a:b]  # noqa: E731  [vocab, hidden]: rows are output channels
        n_out, k = weight_init.dims
    elif node.op_type == "MatMul":
        rows_of = lambda w, a, b: w[:, a:b].T  # noqa: E731  [hidden, vocab]
        k, n_out = weight_init.dims
    else:
        return None
    if weight_init.raw_data:  # a view, not a second copy of a 1 GB tensor
        weight = np.frombuffer(weight_init.raw_data, np.float32).reshape(tuple(weight_init.dims))
    else:
        weight = numpy_helper.to_array(weight_init)
    blocks = -(-k // block_size)
    packed = np.empty((n_out, blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n_out, blocks), np.float32)
    for start in range(0, n_out, _LM_HEAD_ROWS):
        end = min(start + _LM_HEAD_ROWS, n_out)
        packed[start:end], scales[start:end] = _pack_nbits(np.asarray(rows_of(weight, start, end), np.float32),
                                                           bits, block_size)
    del weight
    name = weight_init.name
    graph.initializer.remove(weight_init)
    graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_Q{bits}"),
                              numpy_helper.from_array(scales.reshape(-1), f"{name}_scales")])
    del packed, scales
    inputs = [node.input[0], f"{name}_Q{bits}", f"{name}_scales"]
    if len(node.input) > 2 and node.input[2]:  # a bias goes in MatMulNBits' sixth input
        inputs += ["", "", node.input[2]]
    kwargs = {"accuracy_level": accuracy_level} if accuracy_level is not None else {}
    replacement = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                                   domain="com.microsoft", K=k, N=n_out, bits=bits, block_size=block_size, **kwargs)
    at = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(at, replacement)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"node": replacement.name, "bits": bits, "block_size": block_size, "symmetric": True,
            "accuracy_level": accuracy_level}


def quantize_decoder_int4(src: Path, dst: Path, *, algorithm: str = "rtn", block_size: int = 32,
                          accuracy_level: int | None = 4, symmetric: bool = False,
                          calib: list[dict] | None = None, lm_head: str = "int8") -> dict[str, Any]:
    """MatMulNBits INT4 decoder at `dst`, its lm_head at `lm_head` (LM_HEAD_PRECISIONS); returns what
    was done, for the manifest."""
    if algorithm not in INT4_ALGORITHMS:
        raise CalibrationError(f"unknown INT4 algorithm {algorithm!r}; choose from {', '.join(INT4_ALGORITHMS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise CalibrationError(f"INT4 block size must be a power of two >= 16, got {block_size}")
    if lm_head not in LM_HEAD_PRECISIONS:
        raise CalibrationError(f"unknown lm_head precision {lm_head!r}; choose from {', '.join(LM_HEAD_PRECISIONS)}")
    # The weight-only quantizers see MatMuls; the lm_head (a Gemm) is done here after them, with
    # its own bits, so it never goes through GPTQ/HQQ.
    keep = lm_head_nodes(src)
    head = None
    with quiet_quantization(), _as_calibration_error(f"INT4 {algorithm} quantization of {src.name}"):
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     GPTQWeightOnlyQuantConfig,
                                                                     HQQWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)
        if algorithm == "rtn":
            config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                  accuracy_level=accuracy_level)
        elif algorithm == "hqq":
            try:
                import torch  # noqa: F401  (ORT's HQQ runs its optimisation in torch)
            except ImportError:
                raise CalibrationError("INT4 HQQ needs torch (pip install 'edgelmm[export]'); "
                                       "RTN and GPTQ do not") from None
            config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
        else:
            if not calib:
                raise CalibrationError("INT4 GPTQ needs calibration samples (decoder inputs)")
            config = GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(calib), block_size=128)
        quantizer = MatMulNBitsQuantizer(str(src), block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=keep, algo_config=config)
        quantizer.process()
        if LM_HEAD_PRECISIONS[lm_head]:
            head = quantize_lm_head(quantizer.model.model, LM_HEAD_PRECISIONS[lm_head], block_size, accuracy_level)
        quantizer.model.save_model_to_file(str(dst), is_large_graph(src))
    if LM_HEAD_PRECISIONS[lm_head] and head is None:
        raise CalibrationError(f"lm_head {lm_head} was asked for but {src.name}'s logits do not come from one "
                               "Gemm/MatMul on a weight of its own; use lm_head fp32")
    return {"scheme": "int4 weight-only (MatMulNBits)", "algorithm": algorithm, "block_size": block_size,
            "accuracy_level": accuracy_level, "symmetric": symmetric if algorithm == "rtn" else None,
            "calibration_prompts": len(calib or []) if algorithm == "gptq" else 0,
            "lm_head": head or "fp32",
            "kept_float": ([] if head else keep) + ["embed graph (token embedding)"]}


def quantize_decoder_int4_qdq(src: Path, dst: Path, *, block_size: int = 32) -> dict[str, Any]:
    """INT4 weight-only decoder in standard ONNX (opset 21 DequantizeLinear with int4 weights and a
    block size, then MatMul) for TensorRT, whose parser has no MatMulNBits. Symmetric (TensorRT's
    dequantize takes no zero points); ONNX Runtime runs it too, which is how it is checked off a GPU.
    The lm_head stays float: TensorRT's blocked dequantize is INT4/FP8 only, and INT4 costs it too
    much (LM_HEAD_PRECISIONS)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise CalibrationError(f"INT4 block size must be a power of two >= 16, got {block_size}")
    keep = lm_head_nodes(src)
    with quiet_quantization(), _as_calibration_error(f"INT4 QDQ quantization of {src.name}"):
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                              quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(str(src), block_size=block_size, is_symmetric=True,
                                         nodes_to_exclude=keep, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), is_large_graph(src))
    return {"scheme": "int4 weight-only (QDQ DequantizeLinear, blocked, symmetric)", "algorithm": "rtn",
            "block_size": block_size, "kept_float": keep + ["embed graph (token embedding)"]}


def quantize_decoder_int8_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic INT8 decoder (weights per-channel INT8, activations quantized on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgelmm-int8d-", dir=dst.parent) as tmp:
        clean = _clear_value_info(src, Path(tmp) / "decoder.onnx")
        with quiet_quantization(), _as_calibration_error(f"dynamic INT8 quantization of {src.name}"):
            quantize_dynamic(str(clean), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8,
                             use_external_data_format=is_large_graph(src))
    return {"scheme": "dynamic int8 (MatMulInteger)", "per_channel": True, "kept_float": lm_head_nodes(src)}
