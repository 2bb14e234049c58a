"""The KV cache and one forward pass, one class per package layout (docs/FORMATS.md, `kv_layout`).

    concat  (the plain torch.onnx graph, `export --no-fuse`)
        feeds past_key.{i} [1, Hkv, length, D] as numpy, gets present = past ++ new back as numpy:
        every step copies the whole cache in and out.
    static  (the fused graph, GroupQueryAttention)
        past_key.{i} is a [1, Hkv, capacity, D] buffer, bound with IO binding as BOTH past_key.{i} and
        present_key.{i}; the op writes the new positions into it and nothing else moves. onnxruntime
        updates in place only this way: with plain run() it copies the cache (../shared/ONNX-NOTES.md).
        Positions come from seqlens_k (= tokens after this step − 1).

The static buffers grow with what the sequence holds instead of being allocated at max_length:

    capacity  FIRST_POSITIONS (256) ─► a forward that needs more ─► new buffer of max(2 × capacity, the
              tokens rounded up to a power of two), at most max_length; the valid positions are copied
              over and the new buffer re-bound as past and present; steps in between stay in place.

Why: a buffer of max_length positions is what the graph could hold, not what a conversation holds. A
model with a long context (SmolLM2-135M: 8,192 positions) needs hundreds of MB of fp32 cache per sequence
that way, and onnxruntime's GroupQueryAttention touches the whole buffer on a prefill, so a first
prefill into a preallocated buffer is several times slower than into a small one, and the process's
memory is far higher; decode speed is the same either way, and greedy text across growths identical
(the A/B: docs/benchmarks.md). Doubling keeps the copies to less than the final size in all (a
fraction of a decode step per token, amortized).

Sliding-window layers (Gemma 3, Mistral: the graph's kv_cache block names them) keep a window-sized buffer
instead, never grown: GroupQueryAttention's sliding_window_cache evicts what falls out of the window itself.

    window capacity  C = window + WINDOW_SLACK positions (CUDA: C = window, which its kernel requires)
    resident         L(T) = T while T <= C; past C the op drops G = C - window + 1 positions at once, keeping
                     the most recent L(T) = T - G·ceil((T - C) / G) >= window at rows [0, L) (onnxruntime's
                     contract: docs of the op's windowed cache)

So a sequence of 8,192 tokens holds window + slack positions per sliding layer, not 8,192 (docs/benchmarks.md).
Rolling back k tokens is exact when L(T - k) = L(T) - k, i.e. no eviction happened in the last k tokens;
otherwise the positions it needs are gone and truncated() says so. Speculation never asks for that: it keeps
each verify step short of the next eviction (KVCache.speculative_room).

Precision: the buffers are of the package's cache dtype (config.json's graph `dtype`): float32; float16
(CUDA packages); or int8, onnxruntime's quantized cache (`edgegpt export --kv-cache int8`), a quarter of
float32's bytes per token. The graph holds the int8 cache's scales and quantizes what it writes, so the
runtime's part is the same for every dtype: allocate zeroed buffers, bind them, copy the valid positions'
bytes when growing, set the length back when rolling back (what it held is a pure function of the tokens,
so a rolled-back int8 cache continues exactly as a fresh prefill). A dtype the provider cannot run (int8
off the CPU, float16 on it) is refused when the runner is made (check_cache_runs).

Thread safety: a runner holds nothing per sequence. Every sequence gets its own KVCache (its own
buffers and IO binding), so several threads can generate at once on one session.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from edgegpt.core.errors import EdgeGPTError
from edgegpt.runtime.package import ModelPackage
from edgegpt.runtime.session import ort_error_detail

# Positions a static cache starts with (at most max_length): a short exchange never grows, a long one
# doubles a handful of times, and a small model's 256 positions are a few MB. Read at each allocation.
FIRST_POSITIONS = 256
# Positions a sliding layer's buffer holds beyond its window: the op compacts the buffer once per
# WINDOW_SLACK + 1 tokens (a copy of the window), and speculation can run that many tokens between compactions.
WINDOW_SLACK = 256


@dataclass(frozen=True)
class Window:
    """A sequence's sliding-window buffers: `size` positions seen by a query, `capacity` rows per buffer."""

    size: int
    capacity: int

    def resident(self, total: int) -> int:
        """Positions the buffers hold after `total` tokens (onnxruntime's L(T))."""
        if total <= self.capacity:
            return total
        drop = self.capacity - self.size + 1
        return total - drop * -(-(total - self.capacity) // drop)

    def next_eviction(self, total: int) -> int:
        """The smallest token count above `total` at which the op drops positions."""
        drop = self.capacity - self.size + 1
        if total < self.capacity + 1:
            return self.capacity + 1
        return self.capacity + 1 + drop * ((total - self.capacity - 1) // drop + 1)


@dataclass(frozen=True)
class KVCache:
    """One sequence's cache after `length` tokens (batch 1).

    concat: `tensors` maps past input name -> np.ndarray [1, n_kv_heads, length, head_dim]; a step
    returns new arrays and leaves this KVCache as it was.
    static: `tensors` maps past input name -> onnxruntime OrtValue [1, n_kv_heads, capacity, head_dim]
    (capacity >= length, grown by doubling up to max_length: see the module doc), bound by `binding` as
    past and present. A step writes positions length.. in place, so all KVCaches of one sequence share
    the buffers (`step`: the sequence's buffers and the capacity they have now): continuing from an
    earlier one is correct (its positions are untouched, and a growth copies them) but overwrites what
    the later ones held. One thread per sequence.
    """

    tensors: Mapping[str, Any]
    length: int
    binding: Any = field(default=None, repr=False)  # static: the onnxruntime IOBinding
    step: Any = field(default=None, repr=False)  # static: the sequence's buffers (SequenceBuffers)

    @property
    def capacity(self) -> int:
        """Positions the cache can hold before it grows (concat: exactly `length`)."""
        return self.length if self.step is None else self.step.capacity

    @property
    def window(self) -> "Window | None":
        return None if self.step is None else self.step.window

    def speculative_room(self) -> int | None:
        """The most guesses a verify step (the last kept token, then the guesses) may carry from here so that
        rolling back to any length past the kept token stays exact; None: no limit (no sliding layers)."""
        if self.window is None:
            return None
        return self.window.next_eviction(self.length + 1) - self.length - 2

    def truncated(self, length: int) -> "KVCache":
        """This cache holding only its first `length` tokens (0 <= length <= self.length): how rejected
        tokens are rolled back. static: the length is set back, nothing moves; GroupQueryAttention reads
        only positions below seqlens_k and the next step overwrites the rest in place (checked against a
        fresh prefill in tests/test_runtime.py). concat: the arrays are cut to `length` positions."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise EdgeGPTError(f"a cache of {self.length} tokens can be truncated to 0..{self.length}, got {length!r}")
        window = self.window
        if window is not None and window.resident(length) != window.resident(self.length) - (self.length - length):
            raise EdgeGPTError(
                f"cannot roll this cache back from {self.length} to {length} tokens: its sliding-window layers have "
                f"evicted positions that length needs; prefill the tokens again into a new cache")
        if self.binding is not None:
            return replace(self, length=length)
        return replace(self, tensors={n: np.ascontiguousarray(a[:, :, :length]) for n, a in self.tensors.items()},
                       length=length)


def grown(array: np.ndarray, capacity: int, keep: int) -> np.ndarray:
    """A zeroed [B, n_kv_heads, capacity, head_dim] buffer holding the first `keep` positions of `array`
    (zeroed so that positions no step has written hold finite numbers, not stale memory)."""
    new = np.zeros((*array.shape[:2], capacity, array.shape[3]), array.dtype)
    new[:, :, :keep] = array[:, :, :keep]
    return new


def grown_capacity(capacity: int, needed: int, max_length: int) -> int:
    """The capacity after a growth that must hold `needed` positions: at least double, a power of two,
    at most max_length."""
    return min(max_length, max(2 * capacity, 1 << max(needed - 1, 0).bit_length()))


class ConcatRunner:
    """The plain graph: attention_mask covers past and new tokens; the cache grows by concatenation."""

    def __init__(self, session, package: ModelPackage, provider: str, max_length: int) -> None:
        self.session, self.package, self.max_length = session, package, max_length
        graph, spec = package.graph, package.model
        self.past_names = [n for layer in range(spec.n_layers) for n in graph.past_names(layer)]
        self.present_names = [n for layer in range(spec.n_layers) for n in graph.present_names(layer)]
        self.input_names = ["input_ids", "attention_mask", *self.past_names]
        self.output_names = ["logits", *self.present_names]
        self._empty = np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), np.dtype(graph.dtype))

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty cache; `capacity` is accepted for the static layout's sake (concatenation grows anyway)."""
        return KVCache({name: self._empty for name in self.past_names}, 0)

    def forward(self, token_ids: Sequence[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        if cache.binding is not None:
            raise EdgeGPTError(FOREIGN_CACHE)
        ids = check_ids(token_ids, cache, self.package.model.vocab_size, self.max_length)
        total = cache.length + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **cache.tensors}
        try:
            logits, *presents = self.session.run(self.output_names, feeds)
        except Exception as e:
            if not from_onnxruntime(e):
                raise
            raise run_failed(self.package, e) from None
        return logits[0], KVCache(dict(zip(self.past_names, presents)), total)


class SequenceBuffers:
    """One static-layout sequence's mutable state, shared by all its KVCaches: the cache buffers at their
    current capacity, and a decode step's inputs and logits output as numpy arrays bound once (CPU
    memory, wrapped without a copy): a step writes three numbers and runs. Binding fresh arrays and
    letting onnxruntime allocate the logits every step is measurably slower per step, and the Python side
    of re-binding costs about as much again (docs/benchmarks.md).
    """

    def __init__(self, vocab_size: int, capacity: int, window: Window | None = None) -> None:
        import onnxruntime as ort

        self.capacity = capacity  # of the full layers' buffers (grown); the sliding layers' is window.capacity
        self.window = window
        self.tensors: dict[str, Any] = {}  # past name -> OrtValue [1, n_kv_heads, capacity, head_dim]
        self.arrays: dict[str, np.ndarray] = {}  # the same memory as numpy (CPU only), for growing
        self.input_ids = np.zeros((1, 1), np.int64)
        self.seqlens_k = np.zeros(1, np.int32)
        self.total_sequence_length = np.zeros((), np.int32)
        self.logits = np.zeros((1, 1, vocab_size), np.float32)
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(getattr(self, name)) for name in STEP_NAMES}
        self.bound = False  # whether the binding holds these (a multi-token call binds its own)


STEP_NAMES = ("input_ids", "seqlens_k", "total_sequence_length", "logits")


class StaticRunner:
    """The fused graph: one buffer per cache tensor, bound as past and present, grown by doubling."""

    def __init__(self, session, package: ModelPackage, provider: str, max_length: int) -> None:
        self.session, self.package, self.max_length = session, package, max_length
        graph, spec = package.graph, package.model
        self.layer_names = [
            (past, present)
            for layer in range(spec.n_layers)
            for past, present in zip(graph.past_names(layer), graph.present_names(layer))
        ]
        self.input_names = ["input_ids", "seqlens_k", "total_sequence_length", *(p for p, _ in self.layer_names)]
        self.output_names = ["logits", *(p for _, p in self.layer_names)]
        # The buffers' element type is the cache's (int8 for onnxruntime's quantized cache: the graph holds
        # the scales and quantizes what it writes, so growing, binding and rolling back are byte copies
        # and length changes, as for a float cache).
        self.dtype = np.dtype(graph.dtype)
        check_cache_runs(session, package, provider, self.layer_names[0][0])
        # Where the buffers live: on the GPU for CUDA, so a step never crosses the bus with the cache.
        self.device = "cuda" if provider == "cuda" else "cpu"
        # Sliding layers' buffers: window-sized, never grown (module doc). CUDA's kernel takes capacity == window.
        kv_cache = graph.kv_cache
        self.sliding = frozenset(past for layer in kv_cache.get("sliding_layers", ())
                                 for past in graph.past_names(layer))
        self.window = None
        if self.sliding:
            size = int(kv_cache["sliding_window"])
            slack = 0 if self.device == "cuda" else WINDOW_SLACK
            self.window = Window(size, min(size + slack, max(max_length, size)))

    def buffer_shape(self, batch: int, capacity: int, past: str | None = None) -> tuple[int, int, int, int]:
        """A buffer's shape: `capacity` positions, or the window's for a sliding layer's `past` name."""
        spec = self.package.model
        if past in self.sliding:
            capacity = self.window.capacity
        return (batch, spec.n_kv_heads, capacity, spec.head_dim)

    def new_arrays(self, batch: int, capacity: int) -> dict[str, np.ndarray]:
        """Zeroed buffers for every layer: `capacity` positions, a sliding layer's window capacity."""
        return {past: np.zeros(self.buffer_shape(batch, capacity, past), self.dtype) for past, _ in self.layer_names}

    def full_capacity(self, arrays: Mapping[str, np.ndarray]) -> int:
        """The grown layers' capacity of `arrays`; when every layer slides, max_length (nothing ever grows)."""
        grown_layers = [array for past, array in arrays.items() if past not in self.sliding]
        return grown_layers[0].shape[2] if grown_layers else self.max_length

    def first_capacity(self, tokens: int = 0) -> int:
        """Positions a new cache starts with: FIRST_POSITIONS, or enough for `tokens` (a power of two),
        at most max_length."""
        return grown_capacity(FIRST_POSITIONS // 2, tokens, self.max_length)

    def new_cache(self, capacity: int | None = None, arrays: Mapping[str, np.ndarray] | None = None) -> KVCache:
        """Fresh zeroed buffers and a binding of their own: [1, n_kv_heads, capacity, head_dim] each
        (capacity default: first_capacity(); at most max_length; forward grows them as needed).

        arrays (CPU only): past name -> a C-contiguous array [1, n_kv_heads, C, head_dim] to use as the
        buffer instead, e.g. one row of a batch's buffer (runtime/batch.py prefills each row in place
        this way, sized so that the prefill never grows it).
        """
        if arrays is not None:
            capacity = self.full_capacity(arrays)
        elif capacity is None:  # (Generator.empty_cache checks a capacity a caller gives)
            capacity = self.first_capacity()
        binding = self.session.io_binding()
        # Bound first so it is get_outputs()[0]: re-binding a name later keeps its place.
        binding.bind_output("logits", "cpu")
        buffers = SequenceBuffers(self.package.model.vocab_size, min(capacity, self.max_length), self.window)
        if arrays is None:
            arrays = self.new_arrays(1, buffers.capacity)
        self._adopt(buffers, binding, arrays, buffers.capacity)
        return KVCache(buffers.tensors, 0, binding, buffers)

    def _grow(self, buffers: SequenceBuffers, binding, capacity: int, keep: int) -> None:
        """Replace the sequence's buffers by ones of `capacity` positions holding their first `keep`."""
        # On the GPU the old buffer comes back to the host once per growth (OrtValue cannot copy a slice
        # on the device); growths are rare (doubling) and the steps between stay on it.
        old = buffers.arrays if self.device == "cpu" else {p: t.numpy() for p, t in buffers.tensors.items()}
        new = {past: array if past in self.sliding else grown(array, capacity, keep) for past, array in old.items()}
        self._adopt(buffers, binding, new, capacity)

    def _adopt(self, buffers: SequenceBuffers, binding, arrays: Mapping[str, np.ndarray], capacity: int) -> None:
        buffers.tensors = self.bind(binding, arrays)
        buffers.arrays = dict(arrays) if self.device == "cpu" else {}  # GPU: the device copies are the buffers
        buffers.capacity = capacity

    def bind(self, binding, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Bind each layer's buffer as its past and present (the op writes the new positions in place);
        returns the OrtValues. On the CPU an OrtValue wraps the numpy array's memory (no copy)."""
        import onnxruntime as ort

        tensors = {}
        for past, present in self.layer_names:
            buffer = ort.OrtValue.ortvalue_from_numpy(arrays[past], self.device, 0)
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
            tensors[past] = buffer
        return tensors

    def forward(self, token_ids: Sequence[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        if cache.binding is None:
            raise EdgeGPTError(FOREIGN_CACHE)
        ids = check_ids(token_ids, cache, self.package.model.vocab_size, self.max_length)
        total = cache.length + ids.shape[1]
        binding, step = cache.binding, cache.step
        if total > step.capacity:
            # GroupQueryAttention sizes `present` as max(past capacity, total): it must fit the bound buffer.
            self._grow(step, binding, grown_capacity(step.capacity, total, self.max_length), cache.length)
        if ids.shape[1] == 1:
            if not step.bound:
                for name, value in step.values.items():
                    (binding.bind_ortvalue_output if name == "logits" else binding.bind_ortvalue_input)(name, value)
                step.bound = True
            step.input_ids[0, 0] = ids[0, 0]
            step.seqlens_k[0] = total - 1
            step.total_sequence_length[...] = total
            if self.device != "cpu":
                # A CPU value bound for a GPU consumer is copied to the device when it is bound, not when
                # the session runs, so writing the numpy array afterwards would feed every step the first
                # step's token and position (seen on an H200: greedy text turned to garbage after one
                # token). Re-bind the three small inputs each step; the cache stays bound in place.
                for name in ("input_ids", "seqlens_k", "total_sequence_length"):
                    binding.bind_ortvalue_input(name, step.values[name])
        else:
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            # Bound by device, not to a buffer: the logits' shape follows the number of new tokens.
            binding.bind_output("logits", "cpu")
            step.bound = False
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            if not from_onnxruntime(e):
                raise
            raise run_failed(self.package, e) from None
        # Only the logits are read back; the cache outputs are the bound buffers themselves. A step's
        # logits are copied out of the step buffer, which the next step overwrites.
        logits = step.logits.copy() if ids.shape[1] == 1 else binding.get_outputs()[0].numpy()
        return logits[0], KVCache(step.tensors, total, binding, step)


RUNNERS = {"concat": ConcatRunner, "static": StaticRunner}
# Where each cache dtype runs: onnxruntime quantizes the int8 cache on the CPU only, and a float16 cache is
# for CUDA (on the CPU its GroupQueryAttention is several times slower than float32: ONNX-NOTES.md).
CACHE_PROVIDERS = {"float32": ("cpu", "cuda"), "float16": ("cuda",), "int8": ("cpu",)}
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def check_cache_runs(session, package: ModelPackage, provider: str, past_name: str) -> None:
    """Raise unless `provider` runs the package's cache dtype and model.onnx's cache is of that dtype
    (buffers of another type would be refused by onnxruntime only at the first step, cryptically)."""
    dtype = package.graph.dtype
    if provider not in CACHE_PROVIDERS[dtype]:
        fix = ("load it with provider 'cuda', or export a CPU package (without --precision fp16)"
               if dtype == "float16" else "load it with provider 'cpu'; for CUDA export with --precision fp16")
        raise EdgeGPTError(
            f"{package.path} keeps its KV cache in {dtype}, which provider {provider!r} cannot run; {fix}"
        )
    declared = next((i.type for i in session.get_inputs() if i.name == past_name), None)
    if declared is not None and declared != ORT_TYPES[dtype]:
        raise EdgeGPTError(
            f"{package.model_path} takes a {declared} cache but config.json says {dtype}; "
            "the package mixes files from different exports, re-run `edgegpt export`"
        )
def check_contract(session, runner: ConcatRunner | StaticRunner) -> None:
    """model.onnx must take exactly the inputs config.json declares, and give the outputs the runner reads."""
    graph_inputs = {i.name for i in session.get_inputs()}
    graph_outputs = {o.name for o in session.get_outputs()}
    expected_inputs = set(runner.input_names)
    problems = [f"input {n!r} missing" for n in sorted(expected_inputs - graph_inputs)]
    problems += [f"unexpected input {n!r}" for n in sorted(graph_inputs - expected_inputs)]
    problems += [f"output {n!r} missing" for n in runner.output_names if n not in graph_outputs]
    if problems:
        raise EdgeGPTError(
            f"{runner.package.model_path} does not match config.json ({'; '.join(problems[:3])}); "
            "the package is corrupt, re-run `edgegpt export`"
        )


FOREIGN_CACHE = "this KVCache comes from a package with another cache layout; start from this Generator's empty_cache()"


def check_ids(token_ids: Sequence[int], cache: KVCache, vocab_size: int, max_length: int) -> np.ndarray:
    """token_ids as int64 [1, S], checked: 1 <= S, ids in the vocabulary, cache.length + S <= max_length."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise EdgeGPTError(f"token ids must be a non-empty sequence of integers, got {token_ids!r:.80}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise EdgeGPTError(f"token ids must be in [0, {vocab_size}), got one of {int(ids.min())}..{int(ids.max())}")
    if cache.length + ids.size > max_length:
        raise EdgeGPTError(
            f"{cache.length} cached + {ids.size} new tokens exceed the context of {max_length} tokens (max_length)"
        )
    return ids.astype(np.int64, copy=False)[None, :]


def from_onnxruntime(error: Exception) -> bool:
    """onnxruntime's own errors; run_with_iobinding re-raises them as a plain RuntimeError."""
    return type(error).__module__.startswith("onnxruntime") or type(error) is RuntimeError


def run_failed(package: ModelPackage, error: Exception) -> EdgeGPTError:
    return EdgeGPTError(
        f"{package.model_path} failed to run ({ort_error_detail(error)}); "
        "the package is inconsistent, re-run `edgegpt export`"
    )
