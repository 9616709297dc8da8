"""The shipped reference model: it loads through from_pretrained like a user's checkpoint, keeps
the accuracy its model card states, and its two tokenizer files agree (llama.cpp reads one,
edgelmm the other)."""

import json

import pytest

import edgelmm
from edgelmm import synthetic
from edgelmm.evaluate import evaluate
from edgelmm.models import reference_model, reference_results

CI_SAMPLES = 180   # the first 180 held-out samples: 20 per task


@pytest.fixture(scope="module")
def reference_pipeline():
    return edgelmm.load(reference_model(), backend="torch", threads=2)


def test_accuracy_holds_on_a_held_out_subset(reference_pipeline):
    card = reference_results()
    report = evaluate(reference_pipeline, CI_SAMPLES)
    # The same samples through the same weights: only kernel rounding on another CPU may flip an answer.
    assert report.accuracy >= card["ci_subset"]["accuracy"] - 0.02, report.as_dict()
    assert report.accuracy >= card["test"]["accuracy"] - 0.05, report.as_dict()
    for skill, row in report.skills().items():
        assert row["accuracy"] >= card["ci_subset"]["skills"][skill] - 0.05, (skill, row)
    # Better than always giving the most common answer, overall.
    chance = sum(t.chance * t.total for t in report.tasks) / report.samples
    assert report.accuracy >= chance + 0.2


def test_model_card_states_the_recorded_figures():
    card = (reference_model() / "README.md").read_text()
    results = reference_results()
    assert f"{results['test']['accuracy']:.1%}" in card
    for skill, row in results["test"]["skills"].items():
        assert f"| {skill} |" in card and f"{row['accuracy']:.1%}" in card


def test_architecture_fits_the_exporters():
    cfg = json.loads((reference_model() / "config.json").read_text())
    text = cfg["text_config"]
    assert text["hidden_size"] % 256 == 0 and text["intermediate_size"] % 256 == 0   # GGUF k-quants
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    size = sum(p.stat().st_size for p in reference_model().glob("*.safetensors"))
    assert size <= 25 * 2 ** 20


def test_sentencepiece_and_tokenizer_json_agree(reference_pipeline):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is in the dev extra")
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(reference_model() / "tokenizer.model"))
    fast = Tokenizer.from_file(str(reference_model() / "tokenizer.json"))
    for i in range(45):
        s = synthetic.make_sample("test", i)
        text = reference_pipeline.prepare(s.messages, s.images).text + " " + s.answer
        assert [sp.bos_id()] + sp.encode(text) == fast.encode(text).ids, text
