"""A fast, seeded slice of the bad-input fuzz campaign (benchmarks/fuzz.py runs the whole one):
damaged manifests, GGUF headers and ONNX graphs, bad images, videos, prompts and options, each case in
its own process. Every case must end typed (naming the culprit) or accepted where that is allowed:
no crash, no hang, no traceback, nothing wrongly accepted or opened.

Reproduce one failing case with `python benchmarks/fuzz.py --replay KIND/NAME:SEED`."""

import os

import pytest

from edgelmm.testing import fuzz

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

CASES = 250          # the controls, then about 40 per kind
SEED = 0
QWEN_GGUF_CASES = 60
TIMEOUT_S = 300      # per case: only a hang comes near it, even with both cores busy with other work


@pytest.fixture(scope="module")
def fuzz_fixtures(tmp_path_factory, reference_gguf_bundle):
    """The reference model's ONNX + GGUF export (shared with other tests), images and a short video."""
    return fuzz.ensure_fixtures(tmp_path_factory.mktemp("fuzz") / "fixtures", log=lambda msg: None,
                                bundle=reference_gguf_bundle)


def test_fuzz_slice(fuzz_fixtures, tmp_path):
    report = fuzz.campaign(cases=CASES, seed=SEED, jobs=max(2, min(4, os.cpu_count() or 2)), timeout=TIMEOUT_S,
                           include_slow=False, fixtures=fuzz_fixtures, work=tmp_path, log=lambda msg: None)
    assert set(fuzz.KINDS) <= set(report["by_kind"]), "every kind of bad input is in the slice"
    _assert_clean(report)


def test_gguf_slice_on_an_m_rope_model(checkpoint, tmp_path):
    """Damaged qwen2vl LLMs and qwen2vl_merger mmprojs (the architecture with four positions per token
    and its own keys): the GGUF kind of the campaign on the tiny Qwen2-VL's ONNX + f32 GGUF export.
    750 such cases on Qwen2-VL and Qwen2.5-VL bundles (seeds 0-3) found one gap: qwen2vl.vocab_size
    went unchecked."""
    from edgelmm.export import export

    bundle = export(checkpoint("qwen2vl"), tmp_path / "bundle", formats=("onnx", "gguf"), gguf_types=("f32",),
                    verify=False, quiet=True)
    fixtures = fuzz.ensure_fixtures(tmp_path / "fixtures", log=lambda msg: None, bundle=bundle)
    report = fuzz.campaign(cases=QWEN_GGUF_CASES, seed=SEED, jobs=max(2, min(4, os.cpu_count() or 2)),
                           kinds=["gguf"], timeout=TIMEOUT_S, include_slow=False, fixtures=fixtures,
                           work=tmp_path / "cases", log=lambda msg: None)
    assert report["by_kind"]["gguf"], report["by_kind"]
    _assert_clean(report)


def _assert_clean(report):
    print("\n" + fuzz.format_counts(report))
    failures = "\n".join(f"[{f['outcome']}] {f['mutator']}:{f['seed']} ({'; '.join(f['notes'] or [])}): "
                         f"{f['reason'][:300]}" for f in report["failures"])
    assert report["base_intact"], "a case modified the base bundle"
    assert sum(report["counts"][o] for o in fuzz.FAILING + ("harness",)) == 0, (
        f"{fuzz.format_counts(report)}\n{failures}\n"
        f"replay one with: python benchmarks/fuzz.py --replay KIND/NAME:SEED")
