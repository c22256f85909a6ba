"""Autoregressive WaveNet generation on the CPU in native code: every layer of a chunk of steps per call.

At batch 1 the eager step (`IncrementalWaveNet.step`) spends its time dispatching ~170 tiny tensor calls per
sample, not multiplying. `cpu_step.cpp` runs the same arithmetic on the stepper's own buffers as plain loops:
matrix-vector products over groups of up to 8 streams (each weight vector loaded once per group, from
matrices laid out in blocks of columns in the order the products read them), a vectorising tanh, Gumbel-max
sampling, for all steps of a chunk. Threads (torch's intra-op count, started per call) either split every
layer's gated channels (up to 8 streams), so that each core keeps its share of the weights in its own L2 (one
barrier per layer), or take ranges of streams that never wait for each other. Which is faster depends on the
model, the batch and the caches, and beside other busy processes one thread can be: calls are timed and take
the fastest plan (`_ThreadChoice`). ctypes releases the GIL for the call.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`;
no torch headers, but a kernel instantiated for every group size: 15 s on 2 cores of an AMD EPYC) for this
machine's CPU (`-march=native`), and cached under `$WAVENET_CACHE_DIR` (default `~/.cache/wavenet`) by a hash
of the source, the compiler and the CPU, so that a home directory shared across different machines never loads
one's build on another. Processes that need it at once (a job array of `generate.py` runs) build it once: the
others wait for that build. Without a compiler, `cpu_kernel_available()` is False and generation stays eager.

The stepper is float32, and so is all arithmetic: the logits equal the eager step's up to float summation order
and the tanh approximation (~1e-6 relative). The weight matrices can be stored in bfloat16 instead
(`bf16_weights`), which halves the bytes a step reads: `small`'s whole network then fits one core's L2, at the
price of weights rounded to bfloat16 (exactly the same steps for a model whose weights are bfloat16 already).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows: processes that start together each build it
    fcntl = None

import torch
from torch import Tensor

from wavenet.generation import IncrementalWaveNet
from wavenet.kernels import check_step_arguments

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_step.cpp")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=fast")


class _Net(ctypes.Structure):
    """`struct Net` of cpu_step.cpp, field for field."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "taps", "residual", "dilation", "skip", "hidden", "classes")),
        ("period", ctypes.c_int64),
        ("bf16_weights", ctypes.c_int64),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "tap_columns",
                "write_columns",
                "embedding",
                "filter_gate",
                "filter_gate_bias",
                "residual_weight",
                "skip_weight",
                "skip_bias",
                "head_weight",
                "head_bias",
                "output_weight",
                "output_bias",
            )
        ),
    ]


def _compiler() -> str | None:
    requested = os.environ.get("CXX")
    if requested and not shutil.which(requested):
        log.warning("CXX=%s: no such program (no such file, nor on PATH); trying c++, g++, clang++", requested)
    for name in (requested, "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags where the OS tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    if os.environ.get("WAVENET_CACHE_DIR"):
        return Path(os.environ["WAVENET_CACHE_DIR"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wavenet" / "kernels"


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Held while a process builds into `folder`, so that processes that start together build once."""
    with open(folder / ".build.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes, or the process dies
        yield


def _build(compiler: str, path: Path) -> str | None:
    """Compiles the library to `path`; or the reason it could not."""
    log.info("Building the CPU generation kernel for this machine (once; it takes seconds): %s", path)
    # Built beside its final name and renamed into place: a process that dies mid-build never leaves a partial
    # library under that name.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            return f"{compiler} could not build {_SOURCE.name}: {result.stderr.strip()[-2000:]}"
        os.replace(built, path)
    return None


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernel, built once per machine; or, where it cannot be built, the reason why."""
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found ($CXX, c++, g++ or clang++)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return f"{compiler} --version failed: {error}"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(), _cpu_signature().encode()]))
    path = _cache_dir() / f"cpu_step-{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _build_lock(path.parent):
                if not path.exists():  # or another process built it while this one waited
                    problem = _build(compiler, path)
                    if problem:
                        return problem
        except OSError as error:
            return f"could not write the CPU kernel to {path.parent}: {error}"
    library = ctypes.CDLL(str(path))
    function = library.wavenet_cpu_steps
    function.argtypes = [ctypes.POINTER(_Net), ctypes.c_void_p, *[ctypes.c_int64] * 6, *[ctypes.c_void_p] * 5]
    function.restype = None
    library.wavenet_cpu_block.argtypes = []
    library.wavenet_cpu_block.restype = ctypes.c_int64
    return library


def cpu_kernel_available() -> bool:
    """Whether the CPU kernel is built (building it on the first call, if a compiler is there)."""
    return not isinstance(_library(), str)


def cpu_kernel_problem() -> str | None:
    """Why the CPU kernel cannot run here, or None when it can."""
    library = _library()
    return library if isinstance(library, str) else None


class _Weights:
    """A stepper's weights in the kernel's layout (a few copies, made once per stepper), the `Net` that
    points at them (the tensors live as long as this object does), and its calls' `_ThreadChoice`.
    With `bf16_weights` the weight matrices are stored rounded to bfloat16; biases and the embedding are not."""

    def __init__(self, library: ctypes.CDLL, stepper: IncrementalWaveNet, bf16_weights: bool = False) -> None:
        if stepper.rings.dtype != torch.float32:
            raise ValueError(
                f"the CPU kernel runs a float32 stepper (bfloat16 weights with bf16_weights), got {stepper.rings.dtype}"
            )
        if len(stepper.head_weights) != 2:
            raise ValueError(f"the CPU kernel runs a head of 2 convolutions, got {len(stepper.head_weights)}")
        layers = len(stepper.layers)
        classes, residual = stepper.embedding.shape
        taps = stepper.past_weight.shape[1] // residual
        current = torch.stack([layer.current_weight for layer in stepper.layers])  # (L, R, 2D)
        dilation = current.shape[2] // 2
        self.bf16_weights = bf16_weights
        matrix_dtype = torch.bfloat16 if bf16_weights else torch.float32
        block = library.wavenet_cpu_block()

        def matrix(weight: Tensor) -> Tensor:
            """(..., in, out) as the kernel's blocked matrices (..., blocks, in, block), zero-padded to whole blocks."""
            padded = torch.nn.functional.pad(weight, (0, -weight.shape[-1] % block))
            return padded.unflatten(-1, (-1, block)).transpose(-3, -2).to(matrix_dtype).contiguous()

        filter_gate = torch.cat([stepper.past_weight, current], dim=1)  # (L, (taps + 1) R, 2D)
        self.tensors = {
            "tap_columns": stepper.tap_columns.contiguous(),
            "write_columns": stepper.write_columns.contiguous(),
            "embedding": stepper.embedding.contiguous(),
            "filter_gate": matrix(filter_gate.unflatten(2, (2, dilation)).transpose(1, 2)),  # filter, gate apart
            "filter_gate_bias": stepper.past_bias.reshape(layers, -1).contiguous(),
            "residual_weight": matrix(torch.stack([layer.residual_weight for layer in stepper.layers[:-1]]))
            if layers > 1
            else stepper.embedding.new_zeros(1, dtype=matrix_dtype),
            "skip_weight": matrix(stepper.skip_weight),
            "skip_bias": stepper.skip_bias.contiguous(),
            "head_weight": matrix(stepper.head_weights[0]),
            "head_bias": stepper.head_biases[0].contiguous(),
            "output_weight": matrix(stepper.head_weights[1]),
            "output_bias": stepper.head_biases[1].contiguous(),
        }
        self.net = _Net(
            layers=layers,
            taps=taps,
            residual=residual,
            dilation=dilation,
            skip=stepper.skip_weight.shape[1],
            hidden=stepper.head_weights[0].shape[1],
            classes=classes,
            period=stepper.period,
            bf16_weights=int(bf16_weights),
            **{name: tensor.data_ptr() for name, tensor in self.tensors.items()},
        )
        self.thread_choice = _ThreadChoice(torch.get_num_threads(), stepper.batch_size)


_weights: weakref.WeakKeyDictionary[IncrementalWaveNet, _Weights] = weakref.WeakKeyDictionary()

# One call in this many runs on a plan not in use, to notice that the load on the machine changed.
_RETRY_EVERY = 32
# Weight of the latest call in the time per step of the plan in use.
_SMOOTHING = 0.25
# Streams the kernel runs as one group (kMaxGroup in cpu_step.cpp): up to this many, threads can split channels.
_GROUP = 8


class Plan(NamedTuple):
    """How a call uses threads: how many, and whether they split every layer's channels (up to `_GROUP`
    streams) or each take a range of streams."""

    threads: int
    split: bool


class _ThreadChoice:
    """How the calls for one stepper use threads, when the caller leaves it to the kernel.

    On cores of its own the kernel is fastest on all of them; beside another busy process it is not: a core
    taken away stalls every layer's barrier. Beside one busy process on 2 cores, `small` at batch 1 ran at
    2,500 samples/s on 2 threads and 11,800 on 1 (23,700 on 2 when alone). And for 2 to 8 streams, whether
    threads should split channels (each core reads its share of the weights) or streams (no barriers) depends
    on the cache sizes: on the 2-core CI machine, `small` at batch 8 ran at 83,000 samples/s split and 104,000
    on ranges, but 6,400 split against 5,300 on ranges for `medium` at batch 2. So calls are timed: the first
    ones try each candidate plan twice, later ones take the fastest, and one call in `_RETRY_EVERY` tries
    another again, in turn.
    """

    def __init__(self, most: int, batch: int) -> None:
        if most == 1:
            self.candidates = [Plan(1, False)]
        elif batch == 1:  # a range of one stream is one thread
            self.candidates = [Plan(most, True), Plan(1, False)]
        elif batch <= _GROUP:
            self.candidates = [Plan(most, True), Plan(most, False), Plan(1, False)]
        else:
            self.candidates = [Plan(most, False), Plan(1, False)]
        self.seconds_per_step: dict[Plan, float] = {}
        self.calls = 0
        self.last: Plan | None = None

    def pick(self) -> Plan:
        self.calls += 1
        # Each plan twice, in turn, before any choice: a first call is slow (threads, caches, pages).
        if self.calls <= 2 * len(self.candidates):
            return self.candidates[(self.calls - 1) % len(self.candidates)]
        ranked = sorted(self.candidates, key=self.seconds_per_step.__getitem__)
        others = ranked[1:]
        if others and self.calls % _RETRY_EVERY == 0:
            return others[self.calls // _RETRY_EVERY % len(others)]
        return ranked[0]

    def record(self, plan: Plan, seconds: float, steps: int) -> None:
        measured = seconds / steps
        previous = self.seconds_per_step.get(plan)
        if previous is None or plan != self.last:
            # A plan taken up again: what it measured calls ago may no longer hold.
            self.seconds_per_step[plan] = measured
        else:
            # A plan in use: smoothed, or one call slowed by an interrupt would switch plans for a while.
            self.seconds_per_step[plan] = previous + _SMOOTHING * (measured - previous)
        self.last = plan


def cpu_steps(
    stepper: IncrementalWaveNet,
    classes: Tensor,
    out: Tensor,
    noise: Tensor | None = None,
    forced: Tensor | None = None,
    logits_out: Tensor | None = None,
    threads: int | None = None,
    bf16_weights: bool = False,
    split: bool = True,
) -> None:
    """Runs `steps = out.shape[0]` calls of `stepper.step` for all streams, as `fused_steps` does on a GPU.

    Updates `stepper.rings` in place and advances `stepper.position` (and its `phase`, if it has one) by
    `steps`. Step 0 consumes `classes`; step i > 0 the sample step i - 1 drew, or `forced[i]` when given.
    Classes are not range-checked: out-of-range ones read outside the embedding.

    Args:
        stepper: Its streams' state, on the CPU in float32, after `reset`.
        classes: (B,) int64, the input of step 0.
        out: (steps, B) int64, contiguous: receives argmax(logits + noise[i]) of every step.
        noise: (steps, B, Q) float32 Gumbel noise already scaled by the temperature; None is greedy.
        forced: (steps, B) int64: teacher forcing, the input of every step.
        logits_out: (steps, B, Q) float32: receives every step's logits (for tests).
        threads: Threads to run on; None: torch.get_num_threads() or 1, and for up to 8 streams split or
            not, whichever the calls for this stepper have found fastest (see `_ThreadChoice`).
        bf16_weights: Store the weight matrices in bfloat16 (rounded once, on the stepper's first call with
            it): half the bytes per step. The stepper and all arithmetic stay float32.
        split: With `threads` given and up to 8 streams, whether the threads split every layer's channels
            (else each runs a range of the streams).

    Raises:
        RuntimeError: Where the kernel cannot be built (see `cpu_kernel_problem`).
        ValueError: Tensors of the wrong shape, dtype or device.
    """
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"the CPU generation kernel is not available: {library}")
    device = torch.device("cpu")
    if stepper.device != device:
        raise ValueError(f"the CPU kernel runs a stepper on the CPU, this one is on {stepper.device}")
    weights = _weights.get(stepper)
    if weights is None or weights.bf16_weights != bf16_weights:
        weights = _weights[stepper] = _Weights(library, stepper, bf16_weights)
    batch = stepper.batch_size
    steps = check_step_arguments(device, batch, weights.net.classes, classes, out, noise, forced, logits_out)
    rings = stepper.rings
    assert rings.is_contiguous(), "the stepper's rings are one contiguous (B, columns, R) tensor"
    if steps == 0:
        return
    phase = int(stepper.phase) if stepper.phase is not None else stepper.position % stepper.period

    choice = None
    plan = Plan(threads, split) if threads is not None else None
    if plan is None:
        choice = weights.thread_choice
        plan = choice.pick()
    started = time.perf_counter()
    library.wavenet_cpu_steps(
        ctypes.byref(weights.net),
        rings.data_ptr(),
        rings.stride(0),
        batch,
        steps,
        phase,
        plan.threads,
        plan.split,
        classes.data_ptr(),
        forced.data_ptr() if forced is not None else None,
        noise.data_ptr() if noise is not None else None,
        out.data_ptr(),
        logits_out.data_ptr() if logits_out is not None else None,
    )
    if choice is not None:
        choice.record(plan, time.perf_counter() - started, steps)
    stepper.position += steps
    if stepper.phase is not None:
        stepper.phase.add_(steps).remainder_(stepper.period)
