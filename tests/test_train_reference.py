"""The reference model's training script is reproducible (same seed, same weights, bit for bit), its
vision pre-training labels say what the scene holds, and stage 3 mixes its focus tasks in as stated."""

import hashlib

import numpy as np
import pytest

pytest.importorskip("sentencepiece", reason="retraining needs the dev extra (sentencepiece)")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_patch_labels_mark_the_patch_of_each_shape_centre():
    from edgelmm import synthetic
    from tools.train_reference import patch_labels

    objs = [synthetic.Shape("square", "blue", x=40.0, y=10.0, r=7.0),
            synthetic.Shape("circle", "red", x=63.9, y=63.9, r=6.0)]
    labels = patch_labels(objs, grid=4)
    colours = list(synthetic.COLOURS)
    assert labels.shape == (4, 4)
    assert labels[0, 2] == 1 + 1 * len(colours) + colours.index("blue")
    assert labels[3, 3] == 1 + 0 * len(colours) + colours.index("red")
    assert np.count_nonzero(labels) == 2


def test_labelled_scenes_are_seeded_and_split_apart():
    from edgelmm import synthetic

    a_img, a_objs = synthetic.labelled_scene("train", 7)
    b_img, b_objs = synthetic.labelled_scene("train", 7)
    assert np.array_equal(a_img, b_img) and a_objs == b_objs
    assert a_img.shape == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3)
    assert not np.array_equal(a_img, synthetic.labelled_scene("val", 7)[0])
    counts = [len(synthetic.labelled_scene("train", i)[1]) for i in range(60)]
    assert min(counts) == 0 and max(counts) == 5


def test_focus_batches_put_the_focus_tasks_first_and_keep_the_mixture():
    from tools.train_reference import FOCUS_TASKS, focus_sample

    batch = [focus_sample(seed=0, index=32 + k, batch_size=32) for k in range(32)]
    assert [s.task for s in batch[:16]] == list(FOCUS_TASKS) * (16 // len(FOCUS_TASKS))
    rest = {s.task for s in batch[16:]}
    assert "describe" in rest and len(rest - set(FOCUS_TASKS)) >= 5
    again = focus_sample(seed=0, index=32, batch_size=32)
    assert again.answer == batch[0].answer and all(np.array_equal(a, b) for a, b in zip(again.images, batch[0].images))
    assert focus_sample(seed=1, index=32, batch_size=32).images[0].tobytes() != batch[0].images[0].tobytes()


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    from tools.train_reference import build_model, build_tokenizer, focus, train

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        build_tokenizer(out)
        build_model(out, seed=3)
        # One step per stage: every stage's batches, optimizer and schedule, at a third of the CPU of
        # two (a bf16-autocast backward pass is seconds on a CPU without bf16 instructions).
        log = train(out, steps=1, seed=3, batch_size=4, lr=1e-3, threads=1, log_every=1, val_samples=9,
                    vision_steps=1, vision_batch_size=4, vision_val_images=8)
        stage3 = focus(out, steps=1, seed=3, batch_size=4, lr=1e-3, threads=1, log_every=1, val_samples=9)
        stages = [e["stage"] for e in log["history"] + stage3["history"]]
        assert stages == ["vision", "questions", "focus"]
        assert all(e["loss"] > 0 for e in log["history"] + stage3["history"])
        digests.append((_sha(out / "tokenizer.model"), _sha(out / "tokenizer.json"), _sha(out / "model.safetensors")))
    assert digests[0] == digests[1]
