"""ONNX export, the bundle format, the ONNX Runtime backend and verify, on every family."""

import json
import os
import shutil

import numpy as np
import pytest

import edgelmm
from edgelmm import BackendUnavailable, BundleError, CheckpointError
from edgelmm.testing import sample_images

from .conftest import KINDS, optimized_op_types, run_without_torch

pytestmark = pytest.mark.slow
SIZES = [(48, 64), (64, 40), (30, 90)]


@pytest.mark.parametrize("kind", KINDS)
def test_export_parity_against_reference(bundle, pipelines, kind):
    path = bundle(kind)
    report = json.loads((path / "edgelmm.json").read_text())["verify"]["fp32"]
    assert report["passed"] and report["backend"]["providers"] == ["CPUExecutionProvider"]
    s = report["summary"]
    assert s["vision_max_abs"] <= 1e-4 and s["vision_cosine_min"] >= 0.9999
    assert s["logits_max_abs"] <= 1e-3 and s["logits_kl_max"] <= 1e-4
    assert s["batch2_logits_max_abs"] <= 1e-3 and s["token_match_min"] == 1.0

    ort_pipe, ref = edgelmm.load(path), pipelines(kind)
    for n in (1, 2, 3):
        images = sample_images(n, seed=20 + n, sizes=SIZES[n - 1:] + SIZES[:n - 1])
        prompt = "Compare" + " and".join(" <image>" for _ in range(n))
        prep = ref.prepare(prompt, images)
        feats_ref, feats_ort = ref.image_features(prep.vision), ort_pipe.image_features(prep.vision)
        assert np.abs(feats_ref - feats_ort).max() <= 1e-4
        a = ort_pipe.generate(prompt, images, max_new_tokens=16)
        b = ref.generate(prompt, images, max_new_tokens=16)
        assert a.token_ids == b.token_ids and len(a.token_ids) >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_every_rmsnorm_runs_as_one_fused_kernel(bundle, kind, tmp_path):
    """The export rewrites RMSNorm's Sqrt -> Reciprocal -> Mul as Sqrt -> Div, so ONNX Runtime fuses
    each RMSNorm (two per decoder layer and the final one) into SimplifiedLayerNormalization; the
    parity test above holds the numbers."""
    import onnx

    path = bundle(kind) / "onnx" / "decoder.onnx"
    assert not any(n.op_type == "Reciprocal" for n in onnx.load(str(path)).graph.node)
    ran = optimized_op_types(path, tmp_path / "decoder.optimized.onnx")
    layers = json.loads((path.parent.parent / "edgelmm.json").read_text())["text"]["num_layers"]
    assert ran["SimplifiedLayerNormalization"] == 2 * layers + 1 and ran["Sqrt"] == 0, ran


def test_bundle_answers_without_torch(bundle, pipelines):
    path = bundle("idefics3")
    images = sample_images(2, seed=4)  # two sizes
    expected = pipelines("idefics3").generate("<image> vs <image>", images, max_new_tokens=10).token_ids
    np.savez(path.parent / "imgs.npz", *images)
    code = f"""
import json, sys
import numpy as np, edgelmm
pipe = edgelmm.load({str(path)!r})
g = pipe.generate('<image> vs <image>', list(np.load({str(path.parent / 'imgs.npz')!r}).values()), max_new_tokens=10)
print(json.dumps({{'ids': g.token_ids, 'mods': [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]}}))
"""
    out = json.loads(run_without_torch(code))
    assert out["mods"] == [] and out["ids"] == expected


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle("llava-siglip"), dst)
    return dst


def _manifest(path):
    return json.loads((path / "edgelmm.json").read_text())


def test_truncated_onnx(bundle_copy):
    f = bundle_copy / "onnx" / "decoder.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"onnx/decoder\.onnx: size 1000 bytes, manifest says"):
        edgelmm.load(bundle_copy)


def test_flipped_bytes_fail_checksum(bundle_copy):
    f = bundle_copy / "onnx" / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"onnx/vision\.onnx: sha256 does not match"):
        edgelmm.load(bundle_copy)


def test_missing_artifact(bundle_copy):
    (bundle_copy / "onnx" / "embed.onnx").unlink()
    with pytest.raises(BundleError, match=r"onnx/embed\.onnx: missing"):
        edgelmm.load(bundle_copy)


def test_unknown_manifest_version(bundle_copy):
    m = _manifest(bundle_copy)
    m["format_version"] = 99
    (bundle_copy / "edgelmm.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"edgelmm\.json: manifest format_version 99 is not one"):
        edgelmm.load(bundle_copy)


@pytest.mark.parametrize("graph,layout", [("decoder", "plain"), ("decoder_fused", "auto")])
def test_manifest_with_wrong_input_name(bundle_copy, graph, layout):
    m = _manifest(bundle_copy)
    dec = next(a for a in m["artifacts"] if a["graph"] == graph)
    dec["inputs"][0]["name"] = "input_embeddings"
    (bundle_copy / "edgelmm.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=rf"{graph}\.onnx: graph inputs .* do not match the manifest"):
        edgelmm.load(bundle_copy, layout=layout)


def test_corrupt_graph_with_matching_checksum_is_a_bundle_error(bundle_copy):
    """A graph that was broken before the manifest was written: a BundleError naming it (from the
    external-data scan of the protobuf, which reads the graph before ORT does)."""
    from edgelmm.bundle import file_entry

    f = bundle_copy / "onnx" / "embed.onnx"
    f.write_bytes(b"not an onnx model")
    m = _manifest(bundle_copy)
    art = next(a for a in m["artifacts"] if a["graph"] == "embed")
    art["files"][0] = file_entry(bundle_copy, "onnx/embed.onnx")
    (bundle_copy / "edgelmm.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"embed\.onnx: not a valid ONNX file"):
        edgelmm.load(bundle_copy)


def test_explicit_gpu_provider_without_gpu_is_refused(bundle):
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has an NVIDIA GPU: the CUDA provider may really run")
    with pytest.raises(BackendUnavailable, match=r"provider 'cuda' was asked for but the session runs on "
                                                 r"\['CPUExecutionProvider'\]"):
        edgelmm.load(bundle("idefics3"), provider="cuda")


def test_tensorrt_provider_without_tensorrt_names_the_library(bundle, capfd):
    """Without libnvinfer, ONNX Runtime would print an "EP Error" banner and fall back on its own;
    edgelmm refuses an explicit request by name and leaves the provider out of "auto", quietly."""
    from edgelmm.runtimes.onnxruntime import tensorrt_libraries_load

    if tensorrt_libraries_load() is None:
        pytest.skip("TensorRT 10 is installed here: the provider may really run")
    with pytest.raises(BackendUnavailable, match=r"provider 'tensorrt' was asked for but libnvinfer\.so\.10 "
                                                 r"\(TensorRT 10\) does not load"):
        edgelmm.load(bundle("idefics3"), provider="tensorrt")
    pipe = edgelmm.load(bundle("idefics3"), backend="onnxruntime", provider="auto")
    assert "TensorrtExecutionProvider" not in pipe.backend.providers
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "libnvinfer" not in out + err


def test_torch_backend_on_a_bundle_is_refused(bundle):
    """The PyTorch reference runs the checkpoint a bundle came from, and says so."""
    with pytest.raises(CheckpointError, match=r"this is an edgelmm bundle, but the PyTorch reference \(backend "
                                              r"'torch'\) needs the Hugging Face checkpoint directory"):
        edgelmm.load(bundle("idefics3"), backend="torch")


def test_export_refuses_to_overwrite(bundle, checkpoint):
    from edgelmm.export import export

    with pytest.raises(BundleError, match="already exists"):
        export(checkpoint("idefics3"), bundle("idefics3"), quiet=True)


def test_cli_export_and_verify(checkpoint, bundle, tmp_path):
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from edgelmm.cli import app
    from edgelmm.testing.checkpoints import build_idefics2

    def run(*args):   # in-process (test_cli.py runs the `python -m edgelmm` entry point)
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)
    # One export through the CLI for both formats (the GGUF pair as f32, so llama.cpp matches exactly). Its
    # stderr is not a terminal, where a live bar prints nothing: each step is a line instead.
    r = run("export", checkpoint("idefics3"), tmp_path / "b", "--format", "onnx,gguf", "--gguf-types", "f32")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line.split("] ", 1)[1] for line in r.stderr.splitlines() if line.startswith("[")]
    assert any(line.startswith("exporting fp32 ONNX graphs") for line in lines)
    assert any(line.startswith("done: exporting fp32") for line in lines)
    manifest = json.loads((tmp_path / "b" / "edgelmm.json").read_text())
    assert {(a["format"], a["graph"]) for a in manifest["artifacts"]} == {
        ("onnx", "vision"), ("onnx", "embed"), ("onnx", "decoder"), ("onnx", "decoder_fused"), ("gguf", "llm"),
        ("gguf", "mmproj")}
    assert manifest["verify"]["fp32"]["passed"] and manifest["verify"]["fp32"]["fused"]["passed"]
    assert all(len(a["sha256"]) == 64 for a in manifest["artifacts"])
    r = run("verify", tmp_path / "b", "--reference", checkpoint("idefics3"), "--json")
    out = json.loads(r.stdout)  # one report per backend and decoder layout
    assert r.returncode == 0 and out["passed"]
    assert [(rep["backend"]["backend"], rep["backend"].get("decoder_layout")) for rep in out["reports"]] == \
        [("onnxruntime", "plain"), ("onnxruntime", "fused"), ("llamacpp", None)]
    assert out["reports"][2]["summary"]["token_match_min"] == 1.0
    # The same architecture with other weights: verify must notice (in both layouts) and exit 1.
    other = build_idefics2(tmp_path / "other", seed=1)
    r = run("verify", bundle("idefics2"), "--reference", other, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and not out["passed"]
    assert all(not rep["passed"] and rep["summary"]["logits_max_abs"] > 1e-3 for rep in out["reports"])


def test_fp16_graphs_track_the_fp32_reference(checkpoint, bundle, pipelines, tmp_path):
    """fp16 variants (for GPUs) run on the CPU provider too, so their parity is checked here. The fp16
    set alone is exported; its weights are compared with the session's fp32 export of the same
    checkpoint."""
    import onnx

    from edgelmm.export import export

    path = export(checkpoint("llava-siglip"), tmp_path / "b16", precisions=("fp16",), quiet=True)
    manifest = json.loads((path / "edgelmm.json").read_text())
    fp32 = bundle("llava-siglip")
    manifest32 = json.loads((fp32 / "edgelmm.json").read_text())
    report = manifest["verify"]["fp16"]
    assert report["passed"], report["failures"]
    s = report["summary"]
    assert s["vision_cosine_min"] >= 0.999 and s["logits_kl_max"] <= 5e-3 and s["token_match_min"] >= 0.95
    arts = {(a["graph"], a["precision"]): (path, a) for a in manifest["artifacts"]}
    arts |= {(a["graph"], a["precision"]): (fp32, a) for a in manifest32["artifacts"]}
    dec16, dec32 = arts[("decoder", "fp16")], arts[("decoder", "fp32")]
    assert {i["dtype"] for i in dec16[1]["inputs"] if i["name"] not in ("attention_mask", "position_ids")} == {"float16"}
    weight_bytes = {}
    for root, art in (dec16, dec32):
        graph = onnx.load(str(root / art["file"]))
        for t in graph.graph.initializer:
            key = (art["precision"], onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name)
            weight_bytes[key] = weight_bytes.get(key, 0) + len(t.raw_data)
    # Every weight is half precision: half the bytes, next to nothing left in fp32.
    assert abs(weight_bytes[("fp16", "float16")] - weight_bytes[("fp32", "float32")] / 2) <= 1e-3 * weight_bytes[("fp32", "float32")]
    assert weight_bytes.get(("fp16", "float32"), 0) <= 1e-3 * weight_bytes[("fp16", "float16")]
    # (which of fp32 and fp16 "auto" takes per provider: test_platform.py's test_auto_precision_per_provider)
    pipe16 = edgelmm.load(path, precision="fp16")
    images = sample_images(2, seed=5)
    a = pipe16.generate("Compare <image> and <image>", images, max_new_tokens=8)
    b = pipelines("llava-siglip").generate("Compare <image> and <image>", images, max_new_tokens=8)
    assert sum(x == y for x, y in zip(a.token_ids, b.token_ids)) >= 0.75 * len(b.token_ids)


def test_io_binding_gives_the_same_answers(bundle):
    """The decoder's KV cache stays in ORT's own buffers between steps with IO binding; the numbers
    must not change."""
    from edgelmm.bundle import open_bundle
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles
    from edgelmm.pipeline import Pipeline
    from edgelmm.runtimes.onnxruntime import OnnxRuntimeBackend

    path = bundle("idefics2")
    files = ModelFiles.open(path)
    opened = open_bundle(path)
    # the plain decoder layout (the fused one always binds its buffers)
    bound, plain = (Pipeline(files, detect(files), OnnxRuntimeBackend(opened, io_binding=flag, layout="plain"))
                    for flag in (True, False))
    assert bound.backend.describe()["kv_device"] == "cpu" and plain.backend.describe()["kv_device"] == "host"
    images = sample_images(2, seed=9)
    a = bound.generate("What changed between <image> and <image>?", images, max_new_tokens=12)
    b = plain.generate("What changed between <image> and <image>?", images, max_new_tokens=12)
    assert a.token_ids == b.token_ids
    prep = bound.prepare("<image> and <image>", images)
    emb = bound.merged_embeddings(prep)
    n = emb.shape[1]
    args = (emb, np.ones((1, n), np.int64), np.arange(n)[None])
    la = bound.backend.decode(*args, bound.backend.new_cache(1))
    lb = plain.backend.decode(*args, plain.backend.new_cache(1))
    assert np.abs(la - lb).max() <= 1e-6


@pytest.mark.parametrize("kind", ["llava-clip", "idefics3"])
def test_batch_of_two_answers_as_each_alone(bundle, pipelines, kind):
    """Batch 2 (left-padded, different lengths and image counts) gives each prompt the tokens the
    PyTorch reference gives it alone."""
    ort_pipe, ref = edgelmm.load(bundle(kind)), pipelines(kind)
    requests = [("Describe <image>", sample_images(1, seed=31, sizes=[(48, 64)])),
                ("Compare <image>, <image> and <image>", sample_images(3, seed=32, sizes=SIZES))]
    batched = ort_pipe.generate_batch(requests, max_new_tokens=16)
    for (prompt, images), got in zip(requests, batched):
        alone = ref.generate(prompt, images, max_new_tokens=16)
        assert got.token_ids == alone.token_ids and got.prompt_tokens == alone.prompt_tokens
    torch_batched = ref.generate_batch(requests, max_new_tokens=16)
    assert [g.token_ids for g in torch_batched] == [g.token_ids for g in batched]


def test_unknown_precision_is_refused_before_any_work(checkpoint, tmp_path):
    from edgelmm.errors import ExportError
    from edgelmm.export import export

    with pytest.raises(ExportError, match="unknown precision.*int3.*fp32, fp16"):
        export(checkpoint("llava-siglip"), tmp_path / "b", precisions=("fp16", "int3"), quiet=True)
    assert not (tmp_path / "b").exists()
