"""Calibration and the importance matrix stay bounded whatever the number of prompts and tiles
(issue 22: SmolVLM makes 17 tiles of every image): tile feeds are made on demand within a budget,
INT8 ranges are streamed one tile at a time yet equal what ONNX Runtime computes from every tile at
once, and the importance matrix runs the prompts that fit the budget, without the logits."""

import json
import shutil

import numpy as np
import pytest

from edgelmm.calib import CalibrationOptions, TileFeeds, calibrate, collect
from edgelmm.errors import CalibrationOptionError


def _family(path):
    from edgelmm.families import detect
    from edgelmm.modelfiles import ModelFiles

    return detect(ModelFiles.open(path))


def test_tile_feeds_spread_a_budget_over_every_prompt(checkpoint):
    family = _family(checkpoint("idefics3"))
    samples = collect("synthetic", 8, 0).samples
    tiles = [family.preprocess(s.images).pixel_values for s in samples]  # 5 tiles per image here
    feeds = TileFeeds(family, ["pixel_values", "pixel_attention_mask"], samples, 20, seed=0)
    picks = list(feeds.picks())
    assert len(picks) == 20 and {k for k, _, _ in picks} == set(range(len(samples)))
    assert [(k, i) for k, i, _ in picks] == [(k, i) for k, i, _ in feeds.picks()]  # the same tiles every pass
    for k, i, feed in picks:
        assert np.array_equal(feed["pixel_values"], tiles[k][i:i + 1])
        assert feed["pixel_attention_mask"].shape == (1, *tiles[k].shape[2:])
        assert feed["pixel_attention_mask"].dtype == np.int64
    every = list(TileFeeds(family, ["pixel_values"], samples, 10_000, seed=0))
    assert len(every) == sum(len(t) for t in tiles) and set(every[0]) == {"pixel_values"}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_ranges_streamed_tile_by_tile_equal_ranges_from_every_tile_at_once(bundle, method, tmp_path, monkeypatch):
    from onnxruntime.quantization.calibrate import (CalibrationMethod, HistogramCalibrater, MinMaxCalibrater,
                                                    create_calibrator, load_tensors_data)

    from edgelmm.calib.quantize import COMPUTE_OP_TYPES, ENTROPY_OPTIONS, FeedReader, _calibrate_ranges, entropy_threshold

    root = bundle("idefics3")
    src = root / "onnx/vision.onnx"
    feeds = list(TileFeeds(_family(root), ["pixel_values", "pixel_attention_mask"],
                           collect("synthetic", 6, 0).samples, 24, seed=0))
    kind = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
    at_once = create_calibrator(src, list(COMPUTE_OP_TYPES), augmented_model_path=str(tmp_path / "a.onnx"),
                                calibrate_method=kind, extra_options=ENTROPY_OPTIONS if method == "entropy" else {})
    at_once.collect_data(FeedReader(feeds))
    if method == "entropy":  # the thresholds' search is compared with ORT's on its own below
        at_once.collector.get_entropy_threshold = entropy_threshold
    want = at_once.compute_data()

    sizes, arenas = [], set()
    for cls in (MinMaxCalibrater, HistogramCalibrater):
        def spy(self, reader, real=cls.collect_data):
            sizes.append(len(reader))
            arenas.add(self.infer_session.get_session_options().enable_cpu_mem_arena)
            return real(self, reader)
        monkeypatch.setattr(cls, "collect_data", spy)
    tiles = _calibrate_ranges(src, feeds, kind, list(COMPUTE_OP_TYPES), tmp_path / "ranges.json", tmp_path, False)
    got = load_tensors_data(tmp_path / "ranges.json")
    assert tiles == len(feeds) == 24 and set(sizes) == {1}  # one tile per collect_data call
    assert arenas == {False}  # each tile's activations go back when its run ends
    assert len(sizes) == (1 if method == "minmax" else 2) * len(feeds)
    assert set(got.keys()) == set(want.keys())
    # Percentile bins |x| from 0 where ORT bins from the smallest |x|: the same up to one bin.
    rtol = 1e-3 if method == "percentile" else 1e-6
    for name in want.keys():
        np.testing.assert_allclose(np.ravel(got[name].range_value), np.ravel(want[name].range_value),
                                   rtol=rtol, atol=1e-6, err_msg=name)


def test_entropy_threshold_is_onnx_runtimes(bundle):
    """The array form of the entropy (KL) threshold search picks exactly ORT's thresholds, on the
    histograms of real vision activations and on heavy-tailed ones with empty bins."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from edgelmm.calib.quantize import entropy_threshold

    rng = np.random.default_rng(0)
    ort = HistogramCollector("entropy", False, 512, 255, 99.99, "same")
    values = [rng.standard_normal(4000), rng.standard_t(2, 3000) * 5, np.abs(rng.standard_normal(2000)),
              np.concatenate([rng.standard_normal(3000), [40.0, -60.0]])]
    for bins, x in zip((512, 768, 512, 1024), values):
        x = x.astype(np.float32)
        counts, edges = np.histogram(x, bins, range=(x.min(), x.max()))
        histogram = (counts, edges.astype(np.float32), x.min(), x.max())
        assert entropy_threshold(histogram, 255) == ort.get_entropy_threshold(histogram, 255)


def _naive_imatrix(pipe, samples):
    """The importance matrix as it was computed before issue 22: every prompt, one vision batch,
    float64 hooks on every linear layer, lm_head run on every position."""
    import torch

    from edgelmm.gguf_names import LLAMA, block_linears

    parts = pipe.family.torch_parts(pipe.backend.model)
    sums, counts = {}, {}

    def hook_for(name):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [layer.get_submodule(path).register_forward_pre_hook(hook_for(name.format(i=i)))
               for i, layer in enumerate(parts.decoder.layers) for path, name in block_linears(LLAMA).items()]
    handles.append(parts.lm_head.register_forward_pre_hook(hook_for("output.weight")))
    with torch.inference_mode():
        for s in samples:
            embeds = torch.from_numpy(pipe.merged_embeddings(pipe.prepare(s.messages, s.images)))
            n = embeds.shape[1]
            out = parts.decoder(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                                position_ids=torch.arange(n)[None], use_cache=False)
            parts.lm_head(out.last_hidden_state)
    for h in handles:
        h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def test_importance_matrix_within_a_tile_budget(pipelines):
    from edgelmm.export.imatrix import compute_imatrix

    pipe = pipelines("idefics3")
    samples = collect("synthetic", 5, 0).samples
    full = compute_imatrix(pipe.family, pipe.backend.model, samples, "synthetic", max_tiles=10_000)
    tiles = [sum(pipe.prepare(s.messages, s.images).vision.tiles_per_image) for s in samples]
    assert full.prompts == 5 and full.tiles == sum(tiles) and not full.skipped
    naive = _naive_imatrix(pipe, samples)
    assert set(full.values) == set(naive)
    for name, v in naive.items():
        np.testing.assert_allclose(full.values[name], v, rtol=1e-5, err_msg=name)

    budget = tiles[0] + tiles[1]
    bounded = compute_imatrix(pipe.family, pipe.backend.model, samples, "synthetic", max_tiles=budget)
    assert bounded.prompts == 2 and bounded.tiles == budget and bounded.skipped == {"tile budget": 3}
    assert bounded.summary()["tiles"] == budget
    first = compute_imatrix(pipe.family, pipe.backend.model, samples, "synthetic", max_tiles=1)
    assert first.prompts == 1 and first.tiles == tiles[0]  # the first prompt runs whatever the budget


def test_calibrate_within_a_tile_budget(bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(bundle("idefics3"), root)
    opts = CalibrationOptions(calib_samples=6, calib_tiles=7, eval_samples=0, gate=False)
    r = calibrate(root, ["int8-vision+int4"], opts)
    m = json.loads((root / "edgelmm.json").read_text())
    cal = m["calibration"]["int8-vision+int4"]
    assert cal["options"]["calib_tiles"] == 7 and cal["graphs"]["vision.int8"]["calibration_tiles"] == 7
    assert 0 < cal["graphs"]["vision.int8"]["scored_tiles"] <= 32
    q = r.quality["int8-vision+int4"]
    assert q["held_out_prompts"] == r.calibration["held_out"] == 2 and q["vision_cosine_min"] > 0.9
    with pytest.raises(CalibrationOptionError, match=r"calibration tiles \(calib_tiles\)"):
        CalibrationOptions(calib_tiles=0).validate()
