"""The reference model's training script is reproducible: same seed, same weights, bit for bit."""

import hashlib

import pytest

pytest.importorskip("sentencepiece", reason="retraining needs the dev extra (sentencepiece)")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    from edgelmm.testing.train_reference import build_model, build_tokenizer, train

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        build_tokenizer(out)
        build_model(out, seed=3)
        log = train(out, steps=2, seed=3, batch_size=4, lr=1e-3, threads=1, log_every=1, val_samples=9)
        assert log["history"][-1]["loss"] > 0
        digests.append((_sha(out / "tokenizer.model"), _sha(out / "tokenizer.json"), _sha(out / "model.safetensors")))
    assert digests[0] == digests[1]
