"""The procedural multi-image data: reproducible, disjoint splits, every skill present."""

import hashlib

import numpy as np
import pytest

from edgelmm import synthetic


def _digest(sample):
    h = hashlib.sha256()
    for im in sample.images:
        h.update(im.tobytes())
    return h.hexdigest()


def test_same_index_same_sample():
    a, b = synthetic.make_sample("test", 17), synthetic.make_sample("test", 17)
    assert a.answer == b.answer and a.messages == b.messages
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))


def test_splits_are_disjoint():
    train = {_digest(s) for s in synthetic.make_split("train", 450)}
    test = {_digest(s) for s in synthetic.make_split("test", 450)}
    val = {_digest(s) for s in synthetic.make_split("val", 450)}
    assert len(train) == len(test) == len(val) == 450
    assert not train & test and not train & val and not val & test


@pytest.mark.parametrize("task", [t.name for t in synthetic.TASKS])
def test_every_task_is_a_real_question(task):
    shares = synthetic.answer_vocabulary(task, n=120)
    assert len(shares) >= 2, f"{task} always has the same answer"
    assert max(shares.values()) < 0.6, f"{task} is dominated by one answer: {shares}"
    s = synthetic.make_sample("val", [t.name for t in synthetic.TASKS].index(task))
    markers = sum(m["content"].count("<image>") for m in s.messages)
    assert markers == len(s.images) >= 2
    assert all(im.shape == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3) and im.dtype == np.uint8
               for im in s.images)


def test_skills_cover_the_mantis_list():
    assert {"co-reference", "comparison", "reasoning", "temporal", "in-context"} <= set(synthetic.SKILLS)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        synthetic.make_sample("dev", 0)
