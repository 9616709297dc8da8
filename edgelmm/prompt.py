"""Interleaved multi-image prompts.

Users give either a string with `<image>` markers or OpenAI-style messages whose content mixes
`{"type": "text", "text": ...}` and `{"type": "image"}` parts (an image part may carry its source
as `"image"`, `"path"`, `"url"` or `"image_url"`). In-context examples (MIMIC-IT style: several
image/answer pairs, then a query) are simply longer prompts. Models that read videos take
`<video>` markers and `{"type": "video"}` parts (source: `"video"`, an `edgelmm.Video`) the same
way; images and videos are given in one list, in the order of their markers.

The chat template comes from the checkpoint and is rendered here with jinja2 in the same
sandboxed environment HF uses, so the runtime needs no transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence, Union

from .errors import PromptError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
MARKERS = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}

Message = dict[str, Any]
PromptInput = Union[str, Sequence[Message]]


@dataclass
class ParsedPrompt:
    messages: list[Message]          # content always a list of parts
    inline_images: list[Any]         # image and video sources found in the parts, in order (may be empty)
    n_image_parts: int               # image and video parts together
    media_kinds: list[str] = field(default_factory=list)  # "image" or "video", one per part, in order

    def describe_markers(self) -> str:
        """'2 <image> markers' or '1 <image> and 1 <video> marker(s)'."""
        videos = self.media_kinds.count("video")
        if not videos:
            return f"{self.n_image_parts} {IMAGE_MARKER} marker(s)"
        return f"{self.n_image_parts - videos} {IMAGE_MARKER} and {videos} {VIDEO_MARKER} marker(s)"


def check_text(text: str, where: str = "prompt") -> str:
    """The text, if it can be encoded as UTF-8 (what the tokenizer needs). A lone surrogate (such as
    an undecodable byte of a command-line argument, which Python keeps as '\\udcXX') is refused
    here, naming where it is, instead of failing inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{where}: character {exc.start} ({text[exc.start]!r}) is not valid Unicode text "
                          "(a lone surrogate, or a byte that was not UTF-8)") from None
    return text


def _decode(prompt: bytes) -> str:
    try:
        return prompt.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = prompt[exc.start:exc.start + 1]
        raise PromptError(f"prompt: byte {exc.start} ({bad!r}) is not valid UTF-8") from None


_MARKER_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
_IMAGE_SPLIT = re.compile(f"({re.escape(IMAGE_MARKER)})")


def _split_markers(text: str, where: str = "prompt", videos: bool = True) -> list[dict[str, Any]]:
    check_text(text, where)
    parts: list[dict[str, Any]] = []
    for chunk in (_MARKER_SPLIT if videos else _IMAGE_SPLIT).split(text):
        if chunk == IMAGE_MARKER:
            parts.append({"type": "image"})
        elif chunk == VIDEO_MARKER and videos:
            parts.append({"type": "video"})
        elif chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


_IMAGE_SOURCE_KEYS = ("image", "path", "url", "image_url")
_VIDEO_SOURCE_KEYS = ("video",)


def parse_prompt(prompt: PromptInput, videos: bool = True) -> ParsedPrompt:
    """Normalise a prompt to messages with list content. `<image>` markers inside text parts are
    turned into image parts (and `<video>` markers into video parts, unless `videos` is False: for a
    model that reads no videos, "<video>" is text), so both ways of writing a prompt reach the
    template the same way. A bytes prompt is decoded as UTF-8."""
    if isinstance(prompt, (bytes, bytearray)):
        prompt = _decode(bytes(prompt))
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _split_markers(prompt, videos=videos)}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt) and prompt:
        messages = []
        for mi, m in enumerate(prompt):
            if "role" not in m or "content" not in m:
                raise PromptError(f"message {mi} needs 'role' and 'content' keys, got {sorted(m)}")
            role = m["role"]
            # Which roles exist is the chat template's business (it may raise on one it does not know);
            # anything but a non-empty string is nonsense to every template, which would silently
            # treat it as some other role.
            if not isinstance(role, str) or not role.strip():
                raise PromptError(f"message {mi}: 'role' must be a non-empty string such as 'user', 'assistant' "
                                  f"or 'system', got {role!r} ({type(role).__name__})")
            check_text(role, f"message {mi} role")
            content = m["content"]
            if isinstance(content, str):
                parts = _split_markers(content, f"message {mi}", videos)
            elif isinstance(content, Sequence):
                parts = []
                for pi, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        text = part.get("text")
                        if not isinstance(text, str):
                            raise PromptError(f"message {mi} part {pi}: a text part needs a string 'text', "
                                              + ("and it has none" if "text" not in part else
                                                 f"got {text!r} ({type(text).__name__})"))
                        parts.extend(_split_markers(text, f"message {mi} part {pi}", videos))
                    elif kind in ("image", "image_url"):
                        parts.append(dict(part, type="image"))
                    elif kind == "video":
                        parts.append(dict(part))
                    else:
                        raise PromptError(f"message {mi} part {pi}: unknown content part {part!r} "
                                          "(want {'type': 'text'}, {'type': 'image'} or {'type': 'video'})")
            else:
                raise PromptError(f"message {mi}: content must be a string or a list of parts")
            messages.append({**m, "content": parts})
    else:
        raise PromptError("prompt must be a string or a non-empty list of {'role', 'content'} messages")

    inline, kinds = [], []
    for m in messages:
        for part in m["content"]:
            if part["type"] in MARKERS:
                kinds.append(part["type"])
                keys = _IMAGE_SOURCE_KEYS if part["type"] == "image" else _VIDEO_SOURCE_KEYS
                src = next((part[k] for k in keys if part.get(k) is not None), None)
                if isinstance(src, dict):  # OpenAI {"image_url": {"url": ...}}
                    src = src.get("url")
                if src is not None:
                    inline.append(src)
    if inline and len(inline) != len(kinds):
        raise PromptError(f"{len(kinds)} image/video parts but only {len(inline)} carry a source; "
                          "give every part a source, or pass all images and videos separately")
    return ParsedPrompt(messages=messages, inline_images=inline, n_image_parts=len(kinds), media_kinds=kinds)


def messages_as_plain_text(messages: list[Message]) -> str:
    """Without a chat template: the text and markers in order, messages joined by newlines."""
    lines = []
    for m in messages:
        lines.append("".join(p["text"] if p["type"] == "text" else MARKERS[p["type"]] for p in m["content"]))
    return "\n".join(lines)


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment HF renders templates in (trim_blocks, lstrip_blocks, loop controls, the
    # tojson/raise_exception/strftime_now helpers), so the text matches apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise PromptError(f"the model's chat template does not compile: {exc}") from None


def render_chat(template: str, messages: list[Message], special_tokens: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    import jinja2

    # Image sources stay out of the template: it only needs to know where images go.
    clean = [{**m, "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                               for p in m["content"]]} for m in messages]
    try:
        return _compile_template(template).render(messages=clean, add_generation_prompt=add_generation_prompt,
                                                  **special_tokens)
    except jinja2.TemplateError as exc:
        raise PromptError(f"the model's chat template refused these messages: {exc}") from None
