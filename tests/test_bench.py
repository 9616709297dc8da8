"""`edgelmm bench`: a fast smoke run on a tiny bundle (1 repeat) whose report must hold every field,
each positive, and typed errors for what cannot be measured."""

import json

from typer.testing import CliRunner

from edgelmm.cli import app

FIELDS = ("vision_ms_per_image_1", "vision_ms_per_image_4", "ttft_ms", "prefill_tokens_per_s",
          "decode_tokens_per_s")


def test_bench_smoke(bundle, capsys, monkeypatch):
    r = CliRunner().invoke(app, ["bench", str(bundle("llava-siglip")), "--repeats", "1", "--new-tokens", "3",
                                 "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["memory_bandwidth_gb_s"] > 0 and report["read_bandwidth_gb_s"] > 0 and report["threads"] == 1
    rows = report["results"]
    # ONNX Runtime in both decoder layouts the bundle has
    assert [(row["backend"], row["precision"], row["layout"]) for row in rows] == \
        [("onnxruntime", "fp32", "plain"), ("onnxruntime", "fp32", "fused")]
    for row in rows:  # the decode step after 100 positions; 2000 is past this model's 1024
        assert "error" not in row, row
        assert set(row["decode_ms_at_context"]) == {"100"} and row["decode_ms_at_context"]["100"] > 0
    row = rows[0]
    for field in FIELDS:
        assert row[field]["median"] > 0 and row[field]["spread"] >= 0, field
    for field in ("peak_rss_mib", "size_mib", "decode_bytes_per_token", "roofline_tokens_per_s", "roofline_fraction",
                  "read_roofline_tokens_per_s", "read_roofline_fraction", "prompt_tokens"):
        assert row[field] > 0, field
    # each roofline is its bandwidth over the bytes a step reads, and the fraction the decode speed over it
    for prefix, bandwidth in (("", "memory_bandwidth_gb_s"), ("read_", "read_bandwidth_gb_s")):
        roof = report[bandwidth] * 1e9 / row["decode_bytes_per_token"]
        assert abs(row[prefix + "roofline_tokens_per_s"] - roof) <= 0.05 + 1e-3 * roof, prefix
        fraction = row["decode_tokens_per_s"]["median"] / roof
        assert abs(row[prefix + "roofline_fraction"] - fraction) <= 1e-3 + 1e-3 * fraction, prefix
    assert row["new_tokens"] == 3 and row["prompt_images"] == 2
    # bytes a step reads: the weights plus 2 x layers x kv heads x head dim fp32 values per position
    from edgelmm.bundle import open_bundle

    text = open_bundle(bundle("llava-siglip")).manifest["text"]
    per_position = 2 * text["num_layers"] * text["num_kv_heads"] * text["head_dim"] * 4
    assert set(row["decode_bytes_at_context"]) == {"100"}
    mean_ctx = row["prompt_tokens"] + 3 / 2
    assert abs(row["decode_bytes_per_token"] - row["decode_bytes_at_context"]["100"]
               - per_position * (mean_ctx - 100)) <= 1
    assert row["gpu_memory_mib"] is None or row["gpu_memory_mib"] >= 0
    # the worker's own peak, not its parent's (the parent held the bandwidth buffers, 512 MiB)
    assert row["peak_rss_mib"] < 400
    # The text table at 80 columns: too wide for the ten columns, so one block per result, names whole.
    from edgelmm.bench import TABLE_COLUMNS, table_rows
    from edgelmm.cli import _print_rows

    monkeypatch.setenv("COLUMNS", "80")
    _print_rows("speed", TABLE_COLUMNS, table_rows(report), names=2)
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 80
    assert "onnxruntime (plain) fp32" in text.splitlines() and "onnxruntime (fused) fp32" in text.splitlines()
    assert f"  decode tok/s: {row['decode_tokens_per_s']['median']:.1f}" in text


def test_bench_errors(bundle):
    r = CliRunner().invoke(app, ["bench", str(bundle("llava-siglip")), "--backends", "cuda", "--json"])
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "BackendUnavailable"
    r = CliRunner().invoke(app, ["bench", str(bundle("llava-siglip")), "--backends", "llamacpp", "--json"])
    out = json.loads(r.output)
    assert r.exit_code == 2 and "no gguf artifacts" in out["message"]
    r = CliRunner().invoke(app, ["bench", str(bundle("llava-siglip")), "--repeats", "0", "--json"])
    assert r.exit_code == 2 and "at least 1" in json.loads(r.output)["message"]


def test_bench_runs_an_m_rope_model(bundle):
    """Qwen2-VL's decoder takes [3, batch, seq] positions: every timing, the context probe's decoder-only
    steps included, is measured with them."""
    r = CliRunner().invoke(app, ["bench", str(bundle("qwen2vl")), "--repeats", "1", "--new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert rows and all("error" not in row for row in rows), rows
    assert all(row["decode_ms_at_context"]["100"] > 0 and row["decode_tokens_per_s"]["median"] > 0 for row in rows)


def test_bandwidth_script_compares_gemv_to_both_rooflines():
    """benchmarks/bandwidth.py on small buffers: every figure measured, and the ratios it prints are the
    fastest GEMV over each bandwidth (speeds themselves are not asserted: CI shares its cores)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bandwidth.py"
    r = subprocess.run([sys.executable, str(script), "--gemv-mib", "4", "--stream-mib", "8", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gemv_weights_mib"] == 4.0
    speeds = ("read_gb_s", "copy_gb_s", "openblas_dot_gb_s", "openblas_gemv_x_w_gb_s", "openblas_gemv_wt_x_gb_s",
              "onnxruntime_matmul_gb_s", "onnxruntime_int4_gemv_gb_s", "onnxruntime_int4_gemv_in_cache_gb_s")
    assert all(out[k] > 0 for k in speeds), out
    gemv = max(out["openblas_gemv_x_w_gb_s"], out["openblas_gemv_wt_x_gb_s"], out["onnxruntime_matmul_gb_s"])
    assert abs(out["best_gemv_vs_read"] - gemv / out["read_gb_s"]) <= 1e-3 + 1e-3 * out["best_gemv_vs_read"]
    assert abs(out["best_gemv_vs_copy"] - gemv / out["copy_gb_s"]) <= 1e-3 + 1e-3 * out["best_gemv_vs_copy"]


def test_in_cache_needs_both_the_size_and_a_faster_read():
    """`fits_in_cache` is not the reported cache size alone (a VM reports its host's): the step's bytes
    must fit AND read faster than the DRAM stream. Bounds far from any machine keep this off the clock."""
    from edgelmm.bench import reads_from_cache

    mib = 1 << 20
    assert not reads_from_cache(2 * mib, None, 1e-3)       # no cache size known
    assert not reads_from_cache(64 * mib, 32 * mib, 1e-3)  # larger than the cache
    assert reads_from_cache(mib, 32 * mib, 1e-3)           # fits, and reads faster than 1 MB/s
    assert not reads_from_cache(mib, 32 * mib, 1e6)        # fits, but no faster than a 1 PB/s "DRAM"


def test_in_cache_probes_the_steps_own_bytes_against_a_quarter_faster(monkeypatch):
    """The probe reads the step's own byte count (at least 1 MiB), and "in cache" starts past 1.25x."""
    import edgelmm.bench as bench

    probed = []
    speed = {"gb_s": 0.0}

    def fake_read(nbytes, repeats=10):
        probed.append(nbytes)
        return speed["gb_s"]

    monkeypatch.setattr(bench, "_read_gb_s", fake_read)
    speed["gb_s"] = 12.6
    assert bench.reads_from_cache(3_000_001, 32 << 20, 10.0) and probed == [3_000_001]
    speed["gb_s"] = 12.4
    assert not bench.reads_from_cache(1000, 32 << 20, 10.0) and probed[-1] == 1 << 20
