"""Stage 1 of `edgelmm watch`: is this frame unlike the normal scene?

A frame's vision features (the bundle's vision graph output, [tiles, T, D]) are reduced to at most
`max_positions` spatial cells of at most `max_dims` dimensions (average pooling over the token
grid, a fixed random projection over channels) and L2-normalised per cell. The score of a frame
is, over cells, the largest cosine distance to the nearest remembered normal frame *at the same
cell*: a small new object changes one cell a lot, which a pooled whole-frame feature would
average away, and comparing cell with cell (not with any cell) notices an object that moved.

The memory holds a fixed core (the user's reference images and the warm-up frames) and a FIFO of
recent normal frames (under the threshold, outside an episode), so slow drift (light, a swaying
branch) is learned while an abrupt change is not; the price is that an anomaly that creeps in
slower than the threshold is learned too, as is one already there during the warm-up.

The threshold adapts: `margin` times the 99th percentile of the scores of normal frames
(leave-one-out scores over the warm-up core at first), never below `min_threshold`. Hysteresis:
an episode starts after `trigger_frames` consecutive frames over the threshold and ends after
`clear_frames` consecutive frames under half of it. The watcher asks its verifier once per
episode (and again while the answer is no and the episode goes on).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..options import check_int, check_number


@dataclass
class GateConfig:
    # Gated frames learned as normal before scoring starts: 3 s at 30 fps, so the warm-up spans a
    # whole cycle of the scene's own motion (a sway of 40-80 frames in the test videos). With 1 s, a
    # shape swaying across a patch border later on scored 0.075 against a 0.01 threshold.
    warmup_frames: int = 90
    trigger_frames: int = 3          # consecutive frames over the threshold that start an episode
    clear_frames: int = 15           # consecutive frames under half the threshold that end it
    margin: float = 3.0              # threshold = margin x p99 of normal scores ...
    min_threshold: float = 0.01      # ... but never below this cosine distance
    threshold: float | None = None   # a fixed threshold instead of the adaptive one
    memory_size: int = 90            # recent normal frames remembered besides the core
    score_window: int = 512          # normal scores the adaptive threshold is computed from
    max_positions: int = 64          # spatial cells kept per frame
    max_dims: int = 256              # channels kept per cell

    def validate(self) -> None:
        """An OptionError naming the field (`edgelmm watch`'s --warmup, --trigger, --clear, --margin,
        --min-threshold, --threshold). The numbers are checked finite first: `margin <= 0` lets NaN
        through, and a NaN margin or threshold means no event can ever fire."""
        check_int("warmup_frames", self.warmup_frames, 0)
        check_int("trigger_frames", self.trigger_frames, 1)
        check_int("clear_frames", self.clear_frames, 1)
        check_number("margin", self.margin, 0, lo_open=True)
        check_number("min_threshold", self.min_threshold, 0)
        if self.threshold is not None:
            check_number("threshold", self.threshold, 0, lo_open=True)
        check_int("memory_size", self.memory_size, 0)
        check_int("score_window", self.score_window, 1)
        check_int("max_positions", self.max_positions, 1)
        check_int("max_dims", self.max_dims, 1)


@dataclass
class GateDecision:
    score: float | None              # None while warming up
    threshold: float | None
    over: bool                       # this frame's score is over the threshold
    started: bool                    # an episode starts with this frame (fire an event)
    in_episode: bool
    normal: bool                     # counted as a normal frame (learned into memory)
    cells: np.ndarray | None = None  # per cell, its distance to the memory (the score is their max)
    layout: dict[str, int] | None = None   # where the cells lie in the image (FeatureReducer.layout)


class FeatureReducer:
    """[tiles, T, D] features -> [P, d] unit vectors, P <= max_positions, d <= max_dims."""

    def __init__(self, max_positions: int, max_dims: int, seed: int = 0):
        self.max_positions = max_positions
        self.max_dims = max_dims
        self.seed = seed
        self._projection: np.ndarray | None = None
        # Where the cells lie in the image, for the live view's heat-map: {"tiles", "rows", "cols"}
        # for square token grids (cell i of a tile is at row i // cols), None for a token sequence
        # (a resampler's latents) whose cells have no place in the image.
        self.layout: dict[str, int] | None = None

    def _pool(self, cells: np.ndarray) -> np.ndarray:
        tiles, t, d = cells.shape
        side = math.isqrt(t)
        per_tile = max(1, self.max_positions // tiles)
        if t <= per_tile:
            pooled = cells
            self.layout = {"tiles": tiles, "rows": side, "cols": side} if side * side == t else None
        elif side * side == t:          # a square token grid: average over blocks of it
            out = max(1, math.isqrt(per_tile))
            self.layout = {"tiles": tiles, "rows": out, "cols": out}
            edges = np.linspace(0, side, out + 1).astype(int)
            grid = cells.reshape(tiles, side, side, d)
            pooled = np.stack([grid[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(1, 2))
                               for i in range(out) for j in range(out)], axis=1)
        else:                           # a token sequence: average over equal runs of it
            edges = np.linspace(0, t, per_tile + 1).astype(int)
            self.layout = None
            pooled = np.stack([cells[:, edges[i]:edges[i + 1]].mean(axis=1) for i in range(per_tile)], axis=1)
        return pooled.reshape(-1, d)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        cells = self._pool(np.asarray(features, np.float32))
        d = cells.shape[-1]
        if d > self.max_dims:
            if self._projection is None or self._projection.shape[0] != d:
                rng = np.random.default_rng(self.seed)
                gaussian = rng.standard_normal((d, self.max_dims)) / math.sqrt(self.max_dims)
                self._projection = gaussian.astype(np.float32)
            cells = cells @ self._projection
        norms = np.linalg.norm(cells, axis=-1, keepdims=True)
        return cells / np.maximum(norms, 1e-12)


class NormalSceneGate:
    def __init__(self, config: GateConfig | None = None):
        self.config = config or GateConfig()
        self.config.validate()
        self.reduce = FeatureReducer(self.config.max_positions, self.config.max_dims)
        self.core: list[np.ndarray] = []
        self.references = 0
        self._core_stack: np.ndarray | None = None  # the core as one array, rebuilt when it grows
        self._recent: np.ndarray | None = None      # a ring of recent normal frames, written in place
        self._recent_count = 0
        self.normal_scores: deque[float] = deque(maxlen=self.config.score_window)
        self.threshold: float | None = self.config.threshold
        self.in_episode = False
        self.gated = 0
        self._over_run = 0
        self._under_run = 0

    # ---- memory ----
    def add_reference(self, features: np.ndarray) -> None:
        """Remember a frame of the normal scene for good (a user's reference image)."""
        self._remember_core(self.reduce(features))
        self.references += 1

    def _check_shape(self, cells: np.ndarray) -> None:
        if self.core and cells.shape != self.core[0].shape:
            raise ValueError(f"a frame has {cells.shape[0]} feature cells but the remembered normal frames have "
                             f"{self.core[0].shape[0]} (the model tiles images of other sizes differently): "
                             "give reference images of the camera's frame size")

    def _remember_core(self, cells: np.ndarray) -> None:
        self._check_shape(cells)
        self.core.append(cells)
        self._core_stack = None

    def _remember_recent(self, cells: np.ndarray) -> None:
        if not self.config.memory_size:
            return
        if self._recent is None:
            self._recent = np.empty((self.config.memory_size,) + cells.shape, np.float32)
        self._recent[self._recent_count % self.config.memory_size] = cells
        self._recent_count += 1

    @property
    def warming_up(self) -> bool:
        """Still learning: fewer than warmup_frames frames seen, or nothing remembered yet."""
        return self.gated < self.config.warmup_frames or len(self.core) == 0

    def _calibrate(self) -> None:
        """The first threshold, from leave-one-out scores of the core (no score yet: min_threshold)."""
        self.normal_scores.extend(self._leave_one_out_scores())
        self._update_threshold()

    @staticmethod
    def cell_distances(cells: np.ndarray, *memories: np.ndarray) -> np.ndarray:
        """Per cell, the cosine distance to the nearest memory frame at that cell."""
        best = np.max([np.einsum("pd,kpd->kp", cells, m).max(axis=0) for m in memories if len(m)], axis=0)
        return 1.0 - best

    @classmethod
    def distance(cls, cells: np.ndarray, *memories: np.ndarray) -> float:
        """Over cells, the largest cosine distance to the nearest memory frame at that cell."""
        return float(cls.cell_distances(cells, *memories).max())

    def cell_scores(self, cells: np.ndarray) -> np.ndarray:
        """Per cell, the frame's distance to the memory: the core, then the recent normal frames."""
        if self._core_stack is None:
            self._core_stack = np.stack(self.core)
        recent = self._recent[: min(self._recent_count, self.config.memory_size)] if self._recent_count else None
        return self.cell_distances(cells, self._core_stack, *([] if recent is None else [recent]))

    def score(self, cells: np.ndarray) -> float:
        """The frame's distance to the memory (its largest cell score)."""
        return float(self.cell_scores(cells).max())

    def _leave_one_out_scores(self) -> list[float]:
        core = np.stack(self.core)
        return [self.distance(core[i], np.delete(core, i, axis=0)) for i in range(len(core))] if len(core) > 1 else []

    def _update_threshold(self) -> None:
        if self.config.threshold is not None:
            self.threshold = self.config.threshold
            return
        scores = np.asarray(self.normal_scores, np.float64)
        p99 = float(np.quantile(scores, 0.99)) if scores.size else 0.0
        self.threshold = max(self.config.min_threshold, self.config.margin * p99)

    # ---- scoring ----
    def observe(self, features: np.ndarray) -> GateDecision:
        """Score one frame's features and step the hysteresis."""
        cells = self.reduce(features)
        warming_up = self.warming_up
        self.gated += 1
        if warming_up:
            self._remember_core(cells)
            if not self.warming_up:          # that was the last warm-up frame
                self._calibrate()
            return GateDecision(None, self.threshold, False, False, False, True)
        self._check_shape(cells)
        if self.threshold is None:
            self._calibrate()
        per_cell = self.cell_scores(cells)
        score = float(per_cell.max())
        over = score > self.threshold
        started = False
        if over:
            self._over_run += 1
            self._under_run = 0
            if not self.in_episode and self._over_run >= self.config.trigger_frames:
                self.in_episode = started = True
        else:
            self._over_run = 0
            self._under_run = self._under_run + 1 if score < self.threshold / 2 else 0
            if self.in_episode and self._under_run >= self.config.clear_frames:
                self.in_episode = False
        normal = not self.in_episode and not over
        if normal:
            self._remember_recent(cells)
            self.normal_scores.append(score)
            if self.gated % 16 == 0:
                self._update_threshold()
        return GateDecision(score, self.threshold, over, started, self.in_episode, normal, per_cell,
                            self.reduce.layout)

    def describe(self) -> dict[str, Any]:
        recent = min(self._recent_count, self.config.memory_size)
        return {"threshold": self.threshold, "memory_frames": len(self.core) + recent, "core_frames": len(self.core),
                "reference_frames": self.references, "in_episode": self.in_episode, "gated": self.gated}
