"""GGUF export (LLM + mmproj), GGUF validation and the llama.cpp backend, against the PyTorch
reference on the families llama.cpp can represent (llava-SigLIP, idefics3)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgelmm[llamacpp]')")

import edgelmm  # noqa: E402
from edgelmm.errors import ExportError, GGUFError  # noqa: E402
from edgelmm.gguf_file import read_gguf, validate_gguf  # noqa: E402
from edgelmm.testing import sample_images  # noqa: E402
from edgelmm.verify import verify  # noqa: E402

from .conftest import cached_exports, run_without_torch  # noqa: E402

pytestmark = pytest.mark.slow
GGUF_KINDS = ["llava-siglip", "idefics3"]
SIZES = [(48, 64), (64, 40), (30, 90)]


@pytest.fixture(scope="module")
def gguf_bundle(checkpoint, tmp_path_factory):
    return cached_exports(checkpoint, tmp_path_factory.mktemp("gguf-bundles"), formats=["gguf"],
                          gguf_types=["f32", "f16", "q8_0", "q4_k_m"])


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_f32_gguf_matches_pytorch(gguf_bundle, pipelines, kind):
    path = gguf_bundle(kind)
    pipe, ref = edgelmm.load(path, backend="llamacpp", precision="f32"), pipelines(kind)
    assert pipe.backend.describe()["kv_cache_type"] == "f32"
    report = verify(pipe, ref, "f32")
    s = report["summary"]
    assert report["passed"], report["failures"]
    assert [c["images"] for c in report["cases"]] == [1, 2, 3]
    assert s["vision_cosine_min"] >= 0.999
    assert s["logits_max_abs"] <= 1e-3 and s["decoder_logits_max_abs"] <= 1e-3
    assert s["batch2_logits_max_abs"] <= 1e-3
    assert all(len(c["reference_tokens"]) == 16 and c["candidate_tokens"] == c["reference_tokens"]
               for c in report["cases"])
    # The byte-level BPE vocab written into the GGUF tokenizes these prompts exactly as HF does.
    assert s["backend_tokenizer_match"] == 1.0
    # The stored report (written at export) says the same.
    stored = json.loads((path / "edgelmm.json").read_text())["verify"]
    assert stored["f32"]["passed"] and stored["f32"]["backend"]["backend"] == "llamacpp"


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_f16_gguf_token_match(gguf_bundle, pipelines, kind):
    report = verify(edgelmm.load(gguf_bundle(kind), backend="llamacpp", precision="f16"), pipelines(kind), "f16")
    assert report["passed"], report["failures"]
    assert report["summary"]["token_match_min"] >= 0.95 and report["summary"]["vision_cosine_min"] >= 0.999


def test_generation_paths_agree(gguf_bundle, pipelines):
    """Streaming, sampling and left-padded batches through llama.cpp behave as on every backend."""
    pipe = edgelmm.load(gguf_bundle("idefics3"), backend="llamacpp", precision="f32")
    ref = pipelines("idefics3")
    requests = [("<image> What is it?", sample_images(1, seed=5)),
                ("Compare <image> with <image> and <image>.", sample_images(3, seed=6, sizes=SIZES))]
    batched = pipe.generate_batch(requests, max_new_tokens=12)
    for (prompt, images), row in zip(requests, batched):
        alone = ref.generate(prompt, images, max_new_tokens=12)
        assert row.token_ids == alone.token_ids
    prompt, images = requests[1]
    assert "".join(pipe.stream(prompt, images, max_new_tokens=12)) == pipe.generate(prompt, images, max_new_tokens=12).text
    a = pipe.generate(prompt, images, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = pipe.generate(prompt, images, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_quantized_types_are_written_and_run(gguf_bundle):
    path = gguf_bundle("llava-siglip")
    manifest = json.loads((path / "edgelmm.json").read_text())
    sizes = {a["precision"]: a["files"][0]["size"] for a in manifest["artifacts"] if a["graph"] == "llm"}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    q8 = read_gguf(path / "gguf/model.q8_0.gguf")
    assert q8.metadata["general.file_type"] == 7 and q8.tensors["blk.0.attn_q.weight"][0] == "Q8_0"
    assert read_gguf(path / "gguf/model.q4_k_m.gguf").metadata["general.file_type"] == 15
    # The quantized LLMs share a Q8_0 projector; the vision features stay within the F16 gate.
    assert {a["file"] for a in manifest["artifacts"] if a["graph"] == "mmproj"} == {
        "gguf/mmproj.f32.gguf", "gguf/mmproj.f16.gguf", "gguf/mmproj.q8_0.gguf"}
    mm = read_gguf(path / "gguf/mmproj.q8_0.gguf")
    assert mm.tensors["v.blk.0.attn_q.weight"][0] == "Q8_0" and mm.tensors["v.patch_embd.weight"][0] == "F16"
    from edgelmm.runtimes.llamacpp import cpu_has_amx

    for gtype in ("q8_0", "q4_k_m"):
        assert manifest["verify"][gtype]["summary"]["vision_cosine_min"] >= 0.999
        pipe = edgelmm.load(path, backend="llamacpp", precision=gtype)
        # on an AMX CPU ggml's AMX matmul would crash these weights (llama.cpp#20824): its buffer types are off
        assert pipe.describe()["extra_buffer_types"] is (not cpu_has_amx())
        g = pipe.generate("<image> and <image>", sample_images(2, seed=1), max_new_tokens=8)
        assert 1 <= len(g.token_ids) <= 8
    assert edgelmm.load(path, backend="llamacpp").backend.precision == "q4_k_m"  # auto: the smallest


def _copy_gguf(src, dst, tamper=None):
    """Rewrite a GGUF through gguf-py, letting `tamper(name, array)` change a tensor."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), read_gguf(src).architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = [str(bytes(field.parts[i]), "utf-8") if sub == gguf.GGUFValueType.STRING
                      else field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, values)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, str(bytes(field.parts[field.data[0]]), "utf-8"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    for t in reader.tensors:
        data = np.array(t.data)
        if tamper:
            data = tamper(t.name, data)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_malformed_gguf_is_a_typed_error(gguf_bundle, tmp_path):
    src = gguf_bundle("llava-siglip") / "gguf/model.f32.gguf"
    raw = src.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        validate_gguf(truncated)
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(GGUFError, match="wrong magic"):
        validate_gguf(magic)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(raw[:5])
    with pytest.raises(GGUFError, match="truncated"):
        validate_gguf(tiny)

    same = tmp_path / "same.gguf"
    _copy_gguf(src, same)
    assert validate_gguf(same, "llama").tensors == validate_gguf(src, "llama").tensors  # the copier is faithful
    wrong = tmp_path / "wrong-shape.gguf"
    _copy_gguf(src, wrong, lambda name, a: a[:, :-8] if name == "blk.1.ffn_up.weight" else a)
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight"):
        validate_gguf(wrong, "llama")
    with pytest.raises(GGUFError, match="architecture 'llama', expected 'clip'"):
        validate_gguf(src, "clip")


def test_backend_refuses_a_broken_gguf_before_llamacpp_sees_it(gguf_bundle, tmp_path):
    """A damaged file inside a bundle whose checksums are skipped still gives a typed error, in a
    process that survives (llama.cpp would abort on some of these)."""
    from edgelmm.bundle import open_bundle
    from edgelmm.runtimes.llamacpp import LlamaCppBackend

    copy = tmp_path / "bundle"
    shutil.copytree(gguf_bundle("idefics3"), copy)
    target = copy / "gguf/mmproj.f32.gguf"
    target.write_bytes(target.read_bytes()[:-1000])
    with pytest.raises(edgelmm.BundleError, match="mmproj.f32.gguf: size"):
        edgelmm.load(copy, backend="llamacpp", precision="f32")
    # The manifest's size re-fixed (checksums skipped): the GGUF validator is what stands in the way.
    manifest = json.loads((copy / "edgelmm.json").read_text())
    for art in manifest["artifacts"]:
        for entry in art["files"]:
            if entry["file"] == "gguf/mmproj.f32.gguf":
                entry["size"] = target.stat().st_size
    (copy / "edgelmm.json").write_text(json.dumps(manifest))
    with pytest.raises(GGUFError, match="truncated"):
        LlamaCppBackend(open_bundle(copy, verify_checksums=False), precision="f32")


def test_refusals_and_forced_clip(checkpoint, tmp_path):
    from edgelmm.export import export

    with pytest.raises(ExportError, match="no projector for Idefics2"):
        export(checkpoint("idefics2"), tmp_path / "i2", formats=["gguf"], quiet=True)
    assert not (tmp_path / "i2").exists()
    with pytest.raises(ExportError, match="CLS token.*--force"):
        export(checkpoint("llava-clip"), tmp_path / "clip", formats=["gguf"], quiet=True)
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export(checkpoint("llava-siglip"), tmp_path / "bad", formats=["gguf"], gguf_types=["q3"], quiet=True)
    forced = export(checkpoint("llava-clip"), tmp_path / "clip", formats=["gguf"], gguf_types=["f32"],
                    force=True, quiet=True)
    manifest = json.loads((forced / "edgelmm.json").read_text())
    report = manifest["verify"]["f32"]
    assert not report["passed"] and report["summary"]["vision_cosine_min"] < 0.99
    assert any("vision_cosine_min" in f for f in report["failures"])
    assert "CLS" in next(a for a in manifest["artifacts"] if a["graph"] == "mmproj")["forced"]
    # The decoder itself is right: only the vision tower is damaged.
    assert report["summary"]["decoder_logits_max_abs"] <= 1e-3


def test_gguf_bundle_answers_without_torch(gguf_bundle, pipelines, tmp_path):
    """The device side: llama.cpp over a GGUF bundle with torch and transformers unimportable."""
    path = gguf_bundle("llava-siglip")
    images = sample_images(2, seed=9)
    expected = pipelines("llava-siglip").generate("<image> vs <image>", images, max_new_tokens=10).token_ids
    np.savez(tmp_path / "imgs.npz", *images)
    code = f"""
import json
import numpy as np, edgelmm
pipe = edgelmm.load({str(path)!r}, backend="llamacpp", precision="f32")
g = pipe.generate('<image> vs <image>', list(np.load({str(tmp_path / 'imgs.npz')!r}).values()), max_new_tokens=10)
print(json.dumps(g.token_ids))
"""
    assert json.loads(run_without_torch(code)) == expected


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_q4_k_m_is_quantized_with_an_importance_matrix(gguf_bundle, kind):
    """export computes the importance matrix from the calibration prompts (synthetic by default) and
    records it on the q4_k_m LLM artifact: every text linear layer and the lm_head."""
    import json

    manifest = json.loads((gguf_bundle(kind) / "edgelmm.json").read_text())
    llm = {a["precision"]: a for a in manifest["artifacts"] if a["graph"] == "llm"}
    imx = llm["q4_k_m"]["imatrix"]
    assert imx["source"] == "synthetic" and imx["prompts"] > 0 and imx["tokens"] > imx["prompts"]
    assert imx["tensors"] == 7 * manifest["text"]["num_layers"] + 1
    assert "imatrix" not in llm["q8_0"] and "imatrix" not in llm["f16"]  # only k-quants use one
