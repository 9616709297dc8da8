"""Platform detection, backend probes, the fallback chain, `edgelmm doctor`, and the graph-level
facts the TensorRT backend stands on (checked here with ONNX Runtime, since TensorRT needs a GPU)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgelmm.bundle import Bundle, open_bundle
from edgelmm.cli import app
from edgelmm.errors import BackendUnavailable
from edgelmm.runtimes.onnxruntime import nvidia_gpu_present
from edgelmm.runtimes.select import (Platform, Probe, choose, detect_platform, engine_incompatibility, jetpack_for,
                                     parse_nv_tegra_release, plan)

ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


def fake_root(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path


CPUINFO = "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nprocessor\t: 1\n"


def test_jetson_orin_jetpack6(tmp_path):
    root = fake_root(tmp_path, {
        "etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
                                "DATE: Fri Sep 13 04:36:44 UTC 2024\n",
        "proc/device-tree/model": b"NVIDIA Jetson AGX Orin Developer Kit\x00",
        "proc/cpuinfo": CPUINFO, "proc/meminfo": "MemTotal:       65890176 kB\n", "dev/nvhost-ctrl-gpu": "",
    })
    p = detect_platform(root)
    assert (p.kind, p.l4t, p.jetpack, p.machine) == ("jetson", "36.4.0", "6.1", "aarch64")
    assert p.jetson_model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert p.has_gpu and p.cpu_count == 2 and p.memory_mib == 64345
    assert p.expected_stack == {"cuda": "12.6", "tensorrt": "10.3"}
    assert p.gpu_device_nodes == ["dev/nvhost-ctrl-gpu"]


def test_jetson_releases_and_containers(tmp_path):
    assert parse_nv_tegra_release("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref") == "35.4.1"
    assert parse_nv_tegra_release("# R32 (release), REVISION: 7.1, GCID: ...") == "32.7.1"
    assert parse_nv_tegra_release("garbage") is None
    assert jetpack_for("35.4.1") == "5.1.2" and jetpack_for("36.4.3") == "6.2"
    # a point release not in the table: the nearest earlier known one of the same line, marked '+'
    assert jetpack_for("36.4.1") == "6.1+" and jetpack_for("36.4.9") == "6.2.1+"
    assert jetpack_for("99.1.0") is None
    # JetPack 5: TensorRT 8.5, so the TensorRT backend (TensorRT 10) is not for it
    root = fake_root(tmp_path / "jp5", {"etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 1",
                                        "proc/device-tree/model": b"NVIDIA Jetson Xavier NX Developer Kit\x00"})
    p = detect_platform(root)
    assert p.jetpack == "5.1.2" and p.expected_stack["tensorrt"] == "8.5"
    # a container without the L4T file: still a Jetson, from the device tree, with a note
    root = fake_root(tmp_path / "ctr", {"proc/device-tree/compatible": b"nvidia,p3768-0000+p3767-0005\x00nvidia,tegra234\x00"})
    p = detect_platform(root)
    assert p.kind == "jetson" and p.jetpack is None and "nv_tegra_release" in p.notes[0]


def test_desktop_gpu_and_cpu_hosts(tmp_path):
    root = fake_root(tmp_path / "desk", {
        "proc/driver/nvidia/version": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 "
                                      "22:23:56 UTC 2024\nGCC version:  gcc version 12.3.0\n",
        "proc/driver/nvidia/gpus/0000:01:00.0/information": "Model: \t\t NVIDIA GeForce RTX 4090\nIRQ:   \t\t 187\n",
        "dev/nvidia0": "", "dev/nvidiactl": "",
    })
    p = detect_platform(root)
    assert (p.kind, p.driver) == ("nvidia-gpu", "550.54.15")
    assert p.gpus == [{"name": "NVIDIA GeForce RTX 4090", "bus": "0000:01:00.0"}]
    assert p.gpu_device_nodes == ["dev/nvidia0"] and p.has_gpu
    p = detect_platform(fake_root(tmp_path / "cpu", {"proc/cpuinfo": CPUINFO}))
    assert p.kind == "cpu" and not p.has_gpu and p.gpus == [] and p.jetpack is None


def test_the_real_machine():
    p = detect_platform()
    assert p.has_gpu == nvidia_gpu_present()
    assert p.cpu_count >= 1 and p.memory_mib and p.memory_mib > 0
    if not p.has_gpu:
        assert p.kind == "cpu" and p.gpus == []


def _fake_bundle(formats: dict[str, list[str]], target=ORIN) -> Bundle:
    arts = []
    for fmt, precisions in formats.items():
        for precision in precisions:
            graphs = ("llm", "mmproj") if fmt == "gguf" else ("vision", "embed", "decoder")
            for graph in graphs:
                art = {"graph": graph, "format": fmt, "precision": precision, "file": f"{fmt}/{graph}"}
                if fmt == "tensorrt":
                    art["engine"] = {"target": target}
                arts.append(art)
    return Bundle(Path("/nonexistent/bundle"), {"artifacts": arts})


def _probe(runs: set[str]):
    return lambda name: Probe(name, True, name in runs, "x", "ran" if name in runs else "does not run", "install it")


JETSON = Platform(kind="jetson", machine="aarch64", cpu="ARMv8", cpu_count=8, memory_mib=30000, jetpack="6.1")
CPU = Platform(kind="cpu", machine="x86_64", cpu="x", cpu_count=2, memory_mib=8000)
EVERYTHING = {"tensorrt", "onnxruntime:TensorrtExecutionProvider", "onnxruntime:CUDAExecutionProvider",
              "onnxruntime:CPUExecutionProvider", "llamacpp", "llamacpp:gpu-offload"}


def test_fallback_chain_order():
    full = _fake_bundle({"tensorrt": ["fp16", "int8-vision+int4"], "onnx": ["fp32"], "gguf": ["q4_k_m"]})
    chosen, chain = choose(full, JETSON, _probe(EVERYTHING), engine_target=ORIN)
    assert (chosen.backend, chosen.precision) == ("tensorrt", "int8-vision+int4") and chain == [chosen]
    assert [c.label() for c in plan(full, JETSON, _probe(EVERYTHING), ORIN)] == [
        "tensorrt int8-vision+int4", "onnxruntime/tensorrt", "onnxruntime/cuda", "llamacpp/gpu", "onnxruntime/cpu",
        "llamacpp/cpu"]
    # engines from another GPU or TensorRT: passed over with the command that fixes it
    other = {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt": "10.3.0"}
    chosen, chain = choose(full, JETSON, _probe(EVERYTHING), engine_target=other)
    assert chosen.label() == "onnxruntime/tensorrt"
    assert "build-engines" in chain[0].reason and "compute 8.7" in chain[0].reason
    # a GPU whose onnxruntime has no GPU provider working: llama.cpp offload, then the CPU
    chosen, _ = choose(full, JETSON, _probe(EVERYTHING - {"tensorrt", "onnxruntime:TensorrtExecutionProvider",
                                                         "onnxruntime:CUDAExecutionProvider"}), engine_target=ORIN)
    assert chosen.label() == "llamacpp/gpu"
    # a CPU host never probes the GPU candidates: they are passed over for want of a GPU
    asked = []

    def counting(name):
        asked.append(name)
        return _probe(EVERYTHING)(name)

    chosen, chain = choose(full, CPU, counting)
    assert chosen.label() == "onnxruntime/cpu"
    assert all(c.reason == "no NVIDIA GPU on this machine" for c in chain[:4])
    assert asked == ["onnxruntime:CPUExecutionProvider"]
    # GGUF only: llama.cpp on the CPU
    chosen, _ = choose(_fake_bundle({"gguf": ["f16"]}), CPU, _probe(EVERYTHING))
    assert chosen.label() == "llamacpp/cpu"
    # nothing runs: a typed error listing every candidate and why
    with pytest.raises(BackendUnavailable, match="onnxruntime/cpu: does not run; install it"):
        choose(_fake_bundle({"onnx": ["fp32"]}), CPU, _probe(set()))


def test_auto_precision_per_provider(monkeypatch):
    """What precision="auto" takes on ONNX Runtime: on CPU the smallest gated calibrated set; on the
    CUDA provider fp16, else the INT4 decoder but never INT8 QDQ vision (measured slower there than
    fp32 on an H100); on the TensorRT provider, which fuses QDQ, the CPU order after fp16."""
    from edgelmm import api
    from edgelmm.runtimes import onnxruntime as ort_backend

    calibrated = _fake_bundle({"onnx": ["fp32", "int8", "int4", "int8-vision+int4"]})
    calibrated.manifest["quality"] = {p: {"passed": True} for p in ("int8", "int4", "int8-vision+int4")}
    with_fp16 = _fake_bundle({"onnx": ["fp32", "fp16", "int8-vision+int4"]})
    with_fp16.manifest["quality"] = {"int8-vision+int4": {"passed": True}}
    refused = _fake_bundle({"onnx": ["fp32", "int8-vision+int4"]})
    refused.manifest["quality"] = {"int8-vision+int4": {"passed": False}}

    float_only = _fake_bundle({"onnx": ["fp32", "fp16"]})   # fp16 is for GPUs: slower and less exact on a CPU
    monkeypatch.setattr(ort_backend, "nvidia_gpu_present", lambda: False)
    assert [api.pick_precision(b, "auto") for b in (calibrated, with_fp16, refused, float_only)] == \
        ["int8-vision+int4", "int8-vision+int4", "fp32", "fp32"]
    # describe()["precision_reason"] says why: the order, the gate, and what failed it
    assert api._auto_onnx_precision(calibrated, "auto")[1] == (
        "auto: the first of int8-vision+int4, int4, int8, fp32 that this bundle has for the CPU and that passed "
        "its quality gate")
    assert api._auto_onnx_precision(refused, "auto")[1] == (
        "auto: the first of int8-vision+int4, int4, int8, fp32 that this bundle has for the CPU "
        "(int8-vision+int4 failed the gate)")
    monkeypatch.setattr(ort_backend, "nvidia_gpu_present", lambda: True)
    assert [api.pick_precision(b, "cuda") for b in (calibrated, with_fp16, refused, float_only)] == \
        ["int4", "fp16", "fp32", "fp16"]
    assert [api.pick_precision(b, "tensorrt") for b in (calibrated, with_fp16)] == ["int8-vision+int4", "fp16"]
    assert api.pick_precision(calibrated, "cpu") == "int8-vision+int4"


def test_verify_limits_follow_the_runtime():
    """fp32 graphs are held to fp32 limits wherever they compute in fp32 (CPU, CUDA without TF32);
    TensorRT, which computes in TF32/fp16, to fp16 limits, its quantized engines on the vision cosine."""
    from types import SimpleNamespace

    from edgelmm.verify import THRESHOLDS, thresholds_for

    def runs_on(**about):
        return SimpleNamespace(backend=SimpleNamespace(describe=lambda: about))

    assert thresholds_for(runs_on(backend="onnxruntime", providers=["CPUExecutionProvider"]), "fp32") == THRESHOLDS["fp32"]
    cuda = runs_on(backend="onnxruntime", providers=["CUDAExecutionProvider"], provider_options={"use_tf32": "0"})
    assert thresholds_for(cuda, "fp32") == THRESHOLDS["fp32"] and thresholds_for(cuda, "fp16") == THRESHOLDS["fp16"]
    ort_trt = runs_on(backend="onnxruntime", providers=["TensorrtExecutionProvider"],
                      provider_options={"trt_fp16_enable": "1"})
    assert thresholds_for(ort_trt, "fp32") == THRESHOLDS["fp16"] and thresholds_for(ort_trt, "int8") == THRESHOLDS["int8"]
    assert thresholds_for(runs_on(backend="tensorrt"), "fp32") == THRESHOLDS["fp16"]
    assert thresholds_for(runs_on(backend="tensorrt"), "int8-vision+int4") == THRESHOLDS["int8"]
    assert thresholds_for(runs_on(backend="llamacpp"), "q4_k_m") == THRESHOLDS["q4_k_m"]


def test_engine_compatibility_rules():
    assert engine_incompatibility(ORIN, dict(ORIN)) is None
    # same compute capability, another model name: loads (possibly slower), not refused
    assert engine_incompatibility(ORIN, {**ORIN, "gpu": "Jetson AGX Orin 64GB"}) is None
    why = engine_incompatibility(ORIN, {**ORIN, "tensorrt": "10.7.0"})
    assert "TensorRT 10.3.0 built it" in why and "10.7.0" in why
    why = engine_incompatibility(ORIN, {"gpu": "H100", "compute_capability": "9.0", "tensorrt": "10.3.0"})
    assert "compute 8.7" in why and "compute 9.0" in why


def test_auto_on_this_machine_says_why(reference_bundle):
    import edgelmm

    pipe = edgelmm.load(reference_bundle)
    sel = pipe.describe()["selection"]
    chain = plan(open_bundle(reference_bundle))
    first = next(c for c in chain if c.usable)
    assert sel["chosen"] == first.label() and sel["reason"] == first.reason
    if not nvidia_gpu_present():
        assert sel["chosen"] == "onnxruntime/cpu" and pipe.backend.providers == ["CPUExecutionProvider"]
        assert ("tensorrt: the bundle has no TensorRT engines (build them on this device with `edgelmm build-engines "
                "BUNDLE`)") in sel["passed_over"]
        assert "onnxruntime/cuda: no NVIDIA GPU on this machine" in sel["passed_over"]


def test_explicit_backends_that_cannot_run(reference_bundle):
    import edgelmm

    with pytest.raises(BackendUnavailable, match="build-engines"):
        edgelmm.load(reference_bundle, backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown backend 'cuda'"):
        edgelmm.load(reference_bundle, backend="cuda")
    if not nvidia_gpu_present():
        with pytest.raises(BackendUnavailable, match="provider 'cuda' was asked for"):
            edgelmm.load(reference_bundle, backend="onnxruntime", provider="cuda")


def test_torch_on_cuda_without_a_gpu_is_a_typed_error(checkpoint):
    import torch

    import edgelmm

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: test_gpu.py runs the torch reference on it")
    with pytest.raises(BackendUnavailable, match="sees no CUDA GPU"):
        edgelmm.load(checkpoint("llava-siglip"), backend="torch", device="cuda")


def test_doctor_tells_the_truth_here(reference_bundle):
    r = CliRunner().invoke(app, ["doctor", "--json", "-b", str(reference_bundle)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    probes = {p["name"]: p for p in data["probes"]}
    assert data["platform"]["has_gpu"] == nvidia_gpu_present()
    cpu = probes["onnxruntime:CPUExecutionProvider"]
    assert cpu["runs"] and cpu["detail"] == "ran on CPUExecutionProvider"
    assert probes["llamacpp"]["runs"] and "decoded a probe model" in probes["llamacpp"]["detail"]
    assert data["chosen"] == next(c["candidate"] for c in data["plan"] if c["usable"])
    if not nvidia_gpu_present():
        # onnxruntime-gpu lists CUDA and TensorRT on this machine; doctor must not believe it
        for name in ("onnxruntime:CUDAExecutionProvider", "onnxruntime:TensorrtExecutionProvider"):
            assert name in probes and not probes[name]["runs"]
        assert not probes["tensorrt"]["runs"] and not probes["llamacpp:gpu-offload"]["runs"]
        assert data["platform"]["kind"] == "cpu" and data["chosen"] == "onnxruntime/cpu"
        assert {p["name"] for p in data["probes"] if p["runs"]} <= {
            "onnxruntime:CPUExecutionProvider", "llamacpp", "torch", "opencv"}
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0 and "backends" in r.output


def test_build_engines_without_tensorrt_is_a_typed_error(reference_bundle):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: test_gpu.py builds engines")
    except ImportError:
        pass
    r = CliRunner().invoke(app, ["build-engines", str(reference_bundle), "--json"])
    assert r.exit_code == 2
    out = json.loads(r.output)
    assert out["error"] == "BackendUnavailable" and "TensorRT is not installed" in out["message"]
    r = CliRunner().invoke(app, ["build-engines", str(reference_bundle), "--precision", "int8-vision", "--json"])
    assert json.loads(r.output)["error"] == "ExportError" and "calibrate" in json.loads(r.output)["message"]
    r = CliRunner().invoke(app, ["build-engines", str(reference_bundle), "--precision", "fp8", "--json"])
    assert "unknown engine precision" in json.loads(r.output)["message"]
    # export refuses before minutes of work are spent on the ONNX graphs
    from edgelmm.models import reference_model

    out = reference_bundle.parent / "never-written"
    r = CliRunner().invoke(app, ["export", str(reference_model()), str(out), "--format", "tensorrt", "--json"])
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "BackendUnavailable" and not out.exists()


# --- what the TensorRT backend relies on, checked on ONNX Runtime -------------------------------------

def _decoder_sessions(bundle_dir: Path, other: Path | None = None):
    import onnxruntime as ort

    b = open_bundle(bundle_dir)
    src = b.path(b.artifact("decoder", "onnx", "fp32"))
    return b, ort.InferenceSession(str(src)), ort.InferenceSession(str(other)) if other else None


def _feeds(sess, text, embeds, mask, pos, past):
    f = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
    f.update(zip([i.name for i in sess.get_inputs()][3:], past))
    return f


def test_hidden_first_cache_slot_changes_nothing(reference_bundle):
    """The TensorRT backend starts its KV cache with one masked slot of zeros (profiles cannot take an
    empty past). On the same decoder graph, prefill + 3 decode steps give the same logits."""
    import edgelmm

    pipe = edgelmm.load(reference_bundle, backend="onnxruntime", provider="cpu", precision="fp32")
    from edgelmm.images import sample_images

    prep = pipe.prepare("Compare <image> with <image>. What changed?", sample_images(2, seed=3))
    embeds = pipe.merged_embeddings(prep)
    b, sess, _ = _decoder_sessions(reference_bundle)
    t = b.manifest["text"]
    n = embeds.shape[1]
    plain = [np.zeros((1, t["num_kv_heads"], 0, t["head_dim"]), np.float32)] * (2 * t["num_layers"])
    slot = [np.zeros((1, t["num_kv_heads"], 1, t["head_dim"]), np.float32)] * (2 * t["num_layers"])
    pos = np.arange(n, dtype=np.int64)[None]
    a_logits, *a_past = sess.run(None, _feeds(sess, t, embeds, np.ones((1, n), np.int64), pos, plain))
    b_logits, *b_past = sess.run(None, _feeds(sess, t, embeds, np.concatenate(
        [np.zeros((1, 1), np.int64), np.ones((1, n), np.int64)], 1), pos, slot))
    assert np.abs(a_logits - b_logits).max() < 1e-4
    for step in range(3):
        tok = int(a_logits.argmax())
        assert tok == int(b_logits.argmax())
        e = pipe.backend.embed_tokens(np.array([[tok]]))
        p = np.array([[n + step]], np.int64)
        a_logits, *a_past = sess.run(None, _feeds(sess, t, e, np.ones((1, n + step + 1), np.int64), p, a_past))
        mask = np.concatenate([np.zeros((1, 1), np.int64), np.ones((1, n + step + 1), np.int64)], 1)
        b_logits, *b_past = sess.run(None, _feeds(sess, t, e, mask, p, b_past))
        assert b_past[0].shape[2] == a_past[0].shape[2] + 1
        assert np.abs(a_logits - b_logits).max() < 1e-4


def test_int4_qdq_decoder_for_tensorrt(reference_bundle, tmp_path):
    """The INT4 graph TensorRT builds from: standard DequantizeLinear (int4, blocked, no zero points,
    no com.microsoft ops), and on ONNX Runtime it answers like fp32."""
    import onnx

    from edgelmm.calib.quantize import quantize_decoder_int4_qdq

    b = open_bundle(reference_bundle)
    src = b.path(b.artifact("decoder", "onnx", "fp32"))
    dst = tmp_path / "decoder.int4-qdq.onnx"
    info = quantize_decoder_int4_qdq(src, dst, block_size=32)
    model = onnx.load(str(dst))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert len(dq) == 7 * b.manifest["text"]["num_layers"]  # q k v o gate up down per layer; lm_head kept
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 and len(n.input) == 2 for n in dq)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in dq)
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    lm_head = next(n for n in model.graph.node if n.name == info["kept_float"][0])  # kept, unquantized
    assert all(inits[w].data_type == onnx.TensorProto.FLOAT for w in lm_head.input if w in inits)
    assert dst.stat().st_size < 0.45 * src.stat().st_size

    import onnxruntime as ort

    import edgelmm

    pipe = edgelmm.load(reference_bundle, backend="onnxruntime", provider="cpu", precision="fp32", layout="plain")
    q = ort.InferenceSession(str(dst))
    f32 = pipe.backend.sessions["decoder"]
    t = b.manifest["text"]
    kls, agree, confident = [], 0, 0
    from edgelmm.synthetic import make_split

    for sample in make_split("test", 6):  # questions the reference model was trained to answer
        prep = pipe.prepare(sample.messages, sample.images)
        embeds = pipe.merged_embeddings(prep)
        n = embeds.shape[1]
        past = [np.zeros((1, t["num_kv_heads"], 0, t["head_dim"]), np.float32)] * (2 * t["num_layers"])
        feeds = _feeds(f32, t, embeds, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], past)
        ref, got = f32.run(None, feeds)[0][0], q.run(None, feeds)[0][0]
        lp, lq = ref - np.logaddexp.reduce(ref), got - np.logaddexp.reduce(got)
        kls.append(float((np.exp(lp) * (lp - lq)).sum()))
        if np.exp(lp.max()) > 0.6:  # where fp32 is sure of its next token, INT4 must pick the same
            confident += 1
            agree += int(ref.argmax() == got.argmax())
    assert max(kls) < 0.05 and confident >= 1 and agree == confident, (kls, agree, confident)


def test_engine_profiles_cover_the_family(checkpoint):
    """The vision profile covers every tile a camera frame up to 1080p becomes; the decoder's past
    never needs an empty dimension."""
    from edgelmm.export.tensorrt import EngineOptions, profiles, tile_range
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles

    opts = EngineOptions(max_images=4, max_context=256)
    text = {"num_kv_heads": 2, "head_dim": 16, "hidden_size": 64}
    for kind in ("llava-siglip", "idefics3"):
        family = detect(ModelFiles.open(checkpoint(kind)))
        per_image, lo_hw, hi_hw = tile_range(family)
        vis = family.preprocess([np.zeros((1080, 1920, 3), np.uint8)] * 2)
        shape = [-1] + list(vis.pixel_values.shape[1:2]) + (["h", "w"] if family.variable_tile_size
                                                             else list(vis.pixel_values.shape[2:]))
        inputs = [{"name": "pixel_values", "shape": shape}]
        [vision_profile] = profiles("vision", inputs, family, text, opts, None)
        lo, opt, hi = vision_profile["pixel_values"]
        assert lo[0] == 1 and hi[0] == 4 * per_image and lo[0] <= opt[0] <= hi[0]
        assert all(a <= s <= c for a, s, c in zip(lo, vis.pixel_values.shape, hi))
        if kind == "llava-siglip":
            assert per_image == 1 and lo[1:] == hi[1:] == list(vis.pixel_values.shape[1:])
        else:
            assert per_image > 1
    dec_inputs = [{"name": n} for n in ("inputs_embeds", "attention_mask", "position_ids",
                                        "past_key_values.0.key", "past_key_values.0.value")]
    decode, prefill = profiles("decoder", dec_inputs, family, text, opts, context_length=128)
    # decode steps: one token at a time over a cache up to the context
    assert decode["inputs_embeds"] == [[1, 1, 64], [1, 1, 64], [1, 1, 64]]
    assert decode["position_ids"][2] == [1, 1]
    assert decode["past_key_values.0.key"] == [[1, 2, 1, 16], [1, 2, 128, 16], [1, 2, 128, 16]]
    assert decode["attention_mask"][0] == [1, 2] and decode["attention_mask"][2] == [1, 129]
    # prefill: a whole prompt at once, tuned for a prompt over the empty cache (its one hidden slot)
    assert prefill["inputs_embeds"] == [[1, 1, 64], [1, 128, 64], [1, 128, 64]]
    assert prefill["past_key_values.0.key"][1] == [1, 2, 1, 16] and prefill["position_ids"][2] == [1, 128]
    assert prefill["attention_mask"][1] == [1, 129]
    # the runtime takes the first profile that fits: decode for one token, prefill for a prompt
    from edgelmm.runtimes.tensorrt import pick_profile

    def step(seq, past, batch=1):
        return {"inputs_embeds": (batch, seq, 64), "attention_mask": (batch, past + seq), "position_ids": (batch, seq),
                "past_key_values.0.key": (batch, 2, past, 16)}
    assert pick_profile([decode, prefill], step(1, 40)) == 0
    assert pick_profile([decode, prefill], step(37, 1)) == 1
    assert pick_profile([decode, prefill], step(5, 40)) == 1        # a second turn's prompt after an answer
    assert pick_profile([decode, prefill], step(1, 200)) is None    # past the context: a PromptError at run time


def test_engine_layer_report_reads_the_inspector_format():
    from edgelmm.runtimes.tensorrt import engine_layer_report

    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Channel major INT8 format"}]},
        {"Name": "gemm_fc", "LayerType": "CaskGemmMatrixMultiply", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "ln", "LayerType": "Normalization", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
        "a layer name only (ProfilingVerbosity below DETAILED)"],
        "Bindings": ["x", "y"]}
    report = engine_layer_report(json.dumps(info), "int8")
    assert report["layers"] == 3 and report["by_output_type"] == {"int8": 1, "fp32": 1, "fp16": 1}
    assert report["fell_back"] == [{"layer": "gemm_fc", "type": "CaskGemmMatrixMultiply", "runs_in": "fp32"}]
    assert engine_layer_report(json.dumps(info), "fp16")["fell_back"][0]["layer"] == "gemm_fc"
    assert report["inspector_layout"] == "10.x" and [t["name"] for t in report["io"]] == ["x", "y"]


def test_engine_layer_report_reads_the_tensorrt_11_layout():
    """TensorRT 11's inspector: "Bindings" became "I/O Tensors" (objects with IOMode and DataType, as
    in NVIDIA's migration guide's example) and each tensor's "Format/Datatype" split in two."""
    from edgelmm.runtimes.tensorrt import engine_layer_report

    info = {
        "Layers": [
            {"Name": "qkv", "LayerType": "CaskGemmMatrixMultiply",
             "Outputs": [{"Name": "qkv_out", "Dimensions": [1, 8, 96], "Format": "Row major linear", "Datatype": "Half"}]},
            {"Name": "lm_head", "LayerType": "CaskGemmMatrixMultiply",
             "Outputs": [{"Name": "logits", "Dimensions": [1, 640], "Format": "Row major linear", "DataType": "Float"}]},
            {"Name": "norm", "LayerType": "Normalization",
             "Outputs": [{"Name": "n", "Format": "Row major linear", "Datatype": "Float"}]}],
        "I/O Tensors": [
            {"Name": "inputs_embeds", "IOMode": "Input", "DataType": "Half", "Dimensions": [-1, -1, 256],
             "Location": "Device", "IsShapeInferenceIO": False,
             "ProfileInfo": [{"MinShape": [1, 1, 256], "OptShape": [1, 1, 256], "MaxShape": [1, 1, 256],
                              "Format": "Row major linear FP16 format (kLINEAR)"}]},
            {"Name": "logits", "IOMode": "Output", "DataType": "Float", "Dimensions": [-1, 640], "Location": "Device",
             "IsShapeInferenceIO": False}]}
    report = engine_layer_report(json.dumps(info), "fp16")
    assert report["inspector_layout"] == "11.x" and report["layers"] == 3
    assert report["by_output_type"] == {"fp16": 1, "fp32": 2}
    assert report["fell_back"] == [{"layer": "lm_head", "type": "CaskGemmMatrixMultiply", "runs_in": "fp32"}]
    assert report["io"] == [{"name": "inputs_embeds", "mode": "input", "dtype": "fp16"},
                            {"name": "logits", "mode": "output", "dtype": "fp32"}]


def test_tensorrt_versions_are_named_with_their_platform():
    from edgelmm.runtimes.tensorrt import MIN_TENSORRT, describe_tensorrt, tensorrt_version

    assert "JetPack 6.1 / 6.2 (CUDA 12.6)" in describe_tensorrt("10.3.0")
    assert "Jetson Thor" in describe_tensorrt("10.13.3.9")
    assert "pip install tensorrt" in describe_tensorrt("11.4.0.106") and "JetPack 7.2.2" in describe_tensorrt("11.4.0")
    assert describe_tensorrt("8.6.2") == "TensorRT 8.6.2"
    assert tensorrt_version("10.3.0") == MIN_TENSORRT and tensorrt_version("10.2.0") < MIN_TENSORRT
    assert tensorrt_version("11.4.0.106") > MIN_TENSORRT


def test_ort_tensorrt_provider_options(reference_bundle, tmp_path):
    from edgelmm.runtimes.onnxruntime import GpuOptions

    b = open_bundle(reference_bundle)
    opts = GpuOptions(device_id=1, engine_cache_dir=str(tmp_path))
    trt = opts.provider_options("TensorrtExecutionProvider", b, "fp32")
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"] and not trt["trt_int8_enable"]
    os.environ["EDGELMM_CACHE"] = str(tmp_path)
    try:
        default = GpuOptions().provider_options("TensorrtExecutionProvider", b, "fp32")["trt_engine_cache_path"]
    finally:
        del os.environ["EDGELMM_CACHE"]
    assert default.startswith(str(tmp_path / "ort-tensorrt")) and b.artifact("decoder", "onnx", "fp32")["sha256"][:16] in default
    # fp32 graphs compute in fp32 on the CUDA provider unless TF32 is asked for
    assert GpuOptions().provider_options("CUDAExecutionProvider", b, "fp32") == {"device_id": 0, "use_tf32": 0}
    assert GpuOptions(tf32=True).provider_options("CUDAExecutionProvider", b, "fp32")["use_tf32"] == 1


def test_backends_declare_their_capabilities(reference_bundle):
    """Each backend says what it can do in one typed record; a backend without one (a wrapper,
    another project's) is read from its attributes."""
    import edgelmm
    from edgelmm.apps.anomaly import SerializedBackend
    from edgelmm.runtimes.base import Capabilities, capabilities_of
    from edgelmm.runtimes.llamacpp import LlamaCppBackend
    from edgelmm.runtimes.tensorrt import TensorRTBackend
    from edgelmm.runtimes.torch import TorchBackend

    assert LlamaCppBackend.capabilities == Capabilities(thread_safe=False, decode_ids=True, tokenize=True, close=True)
    assert TensorRTBackend.capabilities.thread_safe is False and TorchBackend.capabilities == Capabilities()
    ort = edgelmm.load(reference_bundle, backend="onnxruntime", threads=1).backend
    assert capabilities_of(ort) == Capabilities(thread_safe=True, greedy_ids=True)
    assert capabilities_of(SerializedBackend(ort)).thread_safe   # a wrapper forwards what it wraps

    class Theirs:
        thread_safe = True

        def tokenize(self, text, add_special):
            return []
    assert capabilities_of(Theirs()) == Capabilities(thread_safe=True, tokenize=True)
