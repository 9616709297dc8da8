"""Build and train edgelmm's reference model: a small LLaVA (SigLIP vision tower, MLP projector,
Llama text model with a llama-style sentencepiece tokenizer) that has really learned the
multi-image skills of `edgelmm.synthetic`.

    python tools/train_reference.py OUT_DIR [--vision-steps 2500] [--steps 5000] [--focus-steps 1500] [--seed 0]

(It lives outside the package: the wheel ships the trained model, not its training.)

Stage 1 pre-trains the vision tower on labelled scenes (which shape of which colour sits in each
patch, how many of each shape); stage 2 trains the whole model on the multi-image questions;
stage 3 goes on with half of every batch on the comparison tasks stage 2 left at chance.
The run is seeded (weights, data order, augmentation); the data is generated on the fly from the
"train" split, so no two steps see the same sample. Training batches go through the same
Pipeline.prepare the runtime uses, so the model learns exactly the token layout it is served with.
Needs the `export` and `dev` extras (torch, transformers, sentencepiece).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from edgelmm import synthetic

# Sizes: hidden and FFN widths are multiples of 256 so GGUF k-quants apply to every matrix.
TEXT_DIMS = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0)
VISION_DIMS = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   image_size=synthetic.IMAGE_SIZE, patch_size=16, vision_use_head=False)
AUX_SHARE = 3  # of every 10 training samples, this many are single-image descriptions (vision warm-up)
VOCAB_SIZE = 640
IMAGE_MARKER, IMAGE_OPEN, IMAGE_CLOSE = "<image>", "<Image>", "</Image>"

# The model's own chat template numbers the images the way Mantis does, so the checkpoint carries
# its prompt format with it (HF's apply_chat_template and edgelmm render the same text).
CHAT_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
    "(image {{ ns.n }}: <Image><image></Image>)"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _corpus(n: int = 3000) -> list[str]:
    """Prompt and answer text as the model will see it (images as numbered markers)."""
    from edgelmm.prompt import parse_prompt, render_chat

    lines = []
    for i in range(n):
        s = training_sample(i)
        parsed = parse_prompt(s.messages + [{"role": "assistant", "content": s.answer}])
        lines.extend(render_chat(CHAT_TEMPLATE, parsed.messages, {}, add_generation_prompt=False).split("\n"))
    return [line for line in lines if line]


def training_sample(index: int) -> synthetic.Sample:
    if index % 10 < AUX_SHARE:
        return synthetic.make_sample("train", index, synthetic.AUX_TASKS)
    return synthetic.make_sample("train", index)


def build_tokenizer(out: Path) -> None:
    """A Llama-style sentencepiece BPE (byte fallback, identity normalisation so llama.cpp's SPM
    tokenizer splits text the same way), saved as tokenizer.model and as HF tokenizer.json."""
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    from edgelmm.testing.checkpoints import _save_tokenizer

    model = io.BytesIO()  # written by us, so no output path ends up inside the model's trainer spec
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe",
        vocab_size=VOCAB_SIZE, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=[IMAGE_MARKER, IMAGE_OPEN, IMAGE_CLOSE],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # tokenizer.json the way HF converts a Llama sentencepiece model (non-legacy Metaspace).
    spec = SentencePieceExtractor(str(out / "tokenizer.model")).extract(models.BPE)
    tok = Tokenizer(models.BPE(vocab=spec["vocab"], merges=spec["merges"], unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (IMAGE_MARKER, IMAGE_OPEN, IMAGE_CLOSE)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    _save_tokenizer(tok, out, bos="<s>", eos="</s>", unk="<unk>", pad=None, extra_special=[],
                    chat_template=CHAT_TEMPLATE)
    # The two tokenizers must agree: llama.cpp reads tokenizer.model's pieces, edgelmm tokenizer.json.
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    for line in _corpus(200):
        a, b = [1] + sp.encode(line), fast.encode(line).ids
        if a != b:
            raise RuntimeError(f"sentencepiece and tokenizer.json disagree on {line!r}: {a} vs {b}")


def build_model(out: Path, seed: int) -> None:
    import torch
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig, AutoTokenizer)

    tok = AutoTokenizer.from_pretrained(out)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    tokens_per_image = (VISION_DIMS["image_size"] // VISION_DIMS["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(**VISION_DIMS),
        text_config=LlamaConfig(**TEXT_DIMS, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_index=image_id, vision_feature_select_strategy="full", vision_feature_layer=-2,
        image_seq_length=tokens_per_image, projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(out)
    size = synthetic.IMAGE_SIZE
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
                               tokenizer=tok, patch_size=VISION_DIMS["patch_size"],
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}, indent=2))


class Batcher:
    """Turns synthetic samples into padded training batches with the runtime's own prompt path;
    the loss covers the answer tokens and the end-of-sequence token only."""

    def __init__(self, model_dir: Path):
        from edgelmm.families import detect
        from edgelmm.modelfiles import ModelFiles
        from edgelmm.pipeline import Pipeline

        files = ModelFiles.open(model_dir)
        self.pipe = Pipeline(files, detect(files), backend=None)  # prepare() needs no backend
        self.eos = files.eos_token_ids[0]

    def encode(self, sample: synthetic.Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prepared = self.pipe.prepare(sample.messages, sample.images)
        full = self.pipe.tokenizer.encode(self.pipe.family.expand_prompt(prepared.text + " " + sample.answer,
                                                                         prepared.vision)).ids
        prompt = prepared.input_ids.tolist()
        if full[:len(prompt)] != prompt:
            raise RuntimeError(f"answer tokens change the prompt's tokens for {sample.answer!r}")
        ids = np.asarray(full + [self.eos], np.int64)
        labels = ids.copy()
        labels[:len(prompt)] = -100
        return ids, labels, prepared.vision.pixel_values

    def batch(self, samples: list[synthetic.Sample]):
        import torch

        enc = [self.encode(s) for s in samples]
        width = max(len(e[0]) for e in enc)
        ids = np.zeros((len(enc), width), np.int64)
        labels = np.full((len(enc), width), -100, np.int64)
        mask = np.zeros((len(enc), width), np.int64)
        for i, (x, y, _) in enumerate(enc):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
        pixels = np.concatenate([e[2] for e in enc])
        return (torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask),
                torch.from_numpy(pixels))


def teacher_forced_accuracy(model, batcher: Batcher, samples: list[synthetic.Sample]) -> dict[str, float]:
    """Teacher-forced exact match of the answer tokens (a fast proxy for greedy accuracy)."""
    import torch

    per_task: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), 32):
            chunk = samples[i:i + 32]
            ids, labels, mask, pixels = batcher.batch(chunk)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            pred = logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = ((pred == target) | (target == -100)).all(dim=1)
            for s, good in zip(chunk, ok.tolist()):
                per_task.setdefault(s.task, []).append(good)
    model.train()
    return {t: float(np.mean(v)) for t, v in per_task.items()}


def _param_groups(named_params, lr: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only."""
    named = list(named_params)
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.05, "lr": lr},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]


def _schedule(opt, steps: int):
    """Linear warm-up, then cosine down to 5% of each group's peak rate."""
    import torch

    warmup = max(1, steps // 30)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


def _optimise(stage: str, steps: int, opt, sched, clip_params: list, step_loss, validate, log_every: int,
              val_every: int, minutes_before: float = 0.0) -> list[dict]:
    """The training loop every stage shares: `step_loss(step)` under bf16 autocast, AdamW step with
    gradients clipped to norm 1, a log entry every `log_every` steps, `validate()`'s entries added
    every `val_every` steps and at the end."""
    import torch

    history, running, t0 = [], 0.0, time.time()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"stage": stage, "step": step + 1, "loss": running / log_every,
                     "minutes": minutes_before + (time.time() - t0) / 60, "lr": sched.get_last_lr()[0]}
            running = 0.0
            if (step + 1) % val_every == 0 or step + 1 == steps:
                entry.update(validate())
            history.append(entry)
            print(json.dumps(entry), flush=True)
    return history


def patch_labels(objs: list[synthetic.Shape], grid: int) -> np.ndarray:
    """The class of the shape whose centre lies in each patch (0: none; 1 + shape * colours + colour)."""
    colours = list(synthetic.COLOURS)
    cell = synthetic.IMAGE_SIZE / grid
    labels = np.zeros((grid, grid), np.int64)
    for o in objs:
        row, col = min(int(o.y / cell), grid - 1), min(int(o.x / cell), grid - 1)
        labels[row, col] = 1 + synthetic.SHAPES.index(o.shape) * len(colours) + colours.index(o.colour)
    return labels


MAX_SCENE_SHAPES = 5   # labelled_scene draws 0-5 shapes


class VisionPretraining:
    """Stage 1: supervised pre-training of the vision tower on labelled scenes, before any question.

    Learning shapes through the answer tokens alone is slow: after 5000 steps of question training
    the model named the shape in an image right 60% of the time. Two throw-away heads on the
    features the projector reads (LLaVA's `vision_feature_layer`) give every patch a target instead:
    which shape of which colour is centred in it, and how many circles, squares and triangles the
    image holds. The heads are dropped afterwards; only the tower keeps what it learned."""

    def __init__(self, model, batcher: Batcher):
        import torch

        cfg = model.config
        self.tower = model.model.vision_tower
        self.layer = cfg.vision_feature_layer
        self.grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.batcher = batcher
        width = cfg.vision_config.hidden_size
        self.classes = 1 + len(synthetic.SHAPES) * len(synthetic.COLOURS)
        self.patch_head = torch.nn.Linear(width, self.classes)
        self.count_head = torch.nn.Linear(width, len(synthetic.SHAPES) * (MAX_SCENE_SHAPES + 1))

    def batch(self, split: str, start: int, n: int):
        import torch

        scenes = [synthetic.labelled_scene(split, i) for i in range(start, start + n)]
        pixels = self.batcher.pipe.family.preprocess([img for img, _ in scenes]).pixel_values
        patches = np.stack([patch_labels(objs, self.grid) for _, objs in scenes])
        counts = np.asarray([[sum(o.shape == s for o in objs) for s in synthetic.SHAPES] for _, objs in scenes])
        return torch.from_numpy(pixels), torch.from_numpy(patches.reshape(n, -1)), torch.from_numpy(counts)

    def logits(self, pixels):
        features = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]
        per_patch = self.patch_head(features).float()
        counts = self.count_head(features.mean(1)).float().view(len(pixels), len(synthetic.SHAPES), -1)
        return per_patch, counts

    def loss(self, pixels, patches, counts):
        import torch.nn.functional as F

        per_patch, count_logits = self.logits(pixels)
        return (F.cross_entropy(per_patch.reshape(-1, self.classes), patches.reshape(-1))
                + F.cross_entropy(count_logits.reshape(-1, count_logits.shape[-1]), counts.reshape(-1)))

    def accuracy(self, pixels, patches, counts) -> dict[str, float]:
        """Shapes recognised (class of the patches that hold a shape's centre) and images whose three
        counts are all right."""
        import torch

        with torch.no_grad():
            per_patch, count_logits = self.logits(pixels)
        has_shape = patches > 0
        hit = (per_patch.argmax(-1) == patches) & has_shape
        return {"shapes": hit.sum().item() / max(1, has_shape.sum().item()),
                "counts": (count_logits.argmax(-1) == counts).all(1).float().mean().item()}

    def run(self, steps: int, seed: int, batch_size: int, lr: float, log_every: int = 50,
            val_images: int = 512) -> list[dict]:
        import torch

        params = list(self.tower.named_parameters()) + [
            (n, p) for head in (self.patch_head, self.count_head) for n, p in head.named_parameters()]
        opt = torch.optim.AdamW(_param_groups(params, lr), betas=(0.9, 0.98))
        sched = _schedule(opt, steps)
        val = self.batch("val", 0, val_images)
        self.tower.train()

        def validate() -> dict:
            self.tower.eval()
            acc = self.accuracy(*val)
            self.tower.train()
            return {"val": acc}

        return _optimise(
            "vision", steps, opt, sched, [p for _, p in params],
            lambda step: self.loss(*self.batch("train", seed * 10_000_000 + step * batch_size, batch_size)),
            validate, log_every, val_every=log_every * 10)


VISION_LR_SCALE = 0.3   # stage 2 moves the pre-trained tower more gently than the rest


def question_training(model, batcher: Batcher, steps: int, lr: float, stage: str, log_every: int, val_samples: int,
                      val_every: int, samples_at, minutes_before: float = 0.0) -> list[dict]:
    """Train the whole model on question batches (`samples_at(step)` gives each step's samples) with a
    fresh AdamW, the vision tower at VISION_LR_SCALE; log the loss, and teacher-forced validation
    accuracy per task every `val_every` steps."""
    import torch

    tower = [(n, p) for n, p in model.named_parameters() if ".vision_tower." in f".{n}"]
    rest = [(n, p) for n, p in model.named_parameters() if ".vision_tower." not in f".{n}"]
    opt = torch.optim.AdamW(_param_groups(rest, lr) + _param_groups(tower, lr * VISION_LR_SCALE), betas=(0.9, 0.98))
    sched = _schedule(opt, steps)
    val = synthetic.make_split("val", val_samples)

    def step_loss(step: int):
        ids, labels, mask, pixels = batcher.batch(samples_at(step))
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss

    def validate() -> dict:
        acc = teacher_forced_accuracy(model, batcher, val)
        return {"val": acc, "val_mean": float(np.mean(list(acc.values())))}

    return _optimise(stage, steps, opt, sched, list(model.parameters()), step_loss, validate, log_every,
                     val_every, minutes_before)


def train(out: Path, steps: int, seed: int, batch_size: int, lr: float, threads: int, log_every: int = 50,
          val_samples: int = 270, vision_steps: int = 2500, vision_batch_size: int = 128,
          vision_lr: float = 1e-3, vision_val_images: int = 512) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    model.train()
    batcher = Batcher(out)
    t0 = time.time()
    history = VisionPretraining(model, batcher).run(vision_steps, seed, vision_batch_size, vision_lr,
                                                    log_every, vision_val_images) if vision_steps else []
    vision_minutes = (time.time() - t0) / 60
    history += question_training(
        model, batcher, steps, lr, "questions", log_every, val_samples, val_every=log_every * 10,
        samples_at=lambda step: [training_sample(i) for i in range(seed * 10_000_000 + step * batch_size,
                                                                   seed * 10_000_000 + (step + 1) * batch_size)],
        minutes_before=vision_minutes)
    model.save_pretrained(out, safe_serialization=True)
    return {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "threads": threads,
            "vision_steps": vision_steps, "vision_batch_size": vision_batch_size, "vision_lr": vision_lr,
            "vision_minutes": vision_minutes, "minutes": (time.time() - t0) / 60, "history": history}


# Stage 3's tasks: after stage 2 these two were still at chance (same 51%, odd_frame 26% held-out).
# Both ask whether, or where, two renders of one scene differ by a single shape's colour, kind,
# position or presence: a patch-by-patch comparison across images that a 7.8% share of the data
# did not teach in 5000 steps.
FOCUS_TASKS = ("same", "odd_frame")
FOCUS_SHARE = 0.5       # of each stage-3 batch; the rest is the stage-2 mixture, so nothing is forgotten
FOCUS_OFFSET = 5_000_000  # stage 3 draws its samples from here on, clear of stage 2's


def focus_sample(seed: int, index: int, batch_size: int) -> synthetic.Sample:
    """Sample `index` of stage 3: the first FOCUS_SHARE of each batch from FOCUS_TASKS in turn, the
    rest from the stage-2 mixture; all from indices stage 2 never used."""
    global_index = seed * 10_000_000 + FOCUS_OFFSET + index
    slot = index % batch_size
    focused = int(batch_size * FOCUS_SHARE)
    if slot < focused:
        task = synthetic.TASKS_BY_NAME[FOCUS_TASKS[slot % len(FOCUS_TASKS)]]
        return synthetic.make_sample("train", global_index, (task,))
    return training_sample(global_index)


def focus(out: Path, steps: int, seed: int, batch_size: int, lr: float, threads: int, log_every: int = 50,
          val_samples: int = 270) -> dict:
    """Stage 3: continue from the checkpoint saved in `out` (as saved, so running it as a separate
    `--resume` command gives the same weights) with half of every batch on FOCUS_TASKS."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    model.train()
    t0 = time.time()
    history = question_training(
        model, Batcher(out), steps, lr, "focus", log_every, val_samples, val_every=log_every * 5,
        samples_at=lambda step: [focus_sample(seed, step * batch_size + k, batch_size) for k in range(batch_size)])
    model.save_pretrained(out, safe_serialization=True)
    return {"focus_steps": steps, "focus_batch_size": batch_size, "focus_lr": lr, "focus_tasks": list(FOCUS_TASKS),
            "focus_share": FOCUS_SHARE, "focus_minutes": (time.time() - t0) / 60, "history": history}


TEST_SAMPLES = 900      # 100 per task
CI_SUBSET = 180         # the first 180 of them, what the test suite re-checks


def evaluate_and_card(model_dir: Path, threads: int) -> dict:
    """Score the saved model on the held-out set and write eval_results.json and the model card."""
    from edgelmm.api import load
    from edgelmm.evaluate import evaluate, format_table

    report = evaluate(load(model_dir, backend="torch", threads=threads), TEST_SAMPLES)
    log = json.loads((model_dir / "training_log.json").read_text())
    full, subset = report.as_dict(), report.subset(CI_SUBSET)
    results = {"test": {k: full[k] for k in ("accuracy", "samples", "skills", "tasks")},
               "ci_subset": {"samples": CI_SUBSET, "accuracy": subset.accuracy,
                             "skills": {k: v["accuracy"] for k, v in subset.skills().items()}},
               "mistakes": full["mistakes"]}
    (model_dir / "eval_results.json").write_text(json.dumps(results, indent=1))
    cfg = json.loads((model_dir / "config.json").read_text())
    n_params = sum(v["numel"] for v in _tensor_sizes(model_dir).values())
    weights_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2 ** 20
    task_rows = "\n".join(f"| {t['task']} | {t['skill']} | {t['accuracy']:.1%} | {t['chance']:.1%} |"
                          for t in results["test"]["tasks"].values())
    card = CARD.format(
        params=n_params / 1e6, weights_mb=weights_mb, text=cfg["text_config"], vision=cfg["vision_config"],
        tokens=(cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2,
        vocab=cfg["text_config"]["vocab_size"], table=format_table(report), task_rows=task_rows,
        steps=log["steps"], batch=log["batch_size"], lr=log["lr"], seed=log["seed"], threads=log["threads"],
        minutes=log["minutes"], machine=log.get("machine", "?"), samples=log["steps"] * log["batch_size"],
        vision_steps=log["vision_steps"], vision_batch=log["vision_batch_size"], vision_lr=log["vision_lr"],
        vision_minutes=log["vision_minutes"], tower_scale=VISION_LR_SCALE, **_vision_result(log),
        focus_steps=log.get("focus_steps", 0), stage3=_stage3_text(log),
        subset=results["ci_subset"]["accuracy"], ci=CI_SUBSET, n=TEST_SAMPLES, limits=_limits(results))
    (model_dir / "README.md").write_text(card)
    return results


def _last_validation(log: dict, stage: str) -> dict:
    return [e["val"] for e in log["history"] if e.get("stage") == stage and "val" in e][-1]


def _vision_result(log: dict) -> dict:
    """Stage 1's last held-out accuracies, from the training log."""
    last = _last_validation(log, "vision")
    return {"vision_shapes": last["shapes"], "vision_counts": last["counts"]}


def _stage3_text(log: dict) -> str:
    """The card's paragraph on stage 3 (empty when the run skipped it)."""
    if not log.get("focus_steps"):
        return ""
    before, after = _last_validation(log, "questions"), _last_validation(log, "focus")
    moved = ", ".join(f"{t} {before[t]:.0%} -> {after[t]:.0%}" for t in log["focus_tasks"])
    return (f"3. Focus, {log['focus_steps']} steps of batch {log['focus_batch_size']} (lr {log['focus_lr']}, fresh optimizer), "
            f"{log['focus_share']:.0%} of each batch\n"
            f"   on {' and '.join(log['focus_tasks'])}, the rest from the stage-2 mixture, all samples stage 2 never drew. After stage 2\n"
            "   these comparison tasks were still at chance: telling whether two renders of one scene differ\n"
            "   by one shape needs a patch-by-patch match across images, which their 1-in-13 share of the\n"
            f"   data had not taught. Validation (teacher-forced, 30 each): {moved} ({log['focus_minutes']:.0f} min).\n"
            "   It starts from the checkpoint as saved after stage 2, so `--resume` runs it alone on a\n"
            "   stage-2 model with the same result.\n")


def _limits(results: dict) -> str:
    """What the card must admit: the skills this model has not learned well (under 90%)."""
    tasks = results["test"]["tasks"].values()
    weak = []
    for skill, row in results["test"]["skills"].items():
        if row["accuracy"] < 0.9:
            detail = ", ".join(f"{t['task']} {t['accuracy']:.0%}" for t in tasks if t["skill"] == skill)
            weak.append(f"{skill} {row['accuracy']:.0%} ({detail})")
    if not weak:
        return "Every skill is at 90% or above."
    return ("Under 90%: " + "; ".join(weak) + ". These are the questions whose answer hangs on one "
            "shape among several images (a count one off, a single changed shape); the validation curves "
            "had flattened by the end of the run, so more steps alone buy little. A wider text model or "
            "smaller patches are the next things to try.\n")


def _tensor_sizes(model_dir: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                out[k] = {"shape": shape, "numel": int(np.prod(shape))}
    return out


CARD = """# edgelmm-ref-siglip-llama

edgelmm's own reference model: a small LLaVA (SigLIP vision tower, 2-layer MLP projector, Llama
text model) trained from scratch on `edgelmm.synthetic`, procedural multi-image questions about
coloured shapes and short frame sequences. It is the default model of `make demo`, `edgelmm eval`
and `edgelmm watch`, and the yardstick for every quantization and backend: unlike a random tiny
checkpoint, its answers are right or wrong.

## Architecture
- `LlavaForConditionalGeneration`, {params:.2f} M parameters, weights {weights_mb:.1f} MB (safetensors, fp16).
- Vision: SigLIP, {vision[image_size]}x{vision[image_size]} input, patch {vision[patch_size]} -> {tokens} tokens per image,
  hidden {vision[hidden_size]}, FFN {vision[intermediate_size]}, {vision[num_hidden_layers]} layers
  (features from the second-to-last, as LLaVA does), no pooling head.
- Text: Llama, hidden {text[hidden_size]}, FFN {text[intermediate_size]}, {text[num_hidden_layers]} layers,
  {text[num_attention_heads]} heads / {text[num_key_value_heads]} KV heads, untied lm_head. Hidden and FFN sizes are
  multiples of 256, so GGUF k-quants apply to every matrix.
- Tokenizer: Llama-style sentencepiece BPE, {vocab} pieces, byte fallback, identity normalisation
  (`tokenizer.model` for llama.cpp; `tokenizer.json` is the same tokenizer for HF/edgelmm, checked
  piece for piece when built). `<image>`, `<Image>`, `</Image>` are user-defined pieces.
- Prompt format: the chat template numbers the images as Mantis does,
  `USER: (image 1: <Image><image></Image>)...question\nASSISTANT: answer`, and ends the answer with `</s>`.

## Data
Generated on the fly, seeded (`edgelmm/synthetic.py`): 64x64 scenes of circles, squares and
triangles in five colours on tinted, noisy gradient backgrounds, and 3-4 frame sequences. Train,
validation and test draw from separate seed streams (split, index), so they are disjoint and
reproducible. Nine tasks in turn:

| task | skill | question |
|---|---|---|
| colour_of | co-reference | What colour is the shape in image k? |
| shape_of | co-reference | What shape is in image k? |
| more_of | comparison | Which image has more circles? |
| same | comparison | Are image i and image j the same? |
| count_all | reasoning | How many squares are there in all images? |
| what_changed | temporal | What changed between the first and the last frame? (moved, fell, appeared, disappeared, changed colour) |
| odd_frame | temporal | Which frame is abnormal? |
| anomaly | anomaly | Image 1 shows the normal scene; images 2-4 are the latest frames. Is anything abnormal? (`edgelmm watch`'s question) |
| in_context | in-context | two solved examples, then a query: report the colour, shape or count, as the examples did |

## Training
```
python tools/train_reference.py edgelmm/models/edgelmm-ref-siglip-llama --vision-steps {vision_steps} --steps {steps} --focus-steps {focus_steps} --seed {seed}
```
Three stages, all AdamW (betas 0.9/0.98, weight decay 0.05 on matrices, warm-up then cosine) with
bf16 autocast on CPU:
1. Vision pre-training, {vision_steps} steps of batch {vision_batch} single images (lr {vision_lr}): two throw-away
   linear heads on the features the projector reads learn, per patch, which shape of which colour is
   centred in it, and per image how many circles, squares and triangles it holds. Question training
   alone learns shape identity slowly through 16x16-pixel patches; this stage gives every patch a
   target. Held-out: {vision_shapes:.1%} of shapes recognised, {vision_counts:.1%} of images with all three counts right
   ({vision_minutes:.0f} min).
2. Questions, {steps} steps of batch {batch} (lr {lr}; the pre-trained tower at {tower_scale}x), {samples} samples each
   seen once, loss on the answer tokens and `</s>` only. Training batches are built with edgelmm's
   own `Pipeline.prepare`, the prompt path the runtime serves.
{stage3}
Took {minutes:.0f} min in all on {machine} ({threads} threads). The run is deterministic for a given seed and
thread count (the test suite trains two short runs and compares the weights bit for bit).

## Evaluation
`edgelmm eval` (greedy answers, exact match after lower-casing), {n} held-out test samples, PyTorch reference:

{table}

Chance is the majority baseline: the accuracy of always giving the most common answer of each task.

| task | skill | accuracy | chance |
|---|---|---|---|
{task_rows}

The test suite re-checks the first {ci} test samples (accuracy here {subset:.1%}) through `from_pretrained`.

## Limits
{limits}
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write the checkpoint to (replaced when done)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4,
                    help="peak learning rate; above ~1e-3 the vision path collapses in the first steps")
    ap.add_argument("--vision-steps", type=int, default=2500,
                    help="steps of stage 1, the vision tower's supervised pre-training (0 skips it)")
    ap.add_argument("--focus-steps", type=int, default=1500,
                    help="steps of stage 3, half of each batch on the comparison tasks (0 skips it)")
    ap.add_argument("--resume", action="store_true",
                    help="OUT already holds a model trained through stage 2: run only stage 3 on it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                    help="dtype of the saved weights")
    ap.add_argument("--card-only", action="store_true",
                    help="re-evaluate an already trained OUT and rewrite its model card")
    args = ap.parse_args(argv)
    if args.card_only:
        print(json.dumps(evaluate_and_card(args.out, args.threads)["test"]["skills"], indent=1))
        return

    import torch
    from transformers import LlavaForConditionalGeneration

    def save_as_dtype(path: Path) -> None:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, args.dtype))
        model.save_pretrained(path, safe_serialization=True)

    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.resume:
        if not (args.out / "training_log.json").is_file():
            raise SystemExit(f"--resume needs a model trained by this script in {args.out} "
                             f"(no {args.out / 'training_log.json'})")
        log = json.loads((args.out / "training_log.json").read_text())
        if "focus_steps" in log:
            raise SystemExit(f"{args.out} has had stage 3 already ({log['focus_steps']} steps)")
        shutil.copytree(args.out, tmp)
    else:
        tmp.mkdir(parents=True)
        build_tokenizer(tmp)
        build_model(tmp, args.seed)
        log = train(tmp, args.steps, args.seed, args.batch_size, args.lr, args.threads, vision_steps=args.vision_steps)
        # Saved as it ships before stage 3 reads it, so a stage 3 run later with --resume starts from
        # the very same weights.
        save_as_dtype(tmp)
        log["machine"] = _machine()
    if args.focus_steps:
        stage3 = focus(tmp, args.focus_steps, log["seed"], log["batch_size"], log["lr"], args.threads)
        save_as_dtype(tmp)
        log["history"] += stage3.pop("history")
        log.update(stage3)
        log["minutes"] += stage3["focus_minutes"]
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    results = evaluate_and_card(tmp, args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"wrote {args.out} in {log['minutes']:.1f} min; held-out accuracy {results['test']['accuracy']:.1%}")


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
