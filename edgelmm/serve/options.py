"""What the operator sets for a server (the `edgelmm serve` flags), checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check_int, check_number
from .chat import Limits


@dataclass
class ServerOptions:
    max_batch: int = 4                 # requests decoded together
    max_queue: int = 64                # requests waiting beyond those; more get 429
    batch_window_s: float = 0.005      # how long the first request of a batch waits for company
    api_key: str | None = None
    model_name: str | None = None      # the id /v1/models lists (default: the bundle folder's name)
    limits: Limits = field(default_factory=Limits)

    def validate(self) -> "ServerOptions":
        check_int("max_batch", self.max_batch, 1, 256)
        check_int("max_queue", self.max_queue, 0)
        check_number("batch_window_s", self.batch_window_s, 0, 10)
        lim = self.limits
        check_int("max_images", lim.max_images, 0, 1024)
        check_int("max_image_bytes", lim.max_image_bytes, 1)
        check_int("max_image_pixels", lim.max_image_pixels, 16)
        check_int("max_videos", lim.max_videos, 0, 64)
        check_int("max_video_bytes", lim.max_video_bytes, 1)
        check_int("max_video_frames", lim.max_video_frames, 1, 768)
        check_number("video_fps", lim.video_fps, 0, 120, lo_open=True)
        check_int("max_output_tokens", lim.max_output_tokens, 1)
        if lim.max_prompt_tokens is not None:
            check_int("max_prompt_tokens", lim.max_prompt_tokens, 1)
        return self
