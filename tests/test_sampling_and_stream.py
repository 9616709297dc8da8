import numpy as np
import pytest

from edgelmm import PromptError
from edgelmm.pipeline import SamplingParams, sample_token
from edgelmm.testing import sample_images


def test_seeded_sampling_is_repeatable_and_differs_from_greedy(pipelines):
    pipe = pipelines("idefics2")
    imgs = sample_images(2)
    a = pipe.generate("<image> and <image>", imgs, max_new_tokens=12, temperature=1.5, seed=3)
    b = pipe.generate("<image> and <image>", imgs, max_new_tokens=12, temperature=1.5, seed=3)
    greedy = pipe.generate("<image> and <image>", imgs, max_new_tokens=12)
    others = {tuple(pipe.generate("<image> and <image>", imgs, max_new_tokens=12, temperature=1.5,
                                  seed=s).token_ids) for s in range(4, 8)}
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids), tuple(greedy.token_ids)}) >= 3


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = [sample_token(logits, SamplingParams(temperature=1.0, top_p=0.75), rng) for _ in range(2000)]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2] == 0 and counts[3] == 0        # outside the 0.8 nucleus
    assert abs(counts[0] - 0.5 / 0.8) < 0.04 and abs(counts[1] - 0.3 / 0.8) < 0.04
    tiny = [sample_token(logits, SamplingParams(temperature=1.0, top_p=1e-6), rng) for _ in range(50)]
    assert set(tiny) == {0}


@pytest.mark.parametrize("kw,msg", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_sampling_params_validated(pipelines, kw, msg):
    with pytest.raises(PromptError, match=msg):
        pipelines("llava-clip").generate("hi", **kw)


@pytest.mark.parametrize("kind", ["llava-siglip", "idefics3"])
def test_stream_concatenates_to_generate(pipelines, kind):
    pipe = pipelines(kind)
    imgs = sample_images(2, seed=1)
    pieces = list(pipe.stream("<image> then <image>: what moved?", imgs, max_new_tokens=20))
    full = pipe.generate("<image> then <image>: what moved?", imgs, max_new_tokens=20)
    assert "".join(pieces) == full.text.rstrip("\ufffd")
    assert len(pieces) >= 2


def test_raw_prompt_skips_template(pipelines):
    pipe = pipelines("idefics3")
    chat = pipe.prepare("hello <image>", sample_images(1))
    raw = pipe.prepare("hello <image>", sample_images(1), chat=False)
    assert chat.text.startswith("<|im_start|>User:") and raw.text == "hello <image>"
    assert len(raw.input_ids) < len(chat.input_ids)
