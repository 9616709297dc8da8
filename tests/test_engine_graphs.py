"""The graphs edgelmm hands to TensorRT (export/engine_graphs.py), checked where there is no GPU:
each is strongly typed as TensorRT 11 needs it (type inference leaves no tensor untyped; every Q/DQ
is symmetric INT8 or blocked INT4 with a scale of the activation type), and each runs on ONNX
Runtime's CPU provider and passes `verify` against the PyTorch reference at the limits its engine
is judged by. Plus the guard on edgelmm's TensorRT code: no attribute that TensorRT 11 removed."""

import json
import shutil

import numpy as np
import onnx
import pytest

import edgelmm
from edgelmm.bundle import open_bundle, update_bundle
from edgelmm.export.engine_graphs import (ENGINE_VARIANTS, FP32_OPS, check_strongly_typed, graph_io,
                                          make_engine_graph, make_fp16)
from edgelmm.verify import TENSORRT_LIMITS, THRESHOLDS, reference_run, verify
from tests.conftest import KINDS


def engine_graph_set(bundle_dir, tmp_path, precision, name=None):
    """A copy of the bundle with the graphs `precision`'s engines are built from, as an ONNX set
    named `trt-<precision>` that ONNX Runtime loads like any other."""
    root = tmp_path / f"bundle-{precision}"
    shutil.copytree(bundle_dir, root)
    records = {}
    with update_bundle(root) as txn:
        manifest = txn.bundle.manifest
        fp32 = {a["graph"]: a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32"}
        int8 = next((a for a in manifest["artifacts"] if a["format"] == "onnx" and a["graph"] == "vision"
                     and a["file"].endswith("vision.int8.onnx")), None)
        added = []
        for graph, variant in ENGINE_VARIANTS[precision].items():
            dst = txn.new_file(f"onnx/{graph}.trt-{variant}.onnx")
            record = make_engine_graph(variant, graph, txn.bundle.path(fp32[graph]), dst,
                                       int8_src=txn.bundle.path(int8) if int8 else None)
            records[graph] = record
            if record["file"] != dst:    # fp32: the bundle's own graph
                added.append({**fp32[graph], "precision": f"trt-{precision}"})
                continue
            entries = txn.entries(dst)
            inputs, outputs = graph_io(dst)
            added.append({"graph": graph, "format": "onnx", "precision": f"trt-{precision}", "file": entries[0]["file"],
                          "files": entries, "sha256": entries[0]["sha256"], "inputs": inputs, "outputs": outputs})
        txn.commit({**manifest, "artifacts": manifest["artifacts"] + added})
    return root, records


def _typed(root, precision):
    bundle = open_bundle(root)
    return {a["graph"]: bundle.path(a) for a in bundle.manifest["artifacts"] if a["precision"] == f"trt-{precision}"}


# Qwen2.5-VL's graphs differ from Qwen2-VL's only by the vision tower's window mask, which the fp16
# pass treats like any other tensor: one Qwen kind keeps the suite's time.
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "qwen2.5vl"])
def test_fp16_engine_graphs_are_strongly_typed_and_pass_verify(bundle, pipelines, kind, tmp_path):
    root, records = engine_graph_set(bundle(kind), tmp_path, "fp16")
    paths = _typed(root, "fp16")
    for graph, path in paths.items():
        assert check_strongly_typed(path) == [], graph
    dec = {io["name"]: io["dtype"] for io in graph_io(paths["decoder"])[0] + graph_io(paths["decoder"])[1]}
    assert dec["inputs_embeds"] == "float16" and dec["past_key_values.0.key"] == "float16"
    assert dec["present.0.value"] == "float16" and dec["logits"] == "float32"
    assert {io["dtype"] for io in graph_io(paths["vision"])[1]} == {"float16"}
    # fp32 where fp16 is not enough: the norms' statistics, the softmax, the rotary angles
    kept = records["decoder"]["fp32_ops"]
    assert kept["ReduceMean"] >= 2 and kept["Softmax"] >= 2 and kept["Cos"] >= 1 and kept["Sin"] >= 1, kept
    # the weights are fp16: an fp32 tensor of more than a few values is read only by an op kept in fp32
    # (LayerNorm's scale and bias); the rest are epsilons, clip bounds and the like
    for graph in ("vision", "embed", "decoder"):
        model = onnx.load(str(paths[graph]))
        readers = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, set()).add(n.op_type)
        big_fp32 = {i.name: readers.get(i.name) for i in model.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 8}
        assert all(ops <= FP32_OPS for ops in big_fp32.values()), (graph, big_fp32)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 and np.prod(i.dims) > 1000 for i in model.graph.initializer)
    candidate = edgelmm.load(root, backend="onnxruntime", provider="cpu", precision="trt-fp16")
    assert candidate.backend.kv_dtype == np.float16   # the KV cache the engine would hold, in half the memory
    reference = reference_run(pipelines(kind))
    report = verify(candidate, reference, "fp16", thresholds=THRESHOLDS[TENSORRT_LIMITS["fp16"]])
    s = report["summary"]
    assert s["vision_cosine_min"] >= 0.999 and s["logits_kl_max"] <= 5e-3 and s["batch2_logits_kl_max"] <= 5e-3
    if not report["passed"]:   # only where the reference itself all but tied (see _diverges_at_a_tie)
        assert report["failures"] == [f"token_match_min = {s['token_match_min']:.2f} (limit 0.95)"], report["failures"]
        for case, ref in zip(report["cases"], reference.cases):
            if case["candidate_tokens"] != case["reference_tokens"]:
                assert _diverges_at_a_tie(pipelines(kind), ref, case["candidate_tokens"], 4 * s["logits_max_abs"])


def _diverges_at_a_tie(reference, case, candidate_tokens, tolerance):
    """Where the candidate's greedy tokens leave the reference's, the reference's own top two were
    within `tolerance` (a few times the measured logit error) and the candidate took the other one:
    the tiny random models have near-ties that any rounding flips. Replays the reference to there."""
    tokens = case.tokens
    k = next(i for i, (a, b) in enumerate(zip(tokens, candidate_tokens)) if a != b)
    n = case.embeds.shape[1]
    positions = reference.prompt_positions(case.prepared)   # [P, n]: M-RoPE families have 3 components
    cache = reference.backend.new_cache(1)
    logits = reference.backend.decode(case.embeds, np.ones((1, n), np.int64),
                                      reference.as_position_ids(positions[:, None]), cache)
    for step in range(k):
        logits = reference.decode_step(tokens[step], int(positions.max()) + 1 + step, cache)
    logits = np.asarray(logits, np.float64).reshape(-1)
    first, second = np.argsort(logits)[-2:][::-1]
    assert first == tokens[k]
    return candidate_tokens[k] == second and logits[first] - logits[second] <= tolerance


def test_left_padded_fp16_batch_stays_finite(bundle, tmp_path):
    """A float32-min mask constant enters fp16 clipped, not as -inf: a padded row's attention over
    only masked keys gives numbers, not NaN, so the batch's other row is untouched."""
    root, _ = engine_graph_set(bundle("llava-siglip"), tmp_path, "fp16")
    pipe = edgelmm.load(root, backend="onnxruntime", provider="cpu", precision="trt-fp16")
    from edgelmm.images import sample_images

    images = sample_images(2, seed=3, sizes=[(48, 64), (30, 90)])
    prompts = ["Describe <image>.", "What is in <image>? Answer in a few words, please, and be brief."]
    alone = [pipe.generate(p, [im], max_new_tokens=8).token_ids for p, im in zip(prompts, images)]
    batch = pipe.generate_batch([(p, [im]) for p, im in zip(prompts, images)], max_new_tokens=8)
    assert [r.token_ids for r in batch] == alone and all(alone)


def test_int4_engine_decoder_is_blocked_int4_with_fp16_scales(bundle, pipelines, tmp_path):
    root, records = engine_graph_set(bundle("llava-siglip"), tmp_path, "int4")
    decoder = _typed(root, "int4")["decoder"]
    assert check_strongly_typed(decoder) == []
    model = onnx.load(str(decoder), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) >= 7 * 2, "every linear layer of the two decoder layers but the lm_head"
    for n in dq:
        attrs = {a.name: a.i for a in n.attribute}
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4 and attrs["block_size"] == 32
        assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert records["decoder"]["int4"]["kept_float"][0]   # the lm_head stays float
    candidate = edgelmm.load(root, backend="onnxruntime", provider="cpu", precision="trt-int4")
    report = verify(candidate, pipelines("llava-siglip"), "int4", thresholds=THRESHOLDS[TENSORRT_LIMITS["int4"]])
    assert report["passed"], report["failures"]
    # INT4 on a random tiny model: the answers are measured, not gated; the logits stay a distribution
    assert np.isfinite(report["summary"]["logits_kl_max"])


def test_int8_engine_vision_is_symmetric_int8_with_fp16_scales(bundle, pipelines, tmp_path):
    from edgelmm.calib import CalibrationOptions, calibrate

    base = tmp_path / "calibrated"
    shutil.copytree(bundle("llava-siglip"), base)
    calibrate(base, ["int8"], CalibrationOptions(source="synthetic", calib_samples=6, eval_samples=0,
                                                 activations="s8"))
    root, records = engine_graph_set(base, tmp_path, "int8-vision+int4")
    vision = _typed(root, "int8-vision+int4")["vision"]
    assert check_strongly_typed(vision) == []
    model = onnx.load(str(vision), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq, "activations and weights are quantized"
    # every dequantized value is fp16; a Q reads fp16 activations with an fp16 scale, except after an
    # op kept in fp32 (LayerNorm), where it quantizes the fp32 value with an fp32 scale (the checker
    # has already said each scale is its input's type)
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq)
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.INT8 for n in q + dq)
    assert sum(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in q) >= len(q) // 2
    assert records["vision"]["variant"] == "int8"
    candidate = edgelmm.load(root, backend="onnxruntime", provider="cpu", precision="trt-int8-vision+int4")
    report = verify(candidate, pipelines("llava-siglip"), "int8-vision+int4",
                    thresholds=THRESHOLDS[TENSORRT_LIMITS["int8-vision+int4"]])
    assert report["passed"], report["failures"]
    assert report["summary"]["vision_cosine_min"] >= 0.99


def test_the_checker_names_what_tensorrt_refuses(tmp_path):
    from onnx import TensorProto, helper

    def save(nodes, inits, name):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
        path = tmp_path / name
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
        return path
    asymmetric = save([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                       helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
                      [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                       helper.make_tensor("zp", TensorProto.UINT8, [], [128])], "asym.onnx")
    problems = check_strongly_typed(asymmetric)
    assert any("UINT8" in p for p in problems) and any("zero point" in p for p in problems), problems
    zero = helper.make_tensor("zp0", TensorProto.INT8, [], [0])   # symmetric INT8: a zero point of zeros
    mixed = save([helper.make_node("QuantizeLinear", ["x", "s", "zp0"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s16", "zp0"], ["y16"]),
                  helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)],
                 [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                  helper.make_tensor("s16", TensorProto.FLOAT16, [], [0.1]), zero], "mixed.onnx")
    assert check_strongly_typed(mixed) == []   # Q in fp32, DQ in fp16: each scale matches its own side
    wrong_scale = save([helper.make_node("QuantizeLinear", ["x", "s16", "zp0"], ["q"]),
                        helper.make_node("DequantizeLinear", ["q", "s", "zp0"], ["y"])],
                       [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                        helper.make_tensor("s16", TensorProto.FLOAT16, [], [0.1]), zero], "wrong.onnx")
    problems = check_strongly_typed(wrong_scale)
    assert problems and "FLOAT16 is not the float type it scales (FLOAT)" in problems[0], problems


def test_fp16_conversion_keeps_exact_values_in_fp32(tmp_path):
    """Positions past 2048 are not integers in fp16: the rotary angle is computed in fp32."""
    from onnx import TensorProto, helper

    # angle = Cast(position) * inv_freq; y = x * cos(angle): x fp16 in, cos computed in fp32
    g = helper.make_graph(
        [helper.make_node("Cast", ["position_ids"], ["pos"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["pos", "inv_freq"], ["angle"]),
         helper.make_node("Cos", ["angle"], ["cos"]),
         helper.make_node("Mul", ["inputs_embeds", "cos"], ["logits"])],
        "rotary", [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, 4]),
                   helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("inv_freq", TensorProto.FLOAT, [4], [1.0, 0.1, 0.01, 0.001])])
    src = tmp_path / "rotary.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(src))
    record = make_fp16(src, tmp_path / "rotary.fp16.onnx", "decoder")
    assert record["fp32_ops"] == {"Cast": 1, "Cos": 1, "Mul": 1}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "rotary.fp16.onnx"), providers=["CPUExecutionProvider"])
    pos = np.array([[4097, 4099, 3001, 2049]], np.int64)
    x = np.ones((1, 4), np.float16)
    got = sess.run(None, {"inputs_embeds": x, "position_ids": pos})[0]
    want = np.cos(pos.astype(np.float64) * np.array([1.0, 0.1, 0.01, 0.001]))
    assert got.dtype == np.float32 and np.abs(got - want).max() < 2e-3   # fp16 angles would be off by ~1 rad


def test_fp16_conversion_streams_external_weights(tmp_path):
    """A graph whose weights live in external data gets its fp16 weights in external data too."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"])], "mm",
                          [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 512])],
                          [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(src),
              save_as_external_data=True, location="mm.onnx.data", size_threshold=0)
    dst = tmp_path / "out" / "mm.fp16.onnx"
    dst.parent.mkdir()
    make_fp16(src, dst, "decoder")
    assert (dst.parent / "mm.fp16.onnx.data").stat().st_size == w.size * 2
    assert dst.stat().st_size < 4096
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float16)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"inputs_embeds": x})[0]
    assert got.dtype == np.float32 and np.abs(got - x.astype(np.float32) @ w.astype(np.float16).astype(np.float32)).max() < 0.1


def test_graph_io_reads_types(tmp_path, bundle):
    inputs, outputs = graph_io(open_bundle(bundle("llava-siglip")).root / "onnx" / "embed.onnx")
    assert inputs[0]["name"] == "input_ids" and inputs[0]["dtype"] == "int64"
    assert json.dumps(outputs)   # plain data
