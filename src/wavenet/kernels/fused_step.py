"""Autoregressive WaveNet generation in one kernel launch: every layer, and many samples, per launch.

In the spirit of nv-wavenet's persistent kernels (NVIDIA, 2018): `IncrementalWaveNet.step` launches a
dozen kernels per layer and sample, each doing microseconds of work behind microseconds of launch
overhead, and reads the sample back to the host to feed it in again. Here one Triton program owns a block
of streams and runs the whole step (embedding, every layer, skips, head, Gumbel-max sampling) for
`steps` consecutive samples, feeding each drawn sample to the next step on the device. Programs never
wait for each other: streams are independent.

Exact: in float32 the logits equal the eager step's up to summation order (~1e-6 relative); the matmuls
run in IEEE fp32, not tf32. bfloat16 weights are multiplied in bfloat16 with float32 accumulation.

The kernel reads and writes the stepper's own ring buffers and advances its `position`, so
`IncrementalWaveNet.step` and `fused_steps` can take turns on the same streams.

CUDA tensors run the compiled kernel. CPU tensors run through Triton's interpreter (numpy; slow, for
tests), only when asked: `interpret=True`, or TRITON_INTERPRET=1 in the environment.

What bounds it on a GPU (estimates for an H100, to be measured): every program streams all the weights
from L2 once per step, whatever its number of streams: conf/model/small.yaml ~0.62 M weights (2.5 MB in
float32, 1.2 MB in bfloat16), medium ~4.0 M (16 MB, 8 MB); both stay in the 50 MB L2. At the 100-200 GB/s
one SM draws from L2, a step costs at least 12-25 us (small, float32), 6-12 us (small, bfloat16),
80-160 us and 40-80 us (medium); on top, each layer's chain of dependent work (tap and weight loads,
matmuls, the ring write behind a barrier) waits about one L2 round trip per tile of gated channels.
Rings add L (K - 1) R reads and L R writes per stream and step, little beside the weights. More streams
per program cost almost nothing until the matmuls catch up: float32 runs on FMA units (`block_b` = 16 is
~20 MFLOP a step at small, ~40 us on one SM), bfloat16 on tensor cores. A batch of B runs on
ceil(B / block_b) SMs: one at B = 1, 16 of 132 at B = 256 with block_b = 16 (a smaller block_b uses more
SMs but multiplies the L2 traffic). conf/model/large.yaml (47.5 M weights) does not fit in L2: every
program would stream it from HBM every step, so this kernel is the wrong tool there (it runs, slowly);
that takes the weights split across SMs, as nv-wavenet's multi-block variant does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import weakref
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from wavenet.generation import IncrementalWaveNet
from wavenet.kernels import check_step_arguments

_MIN_WIDTH = 16  # tl.dot needs K >= 16; channel counts are padded to it
_KERNEL_MODULE = "wavenet.kernels._fused_step_kernel"
_INTERPRETED_MODULE = "wavenet.kernels._fused_step_kernel_interpreted"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def fused_available(device: torch.device | str, interpret: bool | None = None) -> bool:
    """Whether `fused_steps` can run for a stepper on `device`.

    Args:
        device: The stepper's device.
        interpret: Run through Triton's interpreter (CPU). None: when TRITON_INTERPRET=1 is set.
    """
    if not _triton_importable():
        return False
    device = torch.device(device)
    if interpret is None:
        interpret = _interpreter_requested()
    return device.type == "cpu" if interpret else device.type == "cuda"


def _kernel_module(interpret: bool) -> ModuleType:
    """The module holding the kernel: compiled, or interpreted (imported with TRITON_INTERPRET=1 set only
    while its `@triton.jit` decorators run, so nothing else in the process is switched to the interpreter)."""
    if not interpret:
        return importlib.import_module(_KERNEL_MODULE)
    module = sys.modules.get(_INTERPRETED_MODULE)
    if module is None:
        # triton itself first, without the variable: imported under it, triton.language's own @jit functions
        # (tl.max, ...) would be interpreted for the whole process.
        importlib.import_module("triton.language")
        spec = importlib.util.find_spec(_KERNEL_MODULE)
        assert spec is not None and spec.origin is not None
        spec = importlib.util.spec_from_file_location(_INTERPRETED_MODULE, spec.origin)
        module = importlib.util.module_from_spec(spec)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            spec.loader.exec_module(module)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        sys.modules[_INTERPRETED_MODULE] = module
        _skip_overflow_checks_that_do_nothing()
    return module


def _skip_overflow_checks_that_do_nothing() -> None:
    """Stops Triton's interpreter from computing, for every 32-bit integer add and multiply, an overflow check
    whose `device_assert` does nothing without `debug` (never set in the interpreter; compiled, the check is
    not even emitted). The kernel's index arithmetic is most of its operations: its CPU tests take half the time.
    """
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    if getattr(options, "sanitize_overflow", False) and not options.debug:
        interpreter.interpreter_builder.options = replace(options, sanitize_overflow=False)


def _padded(width: int) -> int:
    """The power of two >= max(width, 16) that a channel count is padded to."""
    return max(_MIN_WIDTH, 1 << (width - 1).bit_length())


@dataclass(frozen=True)
class FusedWeights:
    """A stepper's weights in the kernel's layout, built once per stepper (see `from_stepper`).

    Channel counts are padded with zeros to powers of two >= 16 (`tl.arange` and `tl.dot` need them), so
    the kernel loads weights without masks; padded channels stay exactly zero through every layer. Matmuls
    are `(streams, in) @ (in, out)` with `out` contiguous. Biases are float32 (they seed the accumulators).
    """

    layers: int
    kernel_size: int
    residual: int  # R, D, S, Q and their padded widths
    dilation: int
    skip: int
    classes: int
    residual_padded: int
    dilation_padded: int
    skip_padded: int
    classes_padded: int
    period: int
    embedding: Tensor  # (Q, R): the stepper's own
    tap_columns: Tensor  # (period, L (K-1)) int32
    write_columns: Tensor  # (period, L) int32
    filter_gate: Tensor  # (L, K, R_P, 2 D_P): past taps in tap_columns' order, then the current one; filter | gate
    filter_gate_bias: Tensor  # (L, 2 D_P) float32, every bias of the layer folded in by the stepper
    residual_weight: Tensor  # (L, D_P, R_P), zeros for the last layer (which has no residual output)
    skip_weight: Tensor  # (L D_P, S_P): layer l's channel j in row l D_P + j
    skip_bias: Tensor  # (S_P,) float32
    head_weight: Tensor  # (S_P, S_P)
    head_bias: Tensor  # (S_P,) float32
    output_weight: Tensor  # (S_P, Q_P)
    output_bias: Tensor  # (Q_P,) float32

    @classmethod
    def from_stepper(cls, stepper: IncrementalWaveNet) -> FusedWeights:
        """Rearranges the stepper's (already rewritten: gate halved, biases folded) weights; a few copies."""
        if len(stepper.head_weights) != 2:
            raise ValueError(f"the fused kernel runs a head of 2 convolutions, got {len(stepper.head_weights)}")
        dtype, device = stepper.rings.dtype, stepper.rings.device
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the fused kernel runs float32 or bfloat16 weights, got {dtype}")
        layers = len(stepper.layers)
        taps = stepper.past_weight.shape[1] // stepper.embedding.shape[1]
        classes, residual = stepper.embedding.shape
        dilation = stepper.past_weight.shape[2] // 2
        skip = stepper.skip_weight.shape[1]
        r_p, d_p, s_p, q_p = (_padded(width) for width in (residual, dilation, skip, classes))

        def zeros(*shape: int, float32: bool = False) -> Tensor:
            return torch.zeros(shape, device=device, dtype=torch.float32 if float32 else dtype)

        filter_gate = zeros(layers, taps + 1, r_p, 2, d_p)
        past = stepper.past_weight.view(layers, taps, residual, 2, dilation)
        filter_gate[:, :taps, :residual, :, :dilation] = past
        current = torch.stack([layer.current_weight for layer in stepper.layers])  # (L, R, 2D)
        filter_gate[:, taps, :residual, :, :dilation] = current.view(layers, residual, 2, dilation)
        filter_gate_bias = zeros(layers, 2, d_p, float32=True)
        filter_gate_bias[:, :, :dilation] = stepper.past_bias.view(layers, 2, dilation)
        residual_weight = zeros(layers, d_p, r_p)  # the last layer has none: zeros
        for index, layer in enumerate(stepper.layers[:-1]):
            residual_weight[index, :dilation, :residual] = layer.residual_weight
        skip_weight = zeros(layers, d_p, s_p)
        skip_weight[:, :dilation, :skip] = stepper.skip_weight.view(layers, dilation, skip)
        skip_bias = zeros(s_p, float32=True)
        skip_bias[:skip] = stepper.skip_bias
        head_weight = zeros(s_p, s_p)
        head_weight[:skip, :skip] = stepper.head_weights[0]
        head_bias = zeros(s_p, float32=True)
        head_bias[:skip] = stepper.head_biases[0]
        output_weight = zeros(s_p, q_p)
        output_weight[:skip, :classes] = stepper.head_weights[1]
        output_bias = zeros(q_p, float32=True)
        output_bias[:classes] = stepper.head_biases[1]
        return cls(
            layers=layers,
            kernel_size=taps + 1,
            residual=residual,
            dilation=dilation,
            skip=skip,
            classes=classes,
            residual_padded=r_p,
            dilation_padded=d_p,
            skip_padded=s_p,
            classes_padded=q_p,
            period=stepper.period,
            embedding=stepper.embedding.contiguous(),
            tap_columns=stepper.tap_columns.to(torch.int32).contiguous(),
            write_columns=stepper.write_columns.to(torch.int32).contiguous(),
            filter_gate=filter_gate.view(layers, taps + 1, r_p, 2 * d_p),
            filter_gate_bias=filter_gate_bias.view(layers, 2 * d_p),
            residual_weight=residual_weight,
            skip_weight=skip_weight.view(layers * d_p, s_p),
            skip_bias=skip_bias,
            head_weight=head_weight,
            head_bias=head_bias,
            output_weight=output_weight,
            output_bias=output_bias,
        )


# One FusedWeights per stepper, dropped with it. A stepper copies its model's weights when it is built and
# never changes them, so the cache cannot go stale.
_weights: weakref.WeakKeyDictionary[IncrementalWaveNet, FusedWeights] = weakref.WeakKeyDictionary()


def fused_weights(stepper: IncrementalWaveNet) -> FusedWeights:
    """The stepper's `FusedWeights`, built on first use."""
    weights = _weights.get(stepper)
    if weights is None:
        weights = _weights[stepper] = FusedWeights.from_stepper(stepper)
    return weights


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is tiled and launched; `default_config` picks one. Sizes are powers of two.

    Attributes:
        block_b: Streams per program, the M of every tl.dot (any power of two: tensor cores pad M to 16 in
            hardware, while the fp32 FMA path does only the rows it has). Programs = ceil(B / block_b).
        block_d: Gated channels per tile (>= 16): the filter/gate weight tiles, 2 (R_P, block_d), and the
            residual and skip ones, (block_d, R_P) and (block_d, S_P), are what grows with it.
        block_s: Hidden channels of the head per tile (>= 16): weight tiles (S_P, block_s), (block_s, Q_P).
        num_warps: Warps per program (compiled kernel only).
        num_stages: Software-pipelining depth Triton gives the tile loops (compiled kernel only).
        precision: tl.dot's input_precision for float32 weights: "ieee" is exact; "tf32x3" (tensor cores,
            near-fp32) and "tf32" (not exact) are there to be measured. bfloat16 ignores it.
    """

    block_b: int = 16
    block_d: int = 32
    block_s: int = 16
    num_warps: int = 8
    num_stages: int = 2
    precision: str = "ieee"


def default_config(weights: FusedWeights, batch_size: int) -> LaunchConfig:
    """A starting point chosen by compiling every model size for sm_90 and reading ptxas's register, spill and
    shared memory counts (the largest tiles that neither spill nor outgrow shared memory), not yet by timing.

    float32 dots run on FMA units, where Triton holds each thread's whole K extent of both operands in
    registers, so float32 takes smaller weight tiles than bfloat16 (mma). At widths of 512, float32
    operands staged through shared memory outgrow its 227 KB beyond 4 streams per program.
    """
    float32 = weights.filter_gate.dtype == torch.float32
    residual, widest = weights.residual_padded, max(weights.residual_padded, weights.skip_padded)
    if float32:
        block_d = 32 if residual <= 128 else 16
    else:
        block_d = 4096 // residual  # elements of one (R_P, block_d) weight tile
    most_streams = 4 if float32 and widest >= 512 else 16
    return LaunchConfig(
        block_b=min(most_streams, 1 << (batch_size - 1).bit_length()),
        block_d=max(_MIN_WIDTH, min(weights.dilation_padded, block_d)),
        block_s=_MIN_WIDTH,
        num_warps=8,
    )


def fused_steps(
    stepper: IncrementalWaveNet,
    classes: Tensor,
    out: Tensor,
    noise: Tensor | None = None,
    forced: Tensor | None = None,
    logits_out: Tensor | None = None,
    *,
    config: LaunchConfig | None = None,
    interpret: bool | None = None,
) -> None:
    """Runs `steps = out.shape[0]` calls of `stepper.step` for all streams in one kernel launch.

    Updates `stepper.rings` in place and advances `stepper.position` (and its device-side `phase`, if it
    has one) by `steps`, exactly as the calls would. Step 0 consumes `classes`; step i > 0 the sample
    step i - 1 drew (`out[i - 1]`), or `forced[i]` when given. Classes are not range-checked on the
    device: out-of-range ones read garbage.

    Args:
        stepper: Its streams' state, after `reset`.
        classes: (B,) int64, the input of step 0 (ignored when `forced` is given).
        out: (steps, B) int64, contiguous: receives argmax(logits + noise[i]) of every step.
        noise: (steps, B, Q) float32 Gumbel noise already scaled by the temperature; None is greedy.
        forced: (steps, B) int64: teacher forcing, the input of every step.
        logits_out: (steps, B, Q) float32: receives every step's logits (for tests; costs a write per step).
        config: Tiling and launch parameters; None: `default_config`.
        interpret: Run through Triton's interpreter, on CPU tensors. None: when TRITON_INTERPRET=1 is set.

    Raises:
        RuntimeError: Where the kernel cannot run: no triton, or a CPU stepper without the interpreter.
        ValueError: Tensors of the wrong shape, dtype or device.
    """
    device = stepper.device
    if interpret is None:
        interpret = _interpreter_requested()
    if not _triton_importable():
        raise RuntimeError("fused generation needs triton (pip install triton)")
    if not fused_available(device, interpret):
        where = "runs on CPU tensors only" if interpret else "needs a CUDA device"
        raise RuntimeError(
            f"fused generation {where} (the stepper is on {device}); on CPU, the Triton interpreter runs it "
            "with interpret=True or TRITON_INTERPRET=1"
        )
    weights = fused_weights(stepper)
    batch = stepper.batch_size
    steps = check_step_arguments(device, batch, weights.classes, classes, out, noise, forced, logits_out)
    rings = stepper.rings
    assert rings.is_contiguous(), "the stepper's rings are one contiguous (B, columns, R) tensor"
    if steps == 0:
        return

    config = config or default_config(weights, batch)
    sizes = (config.block_b, config.block_d, config.block_s)
    if any(size < 1 or size & (size - 1) for size in sizes) or min(config.block_d, config.block_s) < _MIN_WIDTH:
        raise ValueError(f"block sizes must be powers of two, block_d and block_s >= {_MIN_WIDTH}: {config}")
    unused_float = out.new_empty(1, dtype=torch.float32)  # a pointer the variant does not read
    # A stepper built with `device_counter` keeps the truth about its phase on the device (CUDA graph
    # replays advance it, not `position`): the kernel reads it there, and it is advanced here as `step` does.
    phase = stepper.phase
    kernel = _kernel_module(interpret).fused_steps_kernel
    launch = {} if interpret else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    # Triton launches on the current CUDA device: make it the stepper's.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(-(-batch // config.block_b),)](
            rings,
            rings.stride(0),
            weights.tap_columns,
            weights.write_columns,
            weights.embedding,
            weights.filter_gate,
            weights.filter_gate_bias,
            weights.residual_weight,
            weights.skip_weight,
            weights.skip_bias,
            weights.head_weight,
            weights.head_bias,
            weights.output_weight,
            weights.output_bias,
            classes,
            forced if forced is not None else out,
            noise if noise is not None else unused_float,
            out,
            logits_out if logits_out is not None else unused_float,
            phase if phase is not None else out,
            batch,
            steps,
            stepper.position % weights.period,
            weights.period,
            LAYERS=weights.layers,
            KERNEL_SIZE=weights.kernel_size,
            R=weights.residual,
            Q=weights.classes,
            R_P=weights.residual_padded,
            D_P=weights.dilation_padded,
            S_P=weights.skip_padded,
            Q_P=weights.classes_padded,
            BLOCK_B=config.block_b,
            BLOCK_D=min(config.block_d, weights.dilation_padded),
            BLOCK_S=min(config.block_s, weights.skip_padded),
            DEVICE_PHASE=phase is not None,
            FORCED=forced is not None,
            HAS_NOISE=noise is not None,
            STORE_LOGITS=logits_out is not None,
            # The interpreter multiplies with numpy, which has no bfloat16: it upcasts (exact products either way).
            DOT_DTYPE=_triton_dtype(torch.float32 if interpret else rings.dtype),
            DOT_PRECISION=config.precision,
            **launch,
        )
    stepper.position += steps
    if phase is not None:
        phase.add_(steps).remainder_(weights.period)  # after the kernel, in stream order


def _triton_dtype(dtype: torch.dtype):  # -> triton.language.dtype
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}[dtype]
