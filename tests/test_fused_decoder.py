"""The fused decoder layout (GroupQueryAttention with rotary inside, KV buffers written in place):
parity against the PyTorch reference on every family, batches, long contexts, and the runtime's
choice of layout."""

import numpy as np
import pytest

import edgelmm
from edgelmm.errors import BundleError, OptionError, PromptError
from edgelmm.images import sample_images

from .conftest import KINDS

PROMPT = "Compare <image> and <image>: which has more shapes?"


def _fused(bundle_dir, **kw):
    return edgelmm.load(bundle_dir, backend="onnxruntime", provider="cpu", precision="fp32", layout="fused", **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_the_reference(kind, bundle, pipelines):
    """Prefill logits within 1e-4 of PyTorch, 16 greedy tokens identical, and the same through the
    plain layout; describe() says which layout runs. A family the layout cannot express (Qwen2-VL's
    M-RoPE positions) has no fused graph, and asking for one says so."""
    from edgelmm.export.fused_decoder import fused_support

    ref = pipelines(kind)
    if fused_support(ref.files.config) is not None:
        assert "M-RoPE" in fused_support(ref.files.config) or kind != "qwen2vl"
        with pytest.raises(BundleError, match="no fused fp32 decoder.*not M-RoPE"):
            _fused(bundle(kind))
        assert edgelmm.load(bundle(kind), backend="onnxruntime", provider="cpu").describe()["decoder_layout"] == "plain"
        return
    fused = _fused(bundle(kind))
    plain = edgelmm.load(bundle(kind), backend="onnxruntime", provider="cpu", precision="fp32", layout="plain")
    assert fused.describe()["decoder_layout"] == "fused" and plain.describe()["decoder_layout"] == "plain"
    images = sample_images(2, seed=3)
    prep_ref, prep_fused = ref.prepare(PROMPT, images), fused.prepare(PROMPT, images)
    embeds = ref.merged_embeddings(prep_ref)
    n = embeds.shape[1]
    mask, pos = np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None]
    want = ref.backend.decode(embeds, mask, pos, ref.backend.new_cache(1))
    got = fused.backend.decode(embeds, mask, pos, fused.backend.new_cache(1))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    tokens = {name: p.greedy_from_embeddings(p.merged_embeddings(prep), 16)[1]
              for name, p, prep in (("ref", ref, prep_ref), ("fused", fused, prep_fused),
                                    ("plain", plain, plain.prepare(PROMPT, images)))}
    assert tokens["fused"] == tokens["ref"] == tokens["plain"] and len(tokens["ref"]) > 0


def test_batch_rows_of_different_lengths_match_each_row_alone(bundle):
    """A left-padded batch of two prompts of different lengths: each row's greedy tokens as alone."""
    pipe = _fused(bundle("llava-siglip"))
    requests = [(PROMPT, sample_images(2, seed=1)), ("What is in <image>?", sample_images(1, seed=2))]
    together = pipe.generate_batch(requests, max_new_tokens=12)
    alone = [pipe.generate(p, imgs, max_new_tokens=12) for p, imgs in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({np.asarray(pipe.prepare(p, imgs).input_ids).size for p, imgs in requests}) == 2  # different lengths


def test_long_context_grows_the_cache_and_matches_plain(bundle):
    """From 10 positions to past the cache's first capacity (256, doubled as it fills) and in prefill
    chunks: the fused decoder's logits match the plain graph's at every checked length."""
    from edgelmm.runtimes.onnxruntime import FUSED_INITIAL_CAPACITY

    b = bundle("llava-siglip")
    fused = _fused(b).backend
    fused.prefill_chunk = 64
    plain = edgelmm.load(b, backend="onnxruntime", provider="cpu", precision="fp32", layout="plain").backend
    rng = np.random.default_rng(0)
    total = 2 * FUSED_INITIAL_CAPACITY + 37
    embeds = (rng.standard_normal((1, total, fused.sessions["decoder"].get_inputs()[0].shape[2])) * 0.5).astype(np.float32)
    for n in (10, FUSED_INITIAL_CAPACITY + 5, total):
        mask, pos = np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None]
        fc = fused.new_cache(1)
        got = fused.decode(embeds[:, :n], mask, pos, fc)
        want = plain.decode(embeds[:, :n], mask, pos, plain.new_cache(1))
        assert np.abs(got - want).max() <= 1e-4, (n, np.abs(got - want).max())
        assert fc.length == n and fc.capacity >= n
    # then one step at a time past the capacity again
    pc, fc = plain.new_cache(1), fused.new_cache(1)
    n = FUSED_INITIAL_CAPACITY - 2
    plain.decode(embeds[:, :n], np.ones((1, n), np.int64), np.arange(n)[None], pc)
    fused.decode(embeds[:, :n], np.ones((1, n), np.int64), np.arange(n)[None], fc)
    for k in range(n, n + 5):
        mask, pos = np.ones((1, k + 1), np.int64), np.array([[k]])
        want, got = plain.decode(embeds[:, k:k + 1], mask, pos, pc), fused.decode(embeds[:, k:k + 1], mask, pos, fc)
        assert np.abs(got - want).max() <= 1e-4
    assert fc.capacity == 2 * FUSED_INITIAL_CAPACITY


def test_layout_choice_and_errors(bundle, checkpoint, tmp_path):
    """auto takes the fused layout where the bundle has it; positions that do not continue a row
    are refused with a PromptError; a missing fused graph is a BundleError naming the bundle."""
    b = bundle("idefics3")
    assert edgelmm.load(b, backend="onnxruntime", provider="cpu", precision="fp32").describe()["decoder_layout"] == "fused"
    from edgelmm.bundle import open_bundle
    from edgelmm.runtimes.onnxruntime import OnnxRuntimeBackend

    opened = open_bundle(b)
    picks = {p: OnnxRuntimeBackend._pick_layout(opened, "fp32", "auto", p) for p in ("cpu", "cuda", "tensorrt")}
    assert picks == {"cpu": "fused", "cuda": "plain", "tensorrt": "plain"}  # GPUs: plain until measured there
    assert OnnxRuntimeBackend._pick_layout(opened, "fp32", "fused", "cuda") == "fused"  # asked for by name
    with pytest.raises(OptionError, match=r"unknown decoder layout \(--layout\) 'fast'"):
        edgelmm.load(b, layout="fast")
    with pytest.raises(OptionError, match="ONNX Runtime's"):
        edgelmm.load(checkpoint("idefics3"), backend="torch", layout="fused")
    be = _fused(b).backend
    embeds = np.zeros((1, 3, be.sessions["decoder"].get_inputs()[0].shape[2]), np.float32)
    with pytest.raises(PromptError, match="positions 0.. in order"):
        be.decode(embeds, np.ones((1, 3), np.int64), np.array([[5, 6, 7]]), be.new_cache(1))
    import json
    import shutil

    copy = tmp_path / "plain-only"
    shutil.copytree(b, copy)
    manifest = json.loads((copy / "edgelmm.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["graph"] != "decoder_fused"]
    (copy / "edgelmm.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no fused fp32 decoder"):
        _fused(copy)
    alone = tmp_path / "fused-alone"  # manifest/delete:3207812381: the plain decoder deleted, still loaded
    shutil.copytree(b, alone)
    m = json.loads((alone / "edgelmm.json").read_text())
    m["artifacts"] = [a for a in m["artifacts"] if a["graph"] != "decoder"]
    (alone / "edgelmm.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="a fused fp32 decoder without the plain fp32 decoder"):
        edgelmm.load(alone)
    for bad in ("4096", -1, None):  # the runtime sizes its cache by it: checked with the manifest
        fused_copy = tmp_path / f"bad-{bad}"
        shutil.copytree(b, fused_copy)
        m = json.loads((fused_copy / "edgelmm.json").read_text())
        next(a for a in m["artifacts"] if a["graph"] == "decoder_fused")["max_context"] = bad
        (fused_copy / "edgelmm.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=r"artifacts\[\d+\]\.max_context"):
            _fused(fused_copy)
    assert edgelmm.load(copy, backend="onnxruntime", provider="cpu", precision="fp32").describe()["decoder_layout"] == "plain"


def test_fused_graph_with_external_data_loads_and_matches(checkpoint, tmp_path, monkeypatch):
    """A model over EXTERNAL_DATA_BYTES keeps its weights in decoder_fused.onnx.data (page-aligned,
    mapped by ONNX Runtime) while shape arguments stay in the graph: the same logits as embedded."""
    import onnxruntime as ort

    from edgelmm.export import fused_decoder
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles
    from edgelmm.runtimes.torch import load_hf_model

    family = detect(ModelFiles.open(checkpoint("llava-siglip")))
    parts = family.torch_parts(load_hf_model(family))
    paths = {}
    for name, limit in (("embedded", 1 << 40), ("external", 0)):
        monkeypatch.setattr(fused_decoder, "EXTERNAL_DATA_BYTES", limit)
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "decoder_fused.onnx"
        fused_decoder.build_fused_decoder(family.config, parts.decoder, parts.lm_head, paths[name])
    data = tmp_path / "external" / "decoder_fused.onnx.data"
    assert data.stat().st_size > 0.9 * sum(p.numel() * 4 for p in parts.decoder.parameters())
    assert not (tmp_path / "embedded" / "decoder_fused.onnx.data").exists()
    outs = {}
    for name, path in paths.items():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ins = sess.get_inputs()
        rng = np.random.default_rng(0)
        feeds = {"inputs_embeds": rng.standard_normal((1, 5, ins[0].shape[2])).astype(np.float32),
                 "seqlens_k": np.array([4], np.int32), "total_sequence_length": np.array(5, np.int32),
                 "last_index": np.array([4], np.int64)}
        feeds.update((i.name, np.zeros((1, i.shape[1], 8, i.shape[3]), np.float32)) for i in ins[4:])
        outs[name] = sess.run(["logits"], feeds)[0]
    np.testing.assert_array_equal(outs["embedded"], outs["external"])


def test_greedy_ids_come_from_the_graph(bundle):
    """The fused graph's next_token is the argmax of its logits (ties to the lowest id, as numpy's);
    a greedy generation reads only it at each step, and answers as the logits path and the plain
    layout do, batched too."""
    b = bundle("llava-siglip")
    pipe = _fused(b)
    be = pipe.backend
    assert be.has_next_token and "next_token" not in be.present_names
    rng = np.random.default_rng(4)
    embeds = (rng.standard_normal((2, 7, be.hidden_size)) * 0.5).astype(np.float32)
    mask, pos = np.ones((2, 7), np.int64), np.tile(np.arange(7), (2, 1))
    by_logits, by_ids = be.new_cache(2), be.new_cache(2)
    be.decode(embeds, mask, pos, by_logits)
    be.decode_greedy(embeds, mask, pos, by_ids)
    for k in range(7, 12):
        step = (embeds[:, k - 7:k - 6], np.ones((2, k + 1), np.int64), np.full((2, 1), k))
        logits = be.decode(*step, by_logits)
        ids = be.decode_greedy(*step, by_ids)
        assert ids.dtype == np.int64 and ids.shape == (2,)
        np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
        assert be.sessions["decoder"].get_outputs()[1].name == "next_token"
    calls = []
    original = be.decode_greedy
    be.decode_greedy = lambda *a: calls.append(1) or original(*a)
    images = sample_images(2, seed=5)
    fused = pipe.generate(PROMPT, images, max_new_tokens=10)
    plain = edgelmm.load(b, backend="onnxruntime", provider="cpu", precision="fp32", layout="plain")
    assert fused.token_ids == plain.generate(PROMPT, images, max_new_tokens=10).token_ids
    assert len(calls) == len(fused.token_ids) - 1  # every step after the prompt's
    requests = [(PROMPT, images), ("What is in <image>?", sample_images(1, seed=6))]
    assert [g.token_ids for g in pipe.generate_batch(requests, max_new_tokens=8)] == \
        [g.token_ids for g in plain.generate_batch(requests, max_new_tokens=8)]
    calls.clear()
    sampled = pipe.generate(PROMPT, images, max_new_tokens=6, temperature=0.8, seed=3)  # sampling: logits, not ids
    assert not calls
    assert sampled.token_ids == plain.generate(PROMPT, images, max_new_tokens=6, temperature=0.8, seed=3).token_ids


def test_cuda_graph_slots_keep_their_buffers(bundle):
    """The bookkeeping a captured step relies on, run here on the CPU provider (which ignores the
    graph id; the capture itself is tests/test_gpu.py's): one slot per batch size whose buffers every
    generation borrowing it reuses, a second generation at the same time on buffers of its own, a
    generation that outgrows the slot leaving it, and the answers those of the uncaptured path."""
    from edgelmm.runtimes.ort_fused import GraphSlots

    b = bundle("llava-siglip")
    want = _fused(b)
    pipe = _fused(b)
    be = pipe.backend
    be.graph_slots = GraphSlots(be, 64)
    assert be.run_options(1).get_run_config_entry("gpu_graph_id") == "1"
    first = be.new_cache(1)
    address = [v.data_ptr() for v in first.values]
    assert first.graph_id == 1 and first.capacity == 64 and first.step is be.graph_slots.slots[1].step
    second = be.new_cache(1)  # the slot is taken: its own buffers, uncaptured
    assert second.graph_id == -1 and [v.data_ptr() for v in second.values] != address
    del first, second
    again = be.new_cache(1)
    assert again.graph_id == 1 and [v.data_ptr() for v in again.values] == address
    del again
    images = sample_images(1, seed=7)
    short = "What is in <image>?"
    assert pipe.generate(short, images, max_new_tokens=8).token_ids == want.generate(short, images, max_new_tokens=8).token_ids
    assert be.graph_slots.slots[1].owner() is None  # the generation gave it back when it ended
    # a prompt past the slot's 64 positions: the cache leaves the slot, the answer is the same
    long_prompt = PROMPT
    got = pipe.generate(long_prompt, sample_images(2, seed=8), max_new_tokens=8)
    assert len(pipe.prepare(long_prompt, sample_images(2, seed=8)).input_ids) > 64
    assert got.token_ids == want.generate(long_prompt, sample_images(2, seed=8), max_new_tokens=8).token_ids
    fresh = be.new_cache(1)
    assert fresh.graph_id == 1 and [v.data_ptr() for v in fresh.values] == address
    del fresh
    requests = [(short, images), (short, sample_images(1, seed=9))]
    assert [g.token_ids for g in pipe.generate_batch(requests, max_new_tokens=6)] == \
        [g.token_ids for g in want.generate_batch(requests, max_new_tokens=6)]
    assert sorted(be.graph_slots.slots) == [1, 2] and be.describe()["cuda_graph"] == {"capacity": 64, "batch_sizes": [1, 2]}


def test_cuda_graph_needs_the_cuda_provider_and_the_fused_layout(bundle):
    """cuda_graph is refused, saying what it needs, where it cannot run: another provider than
    CUDA, the plain layout, a bad context size (on a GPU, an fp32 decoder too: tests/test_gpu.py)."""
    from edgelmm.errors import BackendUnavailable
    from edgelmm.runtimes.onnxruntime import GpuOptions

    b = bundle("llava-siglip")
    for provider in ("cpu", "auto"):
        with pytest.raises(BackendUnavailable, match="cuda_graph .* provider 'cuda'"):
            edgelmm.load(b, backend="onnxruntime", provider=provider, gpu_options=GpuOptions(cuda_graph=True))
    with pytest.raises(BackendUnavailable, match="layout 'plain' cannot be captured"):
        edgelmm.load(b, backend="onnxruntime", provider="cuda", layout="plain", gpu_options=GpuOptions(cuda_graph=True))
    with pytest.raises(OptionError, match="cuda_graph_context"):
        edgelmm.load(b, backend="onnxruntime", provider="cuda", gpu_options=GpuOptions(cuda_graph=True,
                                                                                       cuda_graph_context=0))


def test_cli_cuda_graph_flag(bundle, tmp_path):
    """`edgelmm run --cuda-graph` asks for ONNX Runtime's CUDA provider: other backends are refused
    before loading, and where the provider does not run (no GPU here) the error says so, typed."""
    import json

    from PIL import Image

    from .test_cli import cli

    image = tmp_path / "a.png"
    Image.fromarray(sample_images(1)[0]).save(image)
    args = ["run", bundle("llava-siglip"), "-p", "What is in <image>?", "-i", image, "--cuda-graph", "--json"]
    r = cli(*args, "--backend", "llamacpp")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "OptionError"
    assert "--cuda-graph runs ONNX Runtime's CUDA provider" in json.loads(r.stdout)["message"]
    from edgelmm.runtimes.onnxruntime import nvidia_gpu_present

    if not nvidia_gpu_present():
        r = cli(*args, "--precision", "fp32")
        assert r.returncode == 2 and json.loads(r.stdout)["error"] == "BackendUnavailable", r.stdout
        assert "provider 'cuda'" in json.loads(r.stdout)["message"]


def test_fp16_fused_decoder_through_the_graph_slots(checkpoint, tmp_path):
    """The fp16 fused decoder (what a CUDA graph captures) on the CPU provider: its step buffers hold
    fp16 embeddings and logits, borrowed from a slot or not, and the answers are the same; its next
    token is the argmax of its fp16 logits."""
    from edgelmm.export import export
    from edgelmm.runtimes.ort_fused import GraphSlots

    path = export(checkpoint("llava-siglip"), tmp_path / "bundle", ["onnx"], precisions=["fp32", "fp16"],
                  verify=False, quiet=True)
    alone = edgelmm.load(path, backend="onnxruntime", provider="cpu", precision="fp16", layout="fused")
    slotted = edgelmm.load(path, backend="onnxruntime", provider="cpu", precision="fp16", layout="fused")
    slotted.backend.graph_slots = GraphSlots(slotted.backend, 96)
    assert slotted.backend.kv_dtype == np.float16
    for prompt, images in (("What is in <image>?", sample_images(1, seed=1)), (PROMPT, sample_images(2, seed=2))):
        want = alone.generate(prompt, images, max_new_tokens=10)
        assert slotted.generate(prompt, images, max_new_tokens=10).token_ids == want.token_ids
    step = slotted.backend.graph_slots.slots[1].step
    assert step.host["inputs_embeds"].dtype == np.float16 and step.host["logits"].dtype == np.float16
    assert int(step.next_tokens()[0]) == int(np.argmax(step.logits()[0]))


def _rewritten_fused(b, out, edit):
    """A copy of bundle `b` at `out` whose fp32 fused graph `edit(model, artifact)` changed, re-hashed
    (the manifest's checksums match: what the runtime then sees is the graph itself)."""
    import json
    import shutil

    import onnx

    from edgelmm.bundle import file_entry

    shutil.copytree(b, out)
    manifest = json.loads((out / "edgelmm.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["graph"] == "decoder_fused" and a["precision"] == "fp32")
    model = onnx.load(str(out / art["file"]))
    edit(model, art)
    onnx.save(model, str(out / art["file"]))
    art["files"] = [file_entry(out, art["file"])] + art["files"][1:]
    art["sha256"] = art["files"][0]["sha256"]
    for entry in manifest.get("files", []):
        if entry["file"] == art["file"]:
            entry.update(art["files"][0])
    (out / "edgelmm.json").write_text(json.dumps(manifest))
    return out


def test_a_fused_graph_without_next_token_still_runs(bundle, tmp_path):
    """A bundle exported before the fused graph had its next_token output: the steps bind logits
    only, greedy ids are the host's argmax, and the answers are the same."""
    def drop_next_token(model, art):
        graph = model.graph
        kept = [n for n in graph.node if n.op_type != "ArgMax"]
        del graph.node[:]
        graph.node.extend(kept)
        outputs = [o for o in graph.output if o.name != "next_token"]
        del graph.output[:]
        graph.output.extend(outputs)
        art["outputs"] = [o for o in art["outputs"] if o["name"] != "next_token"]

    b = bundle("llava-siglip")
    before, now = _fused(_rewritten_fused(b, tmp_path / "before-next-token", drop_next_token)), _fused(b)
    assert not before.backend.has_next_token and now.backend.has_next_token
    images = sample_images(2, seed=11)
    assert before.generate(PROMPT, images, max_new_tokens=10).token_ids == \
        now.generate(PROMPT, images, max_new_tokens=10).token_ids


def test_a_fused_graph_of_other_names_is_a_bundle_error(bundle, tmp_path):
    """The step buffers bind the fused graph's inputs and outputs by name and size: a graph whose
    logits are renamed is refused at load, naming its file, not at the first step from inside ONNX
    Runtime. (A symbolic vocabulary size in the graph's declared output is no case: ONNX Runtime
    reports the size its shape inference finds.)"""
    def rename_logits(model, art):
        for node in model.graph.node:
            node.output[:] = ["scores" if x == "logits" else x for x in node.output]
            node.input[:] = ["scores" if x == "logits" else x for x in node.input]
        model.graph.output[0].name = "scores"
        art["outputs"][0]["name"] = "scores"

    with pytest.raises(BundleError, match=r"decoder_fused\.onnx: the fused decoder .* gives scores"):
        _fused(_rewritten_fused(bundle("llava-siglip"), tmp_path / "renamed", rename_logits))
