"""`edgelmm serve` on a loopback port: the official OpenAI client gets exactly what Pipeline.generate
gives, concurrent clients are batched without losing or mixing answers, and every bad request gets
its status and a JSON error while the server stays up."""

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import edgelmm
from edgelmm.serve import Limits, Server, ServerOptions
from edgelmm.testing import sample_images

openai = pytest.importorskip("openai", reason="the OpenAI client is in the dev extra")

KEY = "test-key"


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def messages(text_parts, images, fmt="PNG"):
    """One user message: text_parts[0], image 1, text_parts[1], image 2, ... (as '<image>' prompts read)."""
    content = []
    for i, text in enumerate(text_parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(images):
            content.append({"type": "image_url", "image_url": {"url": data_url(images[i], fmt)}})
    return [{"role": "user", "content": content}]


def as_prompt(text_parts, n_images) -> str:
    return "".join(t + ("<image>" if i < n_images else "") for i, t in enumerate(text_parts))


@pytest.fixture(scope="module")
def pipes(reference_gguf_bundle):
    return {b: edgelmm.load(reference_gguf_bundle, backend=b) for b in ("onnxruntime", "llamacpp")}


@pytest.fixture(scope="module")
def servers(pipes):
    started = {}
    for backend, pipe in pipes.items():
        server = Server(lambda p=pipe: p, ServerOptions(api_key=KEY, max_batch=4), port=0).start()
        assert server.wait_ready(120) and server.state.error is None
        started[backend] = server
    yield started
    for server in started.values():
        server.stop()


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def raw(server, method, path, body=None, headers=None, key=KEY):
    """(status, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


def metric(server, name, **labels) -> float:
    """The value of one series of /metrics (0 when absent)."""
    _, text = raw(server, "GET", "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
    return total


@pytest.mark.parametrize("backend", ["onnxruntime", "llamacpp"])
def test_openai_client_gets_what_generate_gives(servers, pipes, backend):
    server, pipe = servers[backend], pipes[backend]
    images = sample_images(2, seed=3)
    parts = ["Compare ", " and ", ". Which has more shapes?"]
    want = pipe.generate(as_prompt(parts, 2), images, max_new_tokens=12)
    c = client(server)
    r = c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=12)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=12, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces) == want.text and finish == want.finish_reason and len(pieces) > 2
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    # Sampling with a seed, and a stop string, as Pipeline.generate would cut them.
    sampled = pipe.generate(as_prompt(parts, 2), images, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    r = c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=10, temperature=0.8,
                                  top_p=0.9, seed=7)
    assert r.choices[0].message.content == sampled.text
    stop = want.text[3:5]
    r = c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == want.text[:want.text.find(stop)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=40,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    # Several turns: the earlier answer goes back as the assistant's message.
    turns = [{"role": "user", "content": [{"type": "text", "text": "How many shapes in "},
                                          {"type": "image", "image": images[0]}, {"type": "text", "text": "?"}]},
             {"role": "assistant", "content": "3"},
             {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "image", "image": images[1]}]}]
    want_turns = pipe.generate(turns, max_new_tokens=8)
    sent = [dict(m, content=[{"type": "image_url", "image_url": {"url": data_url(p["image"])}} if p["type"] == "image"
                             else p for p in m["content"]]) if isinstance(m["content"], list) else m for m in turns]
    r = c.chat.completions.create(model="m", messages=sent, max_tokens=8)
    assert r.choices[0].message.content == want_turns.text
    assert r.usage.prompt_tokens == want_turns.prompt_tokens and r.usage.completion_tokens == len(want_turns.token_ids)
    assert [m.id for m in c.models.list().data] == [server.state.model_id]


def test_sixteen_clients_four_requests_each(pipes, reference_gguf_bundle):
    pipe = pipes["onnxruntime"]
    # A pool of requests of 1-3 images; each client sends 4 of them, 64 in all.
    pool = []
    for i in range(16):
        n = 1 + i % 3
        parts = ["How many shapes are in " if n == 1 else "Compare "] + [" and "] * (n - 1) + [f"? ({i})"]
        pool.append((parts, sample_images(n, seed=100 + i)))
    alone = [pipe.generate(as_prompt(p, len(im)), im, max_new_tokens=8) for p, im in pool]
    with Server(lambda: pipe, ServerOptions(api_key=KEY, max_batch=4, max_queue=64), port=0) as server:
        assert server.wait_ready(60)
        c = client(server)

        def one_client(k):
            out = []
            for j in range(4):
                idx = (k * 4 + j) % 16
                parts, images = pool[idx]
                r = c.chat.completions.create(model="m", messages=messages(parts, images), max_tokens=8)
                out.append((idx, r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens, r.id))
            return out

        with ThreadPoolExecutor(16) as ex:
            answers = [a for result in ex.map(one_client, range(16)) for a in result]
        assert len(answers) == 64 and len({a[4] for a in answers}) == 64
        for idx, text, prompt_tokens, completion_tokens, _ in answers:
            want = alone[idx]
            assert (text, prompt_tokens, completion_tokens) == (want.text, want.prompt_tokens, len(want.token_ids)), idx
        assert metric(server, "edgelmm_requests_total", status="200") == 64
        assert metric(server, "edgelmm_prompt_tokens_total") == sum(a[2] for a in answers)
        assert metric(server, "edgelmm_completion_tokens_total") == sum(a[3] for a in answers)
        assert metric(server, "edgelmm_images_total") == sum(len(pool[a[0]][1]) for a in answers)
        assert metric(server, "edgelmm_time_to_first_token_seconds_count") == 64
        assert metric(server, "edgelmm_queue_depth") == 0
        # They were decoded together: fewer batches than requests.
        assert server.state.scheduler.batches < 64
        assert metric(server, "edgelmm_batch_size_sum") == 64


def _bomb_png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bad_requests_get_their_status_and_the_server_stays_up(servers, pipes, tmp_path):
    server = servers["onnxruntime"]
    good = {"model": "m", "messages": messages(["Count the shapes in ", "."], sample_images(1)), "max_tokens": 3}
    want = pipes["onnxruntime"].generate("Count the shapes in <image>.", sample_images(1), max_new_tokens=3).text
    tiny = data_url(sample_images(1, sizes=[(8, 8)])[0])

    def with_image(url):
        return {**good, "messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                                                   {"type": "image_url", "image_url": {"url": url}}]}]}

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        ("malformed JSON", b'{"model": "m", "messages": [', 400, None, "not valid JSON"),
        ("a body that is a list", [1, 2], 400, None, "JSON object"),
        ("temperature of the wrong type", {**good, "temperature": "hot"}, 400, "temperature", "must be a number"),
        ("messages of the wrong type", {**good, "messages": "hi"}, 400, "messages", "non-empty list"),
        ("an unknown field", {**good, "logit_scale": 2}, 400, "logit_scale", "unrecognized"),
        ("n = 2", {**good, "n": 2}, 400, "n", "not supported"),
        ("bad base64", with_image("data:image/png;base64,@@@not-base64@@@"), 400,
         "messages[0].content[1].image_url", "not valid base64"),
        ("a text file as an image", with_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400,
         "messages[0].content[1].image_url", "not an image"),
        ("a GIF", with_image("data:image/gif;base64," + base64.b64encode(_gif()).decode()), 400,
         "messages[0].content[1].image_url", "GIF images are not taken"),
        ("an image bomb (225 megapixels)", with_image(_bomb_png(15000)), 413, "messages[0].content[1].image_url",
         "pixels"),
        ("an image over the pixel limit", with_image(_bomb_png(5000)), 413, "messages[0].content[1].image_url",
         "5000x5000 pixels"),
        ("50 images", {**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
                                                                          {"url": tiny}}] * 50}]}, 400,
         "messages[0].content[16]", "more than 16 images"),
        ("a remote URL", with_image("http://example.com/a.png"), 400, "messages[0].content[1].image_url",
         "not fetched"),
        ("a file URL", with_image(text_file.as_uri()), 400, "messages[0].content[1].image_url",
         "not enabled"),
        ("a prompt over the context", {**good, "messages": [{"role": "user", "content": "shape " * 3000}]}, 400,
         "messages", "context window"),
        ("max_tokens 0", {**good, "max_tokens": 0}, 400, "max_tokens", "must be in [1, 2048]"),
        ("max_tokens 10^9", {**good, "max_tokens": 10**9}, 400, "max_tokens", "must be in [1, 2048]"),
        ("max_completion_tokens a string", {**good, "max_completion_tokens": "9"}, 400, "max_completion_tokens",
         "integer"),
        ("a marker in text with no image", {**good, "messages": [{"role": "user", "content": "<image> what?"}]}, 400,
         "messages", "marker"),
        ("a tool message", {**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role",
         "system, user or assistant"),
        ("stop of the wrong type", {**good, "stop": 5}, 400, "stop", "stop must be"),
        ("a negative seed", {**good, "seed": -1}, 400, "seed", ">= 0"),
    ]
    for name, body, status, param, words in cases:
        got, reply = raw(server, "POST", "/v1/chat/completions", body)
        assert got == status, (name, got, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"}, (name, reply)
        assert reply["error"]["param"] == param and words in reply["error"]["message"], (name, reply)
        ok, answer = raw(server, "POST", "/v1/chat/completions", good)
        assert ok == 200 and answer["choices"][0]["message"]["content"] == want, (name, ok, answer)
    got, reply = raw(server, "POST", "/v1/chat/completions", good, key="wrong")
    assert got == 401 and reply["error"]["code"] == "invalid_api_key"
    got, reply = raw(server, "POST", "/v1/chat/completions", good, key=None)
    assert got == 401
    got, reply = raw(server, "GET", "/v1/nothing")
    assert got == 404 and "error" in reply
    got, reply = raw(server, "GET", "/health", key=None)
    assert got == 200 and reply["status"] == "ok" and reply["backend"] == "onnxruntime"
    assert metric(server, "edgelmm_requests_total", status="413") >= 2
    assert np.isfinite(metric(server, "edgelmm_time_per_output_token_seconds_sum"))


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "GIF")
    return buf.getvalue()


def wait_for_a_token(response) -> None:
    """Read a stream until a chunk with text (the role chunk comes before the first token)."""
    while b'"content": ""' in (line := response.readline()) or not line.startswith(b"data: "):
        assert line, "the stream ended early"


def test_a_client_that_goes_away_mid_stream_frees_its_row(servers):
    server = servers["onnxruntime"]
    before = metric(server, "edgelmm_completion_tokens_total")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": "m", "messages": messages(["Describe ", " at length."], sample_images(1)), "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    wait_for_a_token(r)
    conn.sock.shutdown(2)
    conn.close()
    # The row ends at its next decode step: the next request is answered, and the cancelled one is
    # counted as 499, its tokens not as completion tokens.
    good = {"model": "m", "messages": messages(["Count the shapes in ", "."], sample_images(1)), "max_tokens": 3}
    ok, answer = raw(server, "POST", "/v1/chat/completions", good)
    assert ok == 200 and answer["usage"]["completion_tokens"] <= 3
    assert metric(server, "edgelmm_requests_total", status="499") >= 1
    assert metric(server, "edgelmm_completion_tokens_total") == before + answer["usage"]["completion_tokens"]
    # Run to its end the row would have made 900 tokens.
    assert 1 <= metric(server, "edgelmm_cancelled_tokens_total") < 500


def test_a_full_queue_answers_429(pipes):
    pipe = pipes["onnxruntime"]
    with Server(lambda: pipe, ServerOptions(max_batch=1, max_queue=1), port=0) as server:
        assert server.wait_ready(60)
        long = {"model": "m", "messages": [{"role": "user", "content": "Describe the shapes."}], "max_tokens": 900,
                "ignore_eos": True, "stream": True}
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(long), headers={"Content-Type": "application/json"})
        wait_for_a_token(conn.getresponse())   # the first request is decoding
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=raw(server, "POST", "/v1/chat/completions",
                                                                  {**long, "stream": False, "max_tokens": 2})))
        t.start()
        while metric(server, "edgelmm_queue_depth") < 1:   # the second waits in the queue
            assert t.is_alive(), waiting
            threading.Event().wait(0.02)
        got, reply = raw(server, "POST", "/v1/chat/completions", {**long, "stream": False, "max_tokens": 2})
        assert got == 429 and reply["error"]["type"] == "rate_limit_error"
        conn.close()   # the first client leaves; the second is answered
        t.join(120)
        assert waiting["r"][0] == 200


def test_cli_serve_without_torch_and_sigterm_finishes_in_flight(reference_gguf_bundle, tmp_path):
    from .conftest import _BLOCK_TORCH

    code = _BLOCK_TORCH + "import sys; from edgelmm.cli import main; sys.argv = ['edgelmm'] + sys.argv[1:]; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(reference_gguf_bundle), "--port", "0",
                             "--backend", "onnxruntime", "--json", "--allow-files", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGELMM_API_KEY": KEY})
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["backend"] == "onnxruntime" and ready["url"].startswith("http://127.0.0.1:")
        host, port = ready["url"].split("//")[1].split("/")[0].split(":")
        image = tmp_path / "a.png"
        Image.fromarray(sample_images(1)[0]).save(image)
        body = {"model": "m", "max_tokens": 200, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Count the shapes in "},
                                                          {"type": "image_url", "image_url": {"url": image.as_uri()}}]}]}
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)   # mid-answer: the stream still ends properly
        rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "' in rest, rest[-300:]
        usage = json.loads([x for x in rest.split("\n") if '"usage"' in x][-1][len("data: "):])["usage"]
        assert usage["completion_tokens"] >= 1
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()


def test_limits_are_checked_before_the_model_loads(reference_gguf_bundle):
    from edgelmm.errors import OptionError

    with pytest.raises(OptionError, match="max_batch"):
        ServerOptions(max_batch=0).validate()
    with pytest.raises(OptionError, match="max_images"):
        ServerOptions(limits=Limits(max_images=-1)).validate()


def test_not_ready_is_503_until_the_model_has_loaded(pipes):
    release = threading.Event()

    def slow_load():
        release.wait(120)
        return pipes["onnxruntime"]

    body = {"model": "m", "messages": [{"role": "user", "content": "How many shapes?"}], "max_tokens": 2}
    with Server(slow_load, ServerOptions(), port=0) as server:
        got, reply = raw(server, "GET", "/health")
        assert got == 503 and reply["status"] == "loading"
        got, reply = raw(server, "POST", "/v1/chat/completions", body)
        assert got == 503 and reply["error"]["code"] == "model_loading"
        release.set()
        assert server.wait_ready(120)
        assert raw(server, "GET", "/health")[0] == 200
        assert raw(server, "POST", "/v1/chat/completions", body)[0] == 200

    def broken_load():
        raise edgelmm.errors.BundleError("manifest checksum mismatch: onnx/decoder.onnx")

    with Server(broken_load, ServerOptions(), port=0) as server:
        assert server.wait_ready(60)
        got, reply = raw(server, "GET", "/health")
        assert got == 503 and reply["status"] == "error" and "decoder.onnx" in reply["error"]
        got, reply = raw(server, "POST", "/v1/chat/completions", body)
        assert got == 503 and "failed to load" in reply["error"]["message"]
