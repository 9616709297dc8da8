"""The manifest is hostile input: every reproduction of the bad-input campaign ends in a BundleError
naming the field or file, before any session is created; the checksum cannot be bypassed; a
second thread and a batch on llama.cpp get right answers."""

import hashlib
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest

import edgelmm
from edgelmm.bundle import MANIFEST, open_bundle
from edgelmm.errors import BundleError
from edgelmm.testing import sample_images


@pytest.fixture
def bundle_copy(reference_bundle, tmp_path):
    """The reference bundle with its files hard-linked (cheap) and its manifest a real copy."""
    dst = tmp_path / "bundle"
    shutil.copytree(reference_bundle, dst, copy_function=os.link)
    (dst / MANIFEST).unlink()
    shutil.copy(reference_bundle / MANIFEST, dst / MANIFEST)
    return dst


def _edit(root, change):
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    (root / MANIFEST).write_text(json.dumps(m))


def _art(m, graph="decoder"):
    return next(a for a in m["artifacts"] if a["graph"] == graph and a["precision"] == "fp32")


def _set(path, value):
    def change(m):
        obj = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


def _outside_entry(m):
    data = open("/etc/passwd", "rb").read()
    m["files"][0] = {"file": "/etc/passwd", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _decoder_entry_outside(m):
    dec = _art(m)
    dec["file"] = "../" + dec["file"]


def _duplicate_first(m):
    vision = _art(m, "vision")  # hashed and consistent: only its duplicate key is wrong
    m["artifacts"].insert(0, {**_art(m), "file": vision["file"], "files": vision["files"]})


CASES = {
    "missing text": (lambda m: m.pop("text"), r"\(top level\): lacks text"),
    "format_version as a string": (_set(["format_version"], "1"), r"format_version '1' is not one"),
    "format_version true": (_set(["format_version"], True), r"format_version True is not one"),
    "num_layers 1e9": (_set(["text", "num_layers"], 10 ** 9), r"text\.num_layers: 1000000000 is outside 1\.\.4096"),
    "num_layers negative": (_set(["text", "num_layers"], -1), r"text\.num_layers: -1 is outside"),
    "num_layers a float": (_set(["text", "num_layers"], 2.0), r"text\.num_layers: expected an integer, got float"),
    "vocab a string": (_set(["text", "vocab_size"], "many"), r"text\.vocab_size: expected an integer, got str"),
    "files not a list": (_set(["files"], {"a": 1}), r"field files: expected a list, got dict"),
    "files entry lacks sha256": (lambda m: m["files"][0].pop("sha256"), r"files\[0\]: lacks sha256"),
    "sha256 not hex": (lambda m: m["files"][0].update(sha256="zz"), r"files\[0\]\.sha256: 'zz' is not a valid"),
    "negative size": (lambda m: m["files"][0].update(size=-4), r"files\[0\]\.size: -4 is outside"),
    "file outside with its real hash": (_outside_entry, r"files\[0\]\.file: '/etc/passwd' is not a relative path"),
    "artifact file absolute": (lambda m: _art(m).update(file="/etc/passwd"),
                               r"artifacts\[\d+\]\.file: '/etc/passwd' is not a relative path"),
    "artifact file ../": (_decoder_entry_outside, r"artifacts\[\d+\]\.file: '\.\./onnx/decoder\.onnx' is not"),
    "artifact with no hashed files": (lambda m: _art(m).update(files=[]),
                                      r"artifacts\[\d+\]\.file: 'onnx/decoder\.onnx' is not one of the artifact's hashed"),
    "artifact file not among its files": (lambda m: _art(m).update(file="onnx/embed.onnx"),
                                          r"artifacts\[\d+\]\.file: 'onnx/embed\.onnx' is not one of"),
    "duplicate artifact placed first": (_duplicate_first, r"artifacts\[\d+\]: a second onnx/fp32 decoder artifact"),
    "unknown format": (lambda m: _art(m).update(format="exe"), r"artifacts\[\d+\]\.format: 'exe' is not one of"),
    "unknown family": (_set(["family"], "gpt"), r"family: 'gpt' is not a family"),
    "config.json unlisted": (lambda m: m.update(files=[e for e in m["files"] if e["file"] != "config.json"]),
                             r"files: does not list config\.json"),
    "quality not an object": (_set(["quality"], {"int4": 3}), r"quality\.int4: expected an object, got int"),
    "same file, two hashes": (lambda m: _art(m, "vision")["files"].append({**_art(m)["files"][0], "size": 1}),
                              r"'onnx/decoder\.onnx' is listed twice with different sizes"),
    "artifact without inputs": (lambda m: _art(m).pop("inputs"), r"artifacts\[\d+\]: lacks inputs"),
    "the manifest a list": (lambda m: None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifest_field_errors_name_the_field(bundle_copy, case):
    change, pattern = CASES[case]
    if case == "the manifest a list":
        (bundle_copy / MANIFEST).write_text("[1, 2]")
        pattern = r"the manifest is a JSON list, not an object"
    else:
        _edit(bundle_copy, change)
    with pytest.raises(BundleError, match=pattern):
        edgelmm.load(bundle_copy)


@pytest.mark.parametrize("text,pattern", [
    ("{\"format_version\": " + "9" * 5000 + "}", r"not valid JSON \(Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, r"nests too deeply"),
    ("{\"format_version\": NaN}", r"NaN is not a JSON number"),
    ("{\"format_version\": 1", r"not valid JSON"),
])
def test_hostile_json_is_a_bundle_error(bundle_copy, text, pattern):
    (bundle_copy / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=pattern):
        open_bundle(bundle_copy)


def test_non_utf8_manifest(bundle_copy):
    (bundle_copy / MANIFEST).write_bytes(b'{"family": "\xff\xfe"}')
    with pytest.raises(BundleError, match=r"edgelmm\.json: the manifest is not UTF-8 text"):
        open_bundle(bundle_copy)


def test_symlink_to_outside_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / "onnx" / "embed.onnx", outside)  # same bytes: the hash would pass
    (bundle_copy / "onnx" / "embed.onnx").unlink()
    (bundle_copy / "onnx" / "embed.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match=r"'onnx/embed\.onnx' points outside the bundle"):
        open_bundle(bundle_copy)


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_fifo_in_place_of_a_graph_does_not_block(bundle_copy, verify_checksums):
    (bundle_copy / "onnx" / "embed.onnx").unlink()
    os.mkfifo(bundle_copy / "onnx" / "embed.onnx")  # opening it for reading would block forever
    with pytest.raises(BundleError, match=r"embed\.onnx: not a regular file"):
        open_bundle(bundle_copy, verify_checksums=verify_checksums)


def test_num_layers_must_match_the_decoder_graph(bundle_copy):
    _edit(bundle_copy, lambda m: m["text"].update(num_layers=m["text"]["num_layers"] + 1))
    with pytest.raises(BundleError, match=r"text\.num_layers is \d+ but the decoder graph takes \d+ past"):
        edgelmm.load(bundle_copy, backend="onnxruntime", provider="cpu", precision="fp32")


def test_bundle_is_readable_under_the_umask(reference_bundle):
    mode = reference_bundle.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o777 & ~mask


@pytest.fixture(scope="module")
def gguf_bundle(reference_gguf_bundle):
    return reference_gguf_bundle


PROMPTS = [("What shape is in <image>?", 0), ("Which of <image> and <image> has more shapes?", 1),
           ("What colour is the background of <image>?", 2), ("Compare <image> and <image>.", 3)]


def _request(i):
    prompt, seed = PROMPTS[i % len(PROMPTS)]
    return prompt, sample_images(prompt.count("<image>"), seed=seed + 10 * i)


def test_llamacpp_pipeline_from_four_threads(gguf_bundle):
    pytest.importorskip("llama_cpp")
    pipe = edgelmm.load(gguf_bundle, backend="llamacpp", precision="f32", threads=1)
    requests = [_request(i) for i in range(10)]
    sequential = [pipe.generate(p, imgs, max_new_tokens=6).token_ids for p, imgs in requests]
    results: dict[tuple[int, int], list[int]] = {}
    errors = []

    def worker(t):
        try:
            for i, (p, imgs) in enumerate(requests):
                results[t, i] = pipe.generate(p, imgs, max_new_tokens=6).token_ids
        except Exception as exc:  # collected: a thread's exception must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(results) == 40
    assert all(results[t, i] == sequential[i] for t in range(4) for i in range(10))


def test_llamacpp_batch_larger_than_one_context_is_answered_row_by_row(gguf_bundle):
    pytest.importorskip("llama_cpp")
    from edgelmm.runtimes.llamacpp import LlamaCppBackend
    from edgelmm.api import pipeline_for_bundle

    pipe = pipeline_for_bundle(open_bundle(gguf_bundle), backend="llamacpp", precision="f32", threads=1)
    requests = [_request(1), _request(3)]
    lengths = [len(pipe.prepare(p, imgs).input_ids) for p, imgs in requests]
    # A context that holds each prompt alone but not both at once (the case that failed with
    # "no room left in the KV cache").
    small = LlamaCppBackend(open_bundle(gguf_bundle), precision="f32", threads=1,
                            context_length=max(lengths) + 16)
    pipe_small = type(pipe)(pipe.files, pipe.family, small)
    assert sum(lengths) + 2 * 8 > small.n_ctx
    batch = pipe_small.generate_batch(requests, max_new_tokens=8)
    alone = [pipe.generate(p, imgs, max_new_tokens=8).token_ids for p, imgs in requests]
    assert [g.token_ids for g in batch] == alone


@pytest.mark.parametrize("out", ["/etc/passwd/bundle", "/proc/1/bundle", "/tmp/" + "x" * 300 + "/bundle"])
def test_output_path_that_cannot_exist(out):
    from edgelmm.bundle import staging_dir

    with pytest.raises(BundleError, match=r"cannot create the output folder here \((Not a directory|No such file|"
                                          r"File name too long|Permission denied|/etc/passwd is a file)"):
        with staging_dir(out):
            pass


def test_llamacpp_context_is_sized_to_what_is_asked(gguf_bundle):
    pytest.importorskip("llama_cpp")
    from edgelmm.errors import OptionError, PromptError
    from edgelmm.runtimes.llamacpp import DEFAULT_CONTEXT

    model_ctx = json.loads((gguf_bundle / "config.json").read_text())["text_config"]["max_position_embeddings"]
    default = edgelmm.load(gguf_bundle, backend="llamacpp", precision="f32", threads=1)
    assert default.backend.n_ctx == min(model_ctx, DEFAULT_CONTEXT)
    small = edgelmm.load(gguf_bundle, backend="llamacpp", precision="f32", threads=1, max_context=64)
    assert small.backend.n_ctx == 64 and small.context_length == 64
    with pytest.raises(PromptError, match=r"context window is 64"):
        small.generate("Compare <image> and <image>.", sample_images(2), max_new_tokens=4)
    with pytest.raises(OptionError, match=r"max_context must be in \[16, "):
        edgelmm.load(gguf_bundle, backend="llamacpp", precision="f32", max_context=10 ** 9)


def test_onnxruntime_vision_runs_in_bounded_chunks(reference_bundle):
    """Tiles go through the vision graph a few at a time (a bounded arena), with the features of
    one batch of every tile."""
    from edgelmm.api import pipeline_for_bundle

    bundle = open_bundle(reference_bundle)
    one = pipeline_for_bundle(bundle, backend="onnxruntime", provider="cpu", precision="fp32", threads=1)
    prepared = one.prepare("<image> <image> <image> <image> <image> <image> <image>", sample_images(7))
    pixels = prepared.vision.pixel_values
    assert len(pixels) == 7 and one.backend.vision_chunk < 7
    whole = one.backend.sessions["vision"].run(None, one.backend.vision_feeds(pixels))[0]
    chunked = one.image_features(prepared.vision)
    assert chunked.shape == whole.shape
    assert float(np.abs(chunked - whole).max()) <= 1e-5


def test_onnx_external_data_must_be_hashed(bundle_copy):
    """ONNX Runtime opens a graph's external data itself: every location the graph names must be one
    of the artifact's hashed files (the hash of the graph alone said nothing about them)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from edgelmm.bundle import file_entry
    from edgelmm.onnx_file import external_data_locations

    graph = bundle_copy / "onnx" / "embed.onnx"
    model = onnx.load(str(graph))
    graph.unlink()
    onnx.save(model, str(graph), save_as_external_data=True, location="embed.onnx.data", size_threshold=0)
    saved = onnx.load(str(graph), load_external_data=False)
    expected = [ExternalDataInfo(t).location for t in saved.graph.initializer if uses_external_data(t)]
    assert expected and external_data_locations(graph) == expected

    def relist(extra):
        def change(m):
            for art in m["artifacts"]:
                if art["file"] == "onnx/embed.onnx":
                    art["files"] = [file_entry(bundle_copy, "onnx/embed.onnx")] + [file_entry(bundle_copy, f)
                                                                                  for f in extra]
        _edit(bundle_copy, change)

    relist([])  # the graph re-hashed, its data not listed
    with pytest.raises(BundleError, match=r"embed\.onnx: the graph's weights point to 'embed\.onnx\.data', which is not"):
        edgelmm.load(bundle_copy, backend="onnxruntime", provider="cpu", precision="fp32")
    relist(["onnx/embed.onnx.data"])
    pipe = edgelmm.load(bundle_copy, backend="onnxruntime", provider="cpu", precision="fp32")
    assert pipe.generate("What is in <image>?", sample_images(1), max_new_tokens=2).token_ids

    graph.write_bytes(graph.read_bytes()[:-7])  # a length that runs past the end of the file
    with pytest.raises(BundleError, match=r"embed\.onnx: not a valid ONNX file"):
        external_data_locations(graph)


@pytest.mark.parametrize("key", ["num_kv_heads", "head_dim"])
def test_text_dims_must_match_the_decoder_graph(bundle_copy, key):
    _edit(bundle_copy, lambda m: m["text"].update({key: m["text"][key] + 1}))
    with pytest.raises(BundleError, match=r"decoder graph's past_key_values\.0\.key has shape .* but the manifest's "
                                          r"text says \d+ KV heads of \d+"):
        edgelmm.load(bundle_copy, backend="onnxruntime", provider="cpu", precision="fp32")


def test_manifest_linked_from_outside_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(bundle_copy / MANIFEST, outside)
    (bundle_copy / MANIFEST).symlink_to(outside)
    with pytest.raises(BundleError, match=r"edgelmm\.json: the manifest is a link to a file outside the bundle"):
        open_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["generation_config.json", "chat_template.jinja", "processor_config.json"])
def test_prompt_files_the_runtime_reads_must_be_hashed(bundle_copy, name):
    """ModelFiles reads these from the bundle's root when they are there: unlisted, they would be
    read unchecked."""
    if not (bundle_copy / name).exists():
        (bundle_copy / name).write_text("{}")
    _edit(bundle_copy, lambda m: m.update(files=[e for e in m["files"] if e["file"] != name]))
    with pytest.raises(BundleError, match=rf"{re.escape(name)} present but not listed \(hashed\) in the manifest"):
        edgelmm.load(bundle_copy)


def test_empty_model_path_is_not_the_current_directory():
    from edgelmm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"no model path given \(''\)"):
        edgelmm.load("")
    with pytest.raises(CheckpointError, match=r"the model path 'a\\x00b' contains a NUL byte"):
        edgelmm.load("a\x00b")


def test_onnxruntime_prefill_runs_in_bounded_chunks(reference_bundle):
    """A long prefill goes through the KV cache a chunk at a time (the attention scores of one chunk,
    not of the whole prompt): the same logits and cache as one run, with and without left padding."""
    from edgelmm.api import pipeline_for_bundle
    from edgelmm.pipeline import left_pad

    bundle = open_bundle(reference_bundle)
    pipe = pipeline_for_bundle(bundle, backend="onnxruntime", provider="cpu", precision="fp32", threads=1)
    backend = pipe.backend
    rows = [pipe.merged_embeddings(pipe.prepare(p, sample_images(k)))[0]
            for p, k in (("Compare <image> with <image>.", 2), ("What is in <image>?", 1))]
    embeds, mask, pos = left_pad(rows)
    assert embeds.shape[1] > 3 * 7
    results = []
    for chunk in (embeds.shape[1], 7):
        backend.prefill_chunk = chunk
        cache = backend.new_cache(2)
        logits = backend.decode(embeds, mask, pos, cache)
        step = backend.decode(backend.embed_tokens(np.array([[5], [6]])), np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                              pos[:, -1:] + 1, cache)
        results.append((logits, step))
    assert float(np.abs(results[0][0] - results[1][0]).max()) <= 1e-4
    assert float(np.abs(results[0][1] - results[1][1]).max()) <= 1e-4
