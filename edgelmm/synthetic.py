"""Procedural multi-image data: scenes of coloured shapes and short frame sequences, with questions
that exercise the multi-image skills the Mantis paper names (co-reference, comparison, reasoning
across images, temporal understanding, in-context learning) plus the anomaly question that
`edgelmm watch` asks.

Everything is drawn with numpy/PIL from a seed, so the train / validation / test splits are
reproducible and disjoint (each split draws from its own seed stream) and nothing is downloaded.
The runtime side uses it too (`edgelmm eval`, calibration samples), so it must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from .options import check_int

IMAGE_SIZE = 64
MAX_SIZE = 4096      # render() draws square images at most this many pixels a side
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 220),
    "yellow": (235, 205, 25), "purple": (145, 45, 185),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float
    y: float
    r: float

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Background:
    base: tuple[int, int, int]
    gradient: tuple[float, float]
    noise: float


@dataclass
class Sample:
    """One question about one or more images. `messages` are OpenAI-style turns whose text carries
    `<image>` markers (in-context examples are earlier user/assistant turns); `answer` is the
    expected reply, compared after normalisation."""
    skill: str
    task: str
    images: list[np.ndarray]
    messages: list[dict[str, Any]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ drawing

def random_background(rng: np.random.Generator) -> Background:
    grey = int(rng.integers(110, 235))
    tint = rng.integers(-18, 19, 3)
    base = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return Background(base, (float(rng.uniform(-25, 25)), float(rng.uniform(-25, 25))), float(rng.uniform(3, 10)))


def render(shapes: list[Shape], bg: Background, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Shapes on a tinted gradient background, then per-pixel noise (drawn fresh per call, so two
    renders of one scene are never byte-identical)."""
    check_int("image size", size, 1, MAX_SIZE)   # the grids below take 8 bytes a pixel: 100000 asks for TiBs
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    canvas = np.asarray(bg.base, np.float32)[None, None, :] + (bg.gradient[0] * xx + bg.gradient[1] * yy)[..., None]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse([s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r], fill=fill)
        elif s.shape == "square":
            h = s.r * 0.85
            draw.rectangle([s.x - h, s.y - h, s.x + h, s.y + h], fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r * 0.8), (s.x + s.r, s.y + s.r * 0.8)], fill=fill)
    out = np.asarray(img, np.float32) + rng.normal(0, bg.noise, (size, size, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def place(rng: np.random.Generator, existing: list[Shape], shape: str | None = None, colour: str | None = None,
          size: int = IMAGE_SIZE, y_range: tuple[float, float] | None = None) -> Shape:
    """A new shape that does not overlap `existing` (rejection sampling)."""
    for attempt in range(400):
        # after 200 misses (a crowded scene), settle for a smaller shape and a tighter gap
        r = float(rng.uniform(6, 9)) if attempt < 200 else 5.0
        gap = 3 if attempt < 200 else 1
        x = float(rng.uniform(r + 1, size - r - 1))
        lo, hi = y_range or (r + 1, size - r - 1)
        y = float(rng.uniform(max(lo, r + 1), min(hi, size - r - 1)))
        if all((x - e.x) ** 2 + (y - e.y) ** 2 > (r + e.r + gap) ** 2 for e in existing):
            return Shape(shape or str(rng.choice(SHAPES)), colour or str(rng.choice(list(COLOURS))), x, y, r)
    raise RuntimeError("no room for another shape")  # cannot happen with <= 6 shapes of this size


def scene(rng: np.random.Generator, n: int, **kw) -> list[Shape]:
    out: list[Shape] = []
    for _ in range(n):
        out.append(place(rng, out, **kw))
    return out


def _other(rng: np.random.Generator, options, current):
    return str(rng.choice([o for o in options if o != current]))


# ------------------------------------------------------------------ prompts

def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _markers(n: int) -> str:
    return "".join("<image>" for _ in range(n))


# ------------------------------------------------------------------ tasks
# Each task draws one sample from rng. Answers are short and closed-form so accuracy is exact match.

def task_colour_of(rng):
    n = int(rng.integers(2, 4))
    bgs = [random_background(rng) for _ in range(n)]
    shapes = [scene(rng, 1) for _ in range(n)]
    k = int(rng.integers(0, n))
    images = [render(s, b, rng) for s, b in zip(shapes, bgs)]
    q = f"{_markers(n)}What colour is the shape in image {k + 1}?"
    return images, [_user(q)], shapes[k][0].colour


def task_shape_of(rng):
    n = int(rng.integers(2, 4))
    shapes = [scene(rng, 1) for _ in range(n)]
    k = int(rng.integers(0, n))
    images = [render(s, random_background(rng), rng) for s in shapes]
    q = f"{_markers(n)}What shape is in image {k + 1}?"
    return images, [_user(q)], shapes[k][0].shape


def _counted_scene(rng, target: str, count: int) -> np.ndarray:
    """An image with exactly `count` shapes of kind `target` and up to two of other kinds."""
    others = [s for s in SHAPES if s != target]
    objs: list[Shape] = []
    for _ in range(count):
        objs.append(place(rng, objs, shape=target))
    for _ in range(int(rng.integers(0, 3))):
        objs.append(place(rng, objs, shape=str(rng.choice(others))))
    return render(objs, random_background(rng), rng)


def task_more_of(rng):
    target = str(rng.choice(SHAPES))
    a, b = rng.choice(4, size=2, replace=False)
    counts = [int(a), int(b)]
    images = [_counted_scene(rng, target, c) for c in counts]
    q = f"{_markers(2)}Which image has more {PLURAL[target]}?"
    return images, [_user(q)], f"image {int(np.argmax(counts)) + 1}"


def _change_one(rng, objs: list[Shape]) -> list[Shape]:
    """The same scene with one visible difference: a colour, a shape, a position, or one shape more/less."""
    kind = str(rng.choice(["colour", "shape", "move", "add", "remove"] if len(objs) > 1
                          else ["colour", "shape", "move", "add"]))
    out = list(objs)
    i = int(rng.integers(0, len(out)))
    if kind == "colour":
        out[i] = replace(out[i], colour=_other(rng, list(COLOURS), out[i].colour))
    elif kind == "shape":
        out[i] = replace(out[i], shape=_other(rng, SHAPES, out[i].shape))
    elif kind == "move":
        rest = out[:i] + out[i + 1:]
        for _ in range(50):
            moved = place(rng, rest, shape=out[i].shape, colour=out[i].colour)
            if abs(moved.x - out[i].x) + abs(moved.y - out[i].y) > 14:
                break
        out[i] = moved
    elif kind == "add":
        out.append(place(rng, out))
    else:
        out.pop(i)
    return out


def task_same(rng):
    n = int(rng.integers(2, 4))
    bg = random_background(rng)
    base = scene(rng, int(rng.integers(1, 4)))
    i, j = sorted(int(v) for v in rng.choice(n, size=2, replace=False))
    same = bool(rng.integers(0, 2))
    scenes = [base if k != j or same else _change_one(rng, base) for k in range(n)]
    if n == 3:  # the third image is unrelated to the question
        other = 3 - i - j
        scenes[other] = _change_one(rng, base) if rng.integers(0, 2) else base
    images = [render(s, bg, rng) for s in scenes]
    q = f"{_markers(n)}Are image {i + 1} and image {j + 1} the same?"
    return images, [_user(q)], "yes" if same else "no"


def task_count_all(rng):
    n = int(rng.integers(2, 4))
    target = str(rng.choice(SHAPES))
    total = 0
    images = []
    for _ in range(n):
        c = int(rng.integers(0, 3))
        total += c
        images.append(_counted_scene(rng, target, c))
    q = f"{_markers(n)}How many {PLURAL[target]} are there in all images?"
    return images, [_user(q)], str(total)


CHANGES = ("moved", "fell", "appeared", "disappeared", "changed colour")


def task_what_changed(rng):
    """A short frame sequence; one object does something between the first and the last frame."""
    n = 3
    bg = random_background(rng)
    change = str(rng.choice(CHANGES))
    # The actor first, then the static shapes clear of it (above its landing row when it falls).
    actor = place(rng, [], y_range=(8, 30) if change == "fell" else None)
    static: list[Shape] = []
    for _ in range(int(rng.integers(0, 3))):
        static.append(place(rng, static + [actor], y_range=(0, 36) if change == "fell" else None))
    frames: list[list[Shape]] = []
    if change == "moved":
        dx = float(rng.choice([-1, 1])) * float(rng.uniform(18, 28))
        end_x = float(np.clip(actor.x + dx, actor.r + 1, IMAGE_SIZE - actor.r - 1))
        if abs(end_x - actor.x) < 12:
            end_x = float(np.clip(actor.x - dx, actor.r + 1, IMAGE_SIZE - actor.r - 1))
        for t in np.linspace(0, 1, n):
            frames.append(static + [replace(actor, x=actor.x + (end_x - actor.x) * float(t))])
    elif change == "fell":
        end_y = IMAGE_SIZE - actor.r - 1
        for t in np.linspace(0, 1, n):
            frames.append(static + [replace(actor, y=actor.y + (end_y - actor.y) * float(t) ** 2)])
    elif change == "appeared":
        k = int(rng.integers(1, n))
        frames = [static + ([actor] if f >= k else []) for f in range(n)]
    elif change == "disappeared":
        k = int(rng.integers(1, n))
        frames = [static + ([actor] if f < k else []) for f in range(n)]
    else:
        k = int(rng.integers(1, n))
        new = replace(actor, colour=_other(rng, list(COLOURS), actor.colour))
        frames = [static + [actor if f < k else new] for f in range(n)]
    images = [render(f, bg, rng) for f in frames]
    q = f"{_markers(n)}These are frames of a video. What changed between the first and the last frame?"
    return images, [_user(q)], f"it {change}"


def task_odd_frame(rng):
    n = 4
    bg = random_background(rng)
    base = scene(rng, int(rng.integers(1, 4)))
    k = int(rng.integers(0, n))
    odd = _change_one(rng, base)
    images = [render(odd if f == k else base, bg, rng) for f in range(n)]
    q = f"{_markers(n)}These are frames of a video. Which frame is abnormal?"
    return images, [_user(q)], f"image {k + 1}"


ANOMALY_PROMPT = ("Image 1 shows the normal scene; images 2-{last} are the latest frames. "
                  "Is anything abnormal? Answer yes or no, then describe it.")


def task_anomaly(rng):
    """The question `edgelmm watch` asks: a reference frame of the normal scene, then the latest frames."""
    latest = 3
    bg = random_background(rng)
    base = scene(rng, int(rng.integers(1, 4)))
    abnormal = bool(rng.integers(0, 2))
    if abnormal:
        intruder = place(rng, base)
        start = int(rng.integers(0, latest))  # the intruder is there from this latest frame on
        frames = [base] + [base + ([intruder] if f >= start else []) for f in range(latest)]
        answer = f"yes, a {intruder.describe()} appeared"
    else:
        frames = [base] * (latest + 1)
        answer = "no"
    images = [render(f, bg, rng) for f in frames]
    return images, [_user(_markers(latest + 1) + ANOMALY_PROMPT.format(last=latest + 1))], answer


def task_in_context(rng):
    """Two solved examples, then a query: the examples tell which property to report."""
    rule = str(rng.choice(["colour", "shape", "count"]))
    messages, images, answers = [], [], []
    for turn in range(3):
        objs = scene(rng, int(rng.integers(1, 4)) if rule == "count" else 1)
        images.append(render(objs, random_background(rng), rng))
        answer = {"colour": objs[0].colour, "shape": objs[0].shape, "count": str(len(objs))}[rule]
        messages.append(_user("<image>What about this one?" if turn else "<image>Answer like the examples."))
        if turn < 2:
            messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return images, messages, answers[-1]


@dataclass(frozen=True)
class Task:
    name: str
    skill: str
    make: Callable[[np.random.Generator], tuple[list[np.ndarray], list[dict[str, Any]], str]]


TASKS: tuple[Task, ...] = (
    Task("colour_of", "co-reference", task_colour_of),
    Task("shape_of", "co-reference", task_shape_of),
    Task("more_of", "comparison", task_more_of),
    Task("same", "comparison", task_same),
    Task("count_all", "reasoning", task_count_all),
    Task("what_changed", "temporal", task_what_changed),
    Task("odd_frame", "temporal", task_odd_frame),
    Task("anomaly", "anomaly", task_anomaly),
    Task("in_context", "in-context", task_in_context),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}


def task_describe(rng):
    """Training only (like LLaVA's caption pre-training): name every shape of one image, left to
    right. Dense supervision that teaches the vision tower colours, shapes and counts quickly."""
    objs = sorted(scene(rng, int(rng.integers(1, 4))), key=lambda o: o.x)
    image = render(objs, random_background(rng), rng)
    return [image], [_user("<image>Describe the image.")], ", ".join(f"a {o.describe()}" for o in objs)


AUX_TASKS: tuple[Task, ...] = (Task("describe", "description", task_describe),)


def labelled_scene(split: str, index: int) -> tuple[np.ndarray, list[Shape]]:
    """Training only (the vision tower's supervised pre-training): one image of 0-5 shapes and the
    shapes themselves, as labels. A seed stream of its own, apart from the question samples'."""
    rng = np.random.default_rng([SPLITS[split], index, 20261122, 1])
    objs = scene(rng, int(rng.integers(0, 6)))
    return render(objs, random_background(rng), rng), objs


SKILLS = tuple(dict.fromkeys(t.skill for t in TASKS))


def make_sample(split: str, index: int, tasks: tuple[Task, ...] = TASKS) -> Sample:
    """Sample `index` of `split`: tasks take turns, and each sample has its own seed stream
    (split, index), so any sample can be regenerated alone and the splits never share one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    task = tasks[index % len(tasks)]
    rng = np.random.default_rng([SPLITS[split], index, 20261122])
    images, messages, answer = task.make(rng)
    return Sample(task.skill, task.name, images, messages, answer)


def make_split(split: str, n: int, start: int = 0, tasks: tuple[Task, ...] = TASKS) -> list[Sample]:
    return [make_sample(split, i, tasks) for i in range(start, start + n)]


def write_samples(out, split: str = "test", round_: int = 0) -> list[dict[str, Any]]:
    """One sample of each of the nine tasks (round `round_` of `split`: tasks take turns, so these are
    samples round_ * 9 ... round_ * 9 + 8), written as PNG files in the folder `out`, with what to
    ask the reference model: the prompt (the last user turn, <image> markers included), the whole
    message list (in_context has solved examples before it), the image paths and the expected
    answer. `edgelmm demo-images` and `make demo` use these."""
    from pathlib import Path

    check_int("round", round_, 0)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, task in enumerate(TASKS):
        sample = make_sample(split, round_ * len(TASKS) + k)
        paths = []
        for i, image in enumerate(sample.images):
            path = folder / f"{task.name}-{i + 1}.png"
            Image.fromarray(image).save(path)
            paths.append(str(path))
        written.append({"task": task.name, "skill": task.skill, "prompt": sample.messages[-1]["content"],
                        "messages": sample.messages, "images": paths, "answer": sample.answer,
                        "turns": sum(m["role"] == "user" for m in sample.messages)})
    return written


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def answer_vocabulary(task: str, n: int = 400) -> dict[str, float]:
    """How often each answer occurs for a task (from the validation stream): the majority share is
    the accuracy of always giving the most common answer, the honest 'chance' for that task."""
    counts: dict[str, int] = {}
    t = TASKS_BY_NAME[task]
    for i in range(n):
        a = make_sample("val", i * len(TASKS) + TASKS.index(t)).answer
        counts[a] = counts.get(a, 0) + 1
    return {a: c / n for a, c in sorted(counts.items(), key=lambda kv: -kv[1])}
