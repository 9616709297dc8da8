"""The buffers of ONNX Runtime's fused decoder layout (export/fused_decoder.py), for the ONNX Runtime
backend (runtimes/onnxruntime.py):

  FusedCache   a generation's KV buffers, bound as the graph's past and present at once
               (GroupQueryAttention writes each new position in place);
  StepBuffers  a decode step's inputs and outputs, bound once and updated in place each step;
  GraphSlots   under a CUDA graph, the buffers of each batch size kept for the backend's lifetime,
               because a replayed step reads and writes the addresses it was captured with.

On the CPU every buffer is a numpy array its OrtValue shares; on a GPU the OrtValues hold device
memory and only the step's inputs (one embedding row and one length per row) and its output (one
token id per row, or the logits where asked) cross to or from the host.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from ..errors import MemoryBudgetError, PromptError

# `backend` below is the OnnxRuntimeBackend (runtimes/onnxruntime.py) these buffers are bound to: its
# sessions, dimensions (num_layers, kv_heads, head_dim, hidden_size, vocab_size), kv_dtype and kv_device.

# Where the fused decoder's past inputs start (after inputs_embeds, seqlens_k, total_sequence_length,
# last_index).
FUSED_FIRST_PAST = 4
# Positions a fused cache holds when made; it doubles (copying what it holds) when a generation needs more.
FUSED_INITIAL_CAPACITY = 256
# Positions a CUDA-graph slot holds (GpuOptions.cuda_graph_context): its buffers cannot grow, since
# the graph captured their addresses. A generation that needs more leaves the slot and goes on uncaptured.
CUDA_GRAPH_CONTEXT = 4096


def allocate_kv(backend, batch_size: int, capacity: int,
                old: list | None = None) -> tuple[list, list | None]:
    """Keys/values [batch, kv_heads, capacity, head_dim] per layer as OrtValues where the decoder
    runs, zeroed or starting with `old`'s positions (host arrays), and (on the CPU) the numpy arrays
    they share."""
    shape = (batch_size, backend.kv_heads, capacity, backend.head_dim)
    arrays = [np.zeros(shape, backend.kv_dtype) for _ in range(2 * backend.num_layers)]
    for new, prev in zip(arrays, old or []):
        new[:, :, :prev.shape[2]] = prev
    ort = backend.ort
    if backend.kv_device == "cpu":
        return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], arrays
    return [ort.OrtValue.ortvalue_from_numpy(a, backend.kv_device, backend.gpu.device_id) for a in arrays], None


class StepBuffers:
    """A decode step of `batch_size` rows (one new token each) over one set of KV buffers: every
    input and output bound once, the inputs rewritten in place each step. This is what a CUDA graph
    needs (the replay uses the captured addresses) and what saves the per-step binding work
    elsewhere. total_sequence_length is fixed at the buffers' capacity: GroupQueryAttention reads it
    on the host (a captured step could never see it change) and takes each row's real length from
    seqlens_k."""

    def __init__(self, backend, batch_size: int, kv_values: list, capacity: int):
        ort, device = backend.ort, backend.kv_device
        session = backend.sessions["decoder"]
        self.device = device
        self.host = {"inputs_embeds": np.zeros((batch_size, 1, backend.hidden_size), backend.kv_dtype),
                     "seqlens_k": np.zeros(batch_size, np.int32),
                     "last_index": np.zeros(batch_size, np.int64),  # the step's only position
                     "logits": np.zeros((batch_size, backend.vocab_size), backend.kv_dtype)}
        if backend.has_next_token:
            self.host["next_token"] = np.zeros(batch_size, np.int64)
        if device == "cpu":
            self.values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in self.host.items()}
        else:
            self.values = {k: ort.OrtValue.ortvalue_from_numpy(a, device, backend.gpu.device_id)
                           for k, a in self.host.items()}
        self.total = ort.OrtValue.ortvalue_from_numpy(np.array(capacity, np.int32))  # host memory, as the kernel reads it
        binding = session.io_binding()
        for name in ("inputs_embeds", "seqlens_k", "last_index"):
            binding.bind_ortvalue_input(name, self.values[name])
        binding.bind_ortvalue_input("total_sequence_length", self.total)
        for past, present, value in zip(backend.past_names, backend.present_names, kv_values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_ortvalue_output("logits", self.values["logits"])
        if backend.has_next_token:
            binding.bind_ortvalue_output("next_token", self.values["next_token"])
        self.binding = binding

    def _set(self, name: str, array: np.ndarray) -> None:
        if self.device == "cpu":
            np.copyto(self.host[name], array, casting="unsafe")
        else:
            self.values[name].update_inplace(np.ascontiguousarray(array, self.host[name].dtype))

    def load(self, embeds: np.ndarray, lengths: np.ndarray) -> None:
        """The step's input: one embedding row per batch row, and each row's length before it."""
        self._set("inputs_embeds", embeds)
        self._set("seqlens_k", lengths)   # seqlens_k is the total after the step - 1: the length before it

    def logits(self) -> np.ndarray:
        """The step's logits [batch, vocab], float32, a copy (the buffer is the next step's)."""
        out = self.host["logits"] if self.device == "cpu" else self.values["logits"].numpy()
        return out.astype(np.float32, copy=True)

    def next_tokens(self) -> np.ndarray:
        """The step's greedy ids [batch]: on a GPU, the only bytes that cross to the host."""
        out = self.host["next_token"] if self.device == "cpu" else self.values["next_token"].numpy()
        return out.astype(np.int64, copy=True)


class FusedCache:
    """The fused decoder's KV buffers, [batch, kv_heads, capacity, head_dim] per layer for keys and
    values, allocated once per generation (and grown by doubling) or borrowed from the backend's
    CUDA-graph slot, bound as the graph's past and present at once: GroupQueryAttention writes each
    new position in place. `lengths` holds each row's positions. On the CPU the buffers are numpy
    arrays the OrtValues share, so a row's slice is a view a batch-1 run writes through."""

    def __init__(self, backend, batch_size: int):
        self.backend, self.batch_size = backend, batch_size
        self.lengths = np.zeros(batch_size, np.int64)
        self.capacity = 0
        self.values: list = []
        self.host_arrays: list | None = None
        self.step: StepBuffers | None = None   # made at the first decode step, remade when the buffers grow
        self.graph_id = -1                     # the CUDA graph this cache's steps replay; -1: none
        slot = backend.graph_slots.borrow(self) if backend.graph_slots is not None else None
        if slot is not None:
            self.values, self.host_arrays, self.capacity = slot.kv_values, slot.host_arrays, slot.capacity
            self.step, self.graph_id = slot.step, slot.graph_id
        else:
            self.reserve(1)

    @property
    def length(self) -> int:
        return int(self.lengths.max(initial=0))

    def reserve(self, positions: int) -> None:
        be = self.backend
        if positions <= self.capacity:
            return
        if positions > be.max_context:
            raise PromptError(f"{positions} positions exceed the fused decoder's {be.max_context} (the model's "
                              "rotary table)")
        capacity = max(FUSED_INITIAL_CAPACITY, self.capacity)
        while capacity < positions:
            capacity *= 2
        capacity = min(capacity, be.max_context)
        old = self.host_arrays if self.host_arrays is not None else [v.numpy() for v in self.values]
        self.values, self.host_arrays = allocate_kv(be, self.batch_size, capacity, old)
        if self.graph_id != -1:  # outgrew its slot: the slot is free again, the rest runs uncaptured
            be.graph_slots.give_back(self)
            self.graph_id = -1
        self.capacity = capacity
        self.step = None

    def step_buffers(self) -> StepBuffers:
        if self.step is None:
            self.step = StepBuffers(self.backend, self.batch_size, self.values, self.capacity)
        return self.step

    def row_values(self, row: int) -> list:
        """OrtValues over one row's slice of the (host) buffers: a batch-1 run writes through them."""
        return [self.backend.ort.OrtValue.ortvalue_from_numpy(a[row:row + 1]) for a in self.host_arrays]


class GraphSlot:
    def __init__(self, backend, batch_size: int, capacity: int):
        self.batch_size, self.capacity = batch_size, capacity
        self.graph_id = batch_size  # ORT reserves 0; one captured graph per batch size
        self.kv_values, self.host_arrays = allocate_kv(backend, batch_size, capacity)
        self.step = StepBuffers(backend, batch_size, self.kv_values, capacity)
        self.owner: weakref.ref | None = None


class GraphSlots:
    """The CUDA-graph slots of one backend, one per batch size, made at first use. ONNX Runtime does
    not check that a replay's bound buffers are the ones it captured (a replay over others would
    compute on stale memory, silently), so the buffers a graph id was captured with are the only ones
    it ever runs with: a generation borrows its batch size's slot while it lives; a second one at the
    same time, or one that outgrows the slot's capacity, runs uncaptured on buffers of its own."""

    def __init__(self, backend, capacity: int):
        self.backend = backend
        self.capacity = capacity
        self.slots: dict[int, GraphSlot] = {}
        self.lock = threading.Lock()

    def borrow(self, cache: FusedCache) -> GraphSlot | None:
        with self.lock:
            slot = self.slots.get(cache.batch_size)
            if slot is None:
                try:
                    slot = self.slots[cache.batch_size] = GraphSlot(self.backend, cache.batch_size, self.capacity)
                except Exception as exc:  # device memory for the buffers: say which setting sizes them
                    raise MemoryBudgetError(f"cannot allocate the CUDA-graph buffers of {self.capacity} positions "
                                            f"for batch {cache.batch_size} ({type(exc).__name__}: {str(exc)[:300]}): "
                                            "lower GpuOptions.cuda_graph_context") from None
            if slot.owner is not None and slot.owner() is not None:
                return None
            slot.owner = weakref.ref(cache)
            return slot

    def give_back(self, cache: FusedCache) -> None:
        with self.lock:
            slot = self.slots.get(cache.batch_size)
            if slot is not None and slot.owner is not None and slot.owner() is cache:
                slot.owner = None

    def describe(self) -> dict:
        return {"capacity": self.capacity, "batch_sizes": sorted(self.slots)}
