"""Fast autoregressive generation (Fast WaveNet, Paine et al. 2016): O(layers) work per sample.

A full forward pass spends `receptive_field` steps of work on every new sample. Generating one sample at a
time only needs, for each layer, the inputs it saw `dilation`, `2 * dilation`, ... steps ago: each layer
keeps its last `dilation * (kernel_size - 1)` inputs in a ring buffer, written in place, never shifted.

A step is a fixed sequence of `out=` / in-place ops on preallocated buffers with pre-transposed weights:
nothing is allocated per step and every buffer keeps its address. Ring positions are picked in Python, by
`t % length`, or, for CUDA graphs, looked up on the device from a step counter that the step advances
itself, so that a captured step replays correctly at every time.

Paths (`generate(method=...)`): `eager` runs the step op by op (CPU, or CUDA for comparison);
`cuda_graph` replays chunks of steps captured with their sampling, one launch per chunk; `fused` runs
the whole layer stack for many steps in one kernel: Triton on a GPU (`wavenet.kernels.fused_step`), native
code built on first use on the CPU (`wavenet.kernels.cpu_step`). A bfloat16 model runs in bfloat16 on every
path but the CPU's kernel, which reads its weights in bfloat16 and computes in float32.

Pure PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wavenet.models.wavenet import WaveNet
from wavenet.temperature import check_temperature

log = logging.getLogger(__name__)

# Steps between progress reports and draws of Gumbel noise: at most this many, and at most as many as keep
# one draw under _NOISE_ELEMENTS (step, stream, class) values, to bound its memory at large batch. Every
# path draws the noise in the same chunks, so that a seed gives the same noise whatever the path.
# A CUDA graph holds one chunk of steps: 64 keeps capture short and the graph launch (~10 us) negligible.
_CHUNK_STEPS = 64
_NOISE_ELEMENTS = 1 << 22
# Activations per tensor when `reset` runs the network over a context: about 256 MB in float32.
_RESET_ELEMENTS = 1 << 26


class _Layer(NamedTuple):
    """What one layer's part of a step touches, looked up once so that a step is only tensor calls."""

    pre: Tensor  # (B, 2D) filter|gate pre-activation, past taps already added
    filter_: Tensor  # (B, D) view of `pre`
    gate: Tensor  # (B, D) view of `pre`
    current_weight: Tensor  # (R, 2D) the current tap
    gated: Tensor  # (B, D) this layer's slice of the skip matmul's input
    residual_weight: Tensor | None  # (D, R); None on the last layer


class IncrementalWaveNet:
    """A WaveNet's weights rearranged for one-sample-at-a-time inference, and the cached past of B streams.

    Rows are streams, so every matmul is `(B, in) @ (in, out)` with the weight pre-transposed. Three
    rewrites make a step cheaper without changing its output beyond float rounding:

    - Every layer's past taps are known when a step starts, so all of them are gathered from the ring
      buffers with one `index_select` and multiplied with one batched matmul. Only the current tap, which
      needs the layer below, is left to the sequential per-layer loop.
    - tanh(f) * sigmoid(g) = tanh(f) * (1 + tanh(g / 2)) / 2: the gate's weights are halved so that one
      tanh covers filter and gate, and the / 2 is folded into the residual and skip weights.
    - Residual biases add a constant to every later layer's input. The rings hold inputs minus that
      constant, and its product with the filter/gate weights is folded into their bias, so the residual
      update is one `addmm` that writes the next layer's input straight into its ring.

    Usage: `reset(context)` once, then `step(sample)` per sample, under `torch.inference_mode()`.

    Args:
        model: The network. Its parameters are copied here; later changes to them are not seen.
        batch_size: Number of independent streams B.
        device_counter: Keep the step counter on the device (`phase`), so that `step` has no input from
            Python that changes from one step to the next and can be captured in a CUDA graph. It costs
            four small ops per step, so it is off for eager stepping.
    """

    def __init__(self, model: WaveNet, batch_size: int, device_counter: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        # Time of the next input; only its value modulo each ring length matters. With `device_counter`,
        # `phase` (= position % period, on the device) is the truth and steps replayed from a graph do
        # not move `position`.
        self.position = 0
        layers = list(model.layers)
        embedding = model.embedding.weight.detach()
        device, dtype = embedding.device, embedding.dtype
        taps = model.kernel_size - 1  # past taps of each layer
        residual_channels = embedding.shape[1]
        dilation_channels = layers[0].filter_gate.out_channels // 2
        lengths = [layer.context for layer in layers]
        starts = [sum(lengths[:index]) for index in range(len(layers))]

        self.embedding = embedding
        current, past, biases, residuals, skips = [], [], [], [], []
        offset = torch.zeros(residual_channels, device=device, dtype=dtype)  # residual biases so far
        self.offsets = []
        for layer in layers:
            kernel = layer.filter_gate.weight.detach().clone()  # (2D, R, K)
            bias = _bias(layer.filter_gate)
            kernel[dilation_channels:] *= 0.5  # the gate half: sigmoid(g) from tanh(g / 2)
            bias[dilation_channels:] *= 0.5
            current.append(kernel[:, :, -1].T.contiguous())  # (R, 2D)
            past.append(kernel[:, :, :-1].permute(2, 1, 0).reshape(taps * residual_channels, -1))  # tap-major
            biases.append(bias + offset @ kernel.sum(dim=2).T)
            self.offsets.append(offset)
            skips.append(0.5 * layer.skip.weight.detach()[:, :, 0].T)  # (D, S)
            if layer.residual is not None:
                residuals.append(0.5 * layer.residual.weight.detach()[:, :, 0].T.contiguous())  # (D, R)
                offset = offset + _bias(layer.residual)
        self.past_weight = torch.stack(past)  # (L, (K-1) R, 2D)
        self.past_bias = torch.stack(biases).unsqueeze(1)  # (L, 1, 2D)
        self.skip_weight = torch.cat(skips)  # (L D, S): all layers' skips summed by one matmul
        self.skip_bias = sum(_bias(layer.skip) for layer in layers)
        head = [conv for conv in model.head if isinstance(conv, nn.Conv1d)]
        self.head_weights = [conv.weight.detach()[:, :, 0].T.contiguous() for conv in head]
        self.head_biases = [_bias(conv) for conv in head]

        # The rings of all layers side by side, so that one index_select gathers every past tap:
        # layer l's input at time t is in column starts[l] + t % lengths[l].
        self.rings = torch.zeros(batch_size, sum(lengths), residual_channels, device=device, dtype=dtype)
        self.ring_views = [self.rings[:, start : start + length] for start, length in zip(starts, lengths)]
        # Tap k of layer l at time t reads the input at t - (K - 1 - k) * dilation. Per phase of the step
        # counter, the columns to gather; the pattern repeats with the lcm of the ring lengths.
        self.period = math.lcm(*lengths)
        time = torch.arange(self.period)
        self.tap_columns = torch.stack(
            [
                start + (time - (taps - k) * layer.dilation) % length
                for start, length, layer in zip(starts, lengths, layers)
                for k in range(taps)
            ],
            dim=1,
        ).to(device)  # (period, L (K-1))
        # Per phase, the column where each layer's input of that step goes.
        self.write_columns = torch.stack(
            [start + time % length for start, length in zip(starts, lengths)], dim=1
        ).to(device)  # (period, L)
        # Both, side by side, so that the device-counter step looks them up with one index_select.
        self.columns = torch.cat([self.tap_columns, self.write_columns], dim=1)
        self.phase = torch.zeros(1, dtype=torch.long, device=device) if device_counter else None
        self.columns_now = torch.empty(1, self.columns.shape[1], dtype=torch.long, device=device)  # its row
        self.past = torch.empty(batch_size, len(layers) * taps, residual_channels, device=device, dtype=dtype)
        self.past_by_layer = self.past.view(batch_size, len(layers), -1).transpose(0, 1)  # (L, B, (K-1) R)
        self.pre = torch.empty(len(layers), batch_size, 2 * dilation_channels, device=device, dtype=dtype)
        self.gated = torch.empty(batch_size, len(layers) * dilation_channels, device=device, dtype=dtype)
        self.skip = torch.empty(batch_size, self.skip_weight.shape[1], device=device, dtype=dtype)
        self.hidden = torch.empty(batch_size, self.head_weights[0].shape[1], device=device, dtype=dtype)
        self.logits = torch.empty(batch_size, model.quantization_channels, device=device, dtype=dtype)
        # The (B, R) view of every ring column: layer l's input at time t goes to ring_slots[l][t % length],
        # written there by the op that computes it, after the step has gathered every past tap (the oldest
        # tap, dilation * (kernel_size - 1) back, is in the column this write goes to). The device-counter
        # step cannot pick views by time: it writes every layer's input to `inputs`, then all of them to
        # the rings with one index_copy at the end.
        self.ring_slots = [ring.unbind(1) for ring in self.ring_views]
        self.inputs = torch.empty(len(layers), batch_size, residual_channels, device=device, dtype=dtype)
        self.inputs_by_stream = self.inputs.transpose(0, 1)  # (B, L, R), as the rings are laid out
        self.input_rows = self.inputs.unbind(0)

        self.layers = [
            _Layer(
                pre=self.pre[index],
                filter_=self.pre[index, :, :dilation_channels],
                gate=self.pre[index, :, dilation_channels:],
                current_weight=current[index],
                gated=self.gated[:, index * dilation_channels : (index + 1) * dilation_channels],
                residual_weight=residuals[index] if index < len(residuals) else None,
            )
            for index in range(len(layers))
        ]

    @property
    def device(self) -> torch.device:
        return self.rings.device

    def reset(self, context: Tensor | None = None) -> None:
        """Sets the cached past as if `step` had consumed `context`, preceded by silence.

        The state comes from the network's own convolutions over the last `receptive_field - 1` samples
        of the context (older ones cannot reach any later output), not from stepping through them.

        Args:
            context: (T,) mu-law classes shared by every stream (computed once), or (B, T) per stream;
                T >= 0. None or T = 0 is silence: the next steps then give the full forward's logits
                (`model(x)`, which pads with silence) from its first position.
        """
        model = self.model
        if context is None:
            context = torch.empty(0, dtype=torch.long)
        if context.dim() == 1:
            context = context.unsqueeze(0)
        elif context.dim() != 2 or context.shape[0] != self.batch_size:
            raise ValueError(f"context must be (T,) or (B={self.batch_size}, T), got {tuple(context.shape)}")
        span = model.receptive_field - 1  # the rings are filled from the last `span` inputs
        context = context[:, max(context.shape[1] - span, 0) :].to(self.device)
        x = F.pad(context, (span - context.shape[1], 0), value=model.silence_class)
        # A few streams at a time, so that the activations of the whole span stay within bounds at large B.
        rows = max(1, _RESET_ELEMENTS // (span * self.rings.shape[2]))
        with torch.inference_mode():
            for first in range(0, x.shape[0], rows):
                streams = slice(first, first + rows) if x.shape[0] > 1 else slice(None)  # shared: broadcast
                h = model.embedding(x[first : first + rows]).transpose(1, 2)  # (rows, R, span)
                for layer, ring, offset in zip(model.layers, self.ring_views, self.offsets):
                    # Column i holds the input at time i - length, the next step being time 0.
                    inputs = h[:, :, h.shape[2] - ring.shape[1] :] - offset[:, None]
                    ring[streams].copy_(inputs.transpose(1, 2))
                    if layer.residual is not None:
                        h = h[:, :, layer.context :] + layer.residual(layer.gated(h))
        self.position = 0
        if self.phase is not None:
            self.phase.zero_()

    def step(self, classes: Tensor) -> Tensor:
        """Consumes one input sample per stream and returns the logits of the next one.

        Args:
            classes: (B,) int64 mu-law classes on the model's device.

        Returns:
            (B, Q) logits, in a buffer that the next step overwrites: clone it to keep it.
        """
        if self.phase is None:
            t = self.position
            tap_columns = self.tap_columns[t % self.period]
            inputs = [slots[t % len(slots)] for slots in self.ring_slots]
        else:
            columns = torch.index_select(self.columns, 0, self.phase, out=self.columns_now)[0]
            tap_columns, write_columns = columns.split([self.tap_columns.shape[1], self.write_columns.shape[1]])
            inputs = self.input_rows
        # Every layer's past taps at once: all of them were written before this step began.
        torch.index_select(self.rings, 1, tap_columns, out=self.past)
        torch.baddbmm(self.past_bias, self.past_by_layer, self.past_weight, out=self.pre)
        h = torch.index_select(self.embedding, 0, classes, out=inputs[0])
        for index, layer in enumerate(self.layers):
            layer.pre.addmm_(h, layer.current_weight).tanh_()
            torch.addcmul(layer.filter_, layer.filter_, layer.gate, out=layer.gated)  # 2 tanh(f) sigmoid(g)
            if layer.residual_weight is not None:
                h = torch.addmm(h, layer.gated, layer.residual_weight, out=inputs[index + 1])
        if self.phase is not None:
            self.rings.index_copy_(1, write_columns, self.inputs_by_stream)
        torch.addmm(self.skip_bias, self.gated, self.skip_weight, out=self.skip).relu_()
        torch.addmm(self.head_biases[0], self.skip, self.head_weights[0], out=self.hidden).relu_()
        torch.addmm(self.head_biases[1], self.hidden, self.head_weights[1], out=self.logits)
        self.position += 1
        if self.phase is not None:
            self.phase.add_(1).remainder_(self.period)
        return self.logits


METHODS = ("auto", "eager", "cuda_graph", "fused")
# `auto` keeps the CPU eager once a step's multiply-adds over all streams (streams x parameters) reach this: there
# eager's batched matmuls (oneDNN, cache-blocked over streams) catch up with the kernel's products over groups of
# 8 streams, and they gain more from more streams and wider layers. Fused / eager (BENCHMARKS.md), float32:
# `small` 1.06x at 256 streams, 1.13x at 512, 0.98x at 1,024; `medium` 1.74x at 16, 0.99x at 64, 0.82x at 128.
# With bfloat16 weights, where eager's matmuls are slower: `small` 1.50x, 1.34x, 1.02x; `medium` 3.4x at 16,
# 1.04x at 128, 0.87x at 256. So float32 `small` runs fused below 406 streams and `medium` below 65; bfloat16
# ones below 1,029 and 165. Those bfloat16 figures are of a CPU whose oneDNN multiplies bfloat16 (AVX-512 and
# up); on one without (AVX2: AMD EPYC here) eager's bfloat16 matmuls are emulated, 20-25x slower than the kernel
# at any batch (`small` 1,167 against 21,307 samples/s at 1,024 streams, `medium` 155 against 3,520 at 256), so
# bfloat16 runs fused there whatever the batch (`_cpu_work_limit`).
_CPU_FUSED_WORK = {torch.float32: 2.6e8, torch.bfloat16: 6.6e8}
# Models whose float32 weights take more than this stay eager on the CPU: a step then streams every weight from
# DRAM, as eager's one matmul per weight matrix does too, and the kernel's split across cores adds traffic (each
# core reads all residual weights). Fused / eager at batch 1 and 16 on a 2-core CPU (`python bench/generate.py
# --widths`, BENCHMARKS.md): 1.74x and 1.30x for `medium` (15 MiB), then `large` at widths 256, 320, 384, 512:
# 1.21x and 1.09x (46 MiB), 1.09x and 0.93x (71 MiB), 1.07x and 0.76x (102 MiB), 0.85x and 0.90x (181 MiB).
# bfloat16 weights, of any size, go by the work limit alone: the kernel reads them as such, and eager's bfloat16
# matrix-vector products are slow on the CPU. `large` in bfloat16 (91 MiB) ran 2.0x eager at batch 1, 1.39x at 2,
# 1.31x at 4, 1.00x at 8, 0.72x at 16 (the work limit keeps it fused up to 13 streams, a little past even).
_CPU_FUSED_MAX_FLOAT32_BYTES = 80 * 2**20


def resolve_method(
    method: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    parameters: int = 0,
) -> str:
    """The generation path `method` names for `batch_size` streams of a model of `parameters` weights of
    `dtype` on `device`.

    `auto` is `cuda_graph` on CUDA. On the CPU it is `fused` (the native kernel) for float32 or bfloat16
    weights where a C++ compiler has built it, for steps of fewer than `_CPU_FUSED_WORK` multiply-adds over
    all streams (bfloat16 without that limit where the CPU's matmuls only emulate it) and, in float32, models
    up to `_CPU_FUSED_MAX_FLOAT32_BYTES` of weights; otherwise `eager`.

    Raises:
        ValueError: For an unknown method, or one that cannot run here (the message says why).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "auto":
        if device.type == "cuda":
            return "cuda_graph"
        fits = dtype != torch.float32 or parameters * dtype.itemsize <= _CPU_FUSED_MAX_FLOAT32_BYTES
        fused_wins = batch_size * parameters < _cpu_work_limit(dtype) and fits
        if device.type == "cpu" and fused_wins:
            problem = _cpu_fused_problem(dtype)
            if problem is None:
                return "fused"
            _warn_once(
                "Generating eagerly, up to 4.5x slower than the native CPU kernel (30x in bfloat16), which cannot "
                f"run here: {problem}"
            )
        return "eager"
    if method == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"method 'cuda_graph' needs a CUDA device, the model is on {device}")
    if method == "fused":
        from wavenet.kernels.fused_step import fused_available

        if _native_cpu(device):
            problem = _cpu_fused_problem(dtype)
            if problem is not None:
                raise ValueError(f"method 'fused' cannot run on the CPU here: {problem}")
        elif not fused_available(device):
            raise ValueError(f"method 'fused' needs Triton and a CUDA device (or the CPU), the model is on {device}")
    return method


def _cpu_work_limit(dtype: torch.dtype) -> float:
    """Multiply-adds per step over all streams from which eager beats the native kernel on this CPU."""
    if dtype == torch.bfloat16 and not _cpu_multiplies_bfloat16():
        return math.inf
    return _CPU_FUSED_WORK.get(dtype, _CPU_FUSED_WORK[torch.float32])  # other dtypes: the kernel refuses them


@functools.cache
def _cpu_multiplies_bfloat16() -> bool:
    """Whether torch's CPU matmuls (oneDNN) have bfloat16 kernels here; where they do not, they emulate them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: a torch without it keeps the measured limits
        return True


@functools.cache
def _warn_once(message: str) -> None:
    """Logs `message` the first time only: `generate` resolves its method on every call."""
    log.warning(message)


def _native_cpu(device: torch.device) -> bool:
    """Whether `fused` on `device` is the native CPU kernel: on the CPU, unless TRITON_INTERPRET=1 asks for the
    Triton kernel through Triton's interpreter there (a debugging switch, for tests)."""
    if device.type != "cpu":
        return False
    from wavenet.kernels.fused_step import _interpreter_requested

    return not _interpreter_requested()


def _cpu_fused_problem(dtype: torch.dtype) -> str | None:
    """Why the native CPU kernel cannot run weights of `dtype` here, or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"its kernel runs float32 or bfloat16 weights, these are {dtype}"
    from wavenet.kernels.cpu_step import cpu_kernel_problem

    return cpu_kernel_problem()


@torch.inference_mode()
def generate(
    model: WaveNet | nn.Module,
    num_samples: int,
    batch_size: int = 1,
    temperature: float = 1.0,
    prime: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    method: str = "auto",
    out: Tensor | None = None,
) -> Tensor:
    """Samples `num_samples` mu-law classes per stream, one at a time, on the model's device.

    Decode with `wavenet.mu_law_decode(classes, model.quantization_channels)`.

    Args:
        model: A `WaveNet`, or a module holding one as `.model` (a `WaveNetModule`).
        num_samples: Samples to generate per stream.
        batch_size: Number of independent streams B.
        temperature: Softmax temperature; 0 picks the most likely class (greedy), 1 samples the model.
        prime: (T,) or (B, T) mu-law classes (any integer dtype), T >= 1, that the generated samples continue: a
            (T,) prime is shared by all streams. Only its last `receptive_field` samples matter; a shorter one is
            preceded by silence. None starts from silence.
        generator: Random source on the model's device; seed it for reproducible output on that device.
        progress: Called with the number of new samples per stream, every 64 steps or fewer.
        method: `eager`, `cuda_graph` or `fused` (see the module's docstring), or `auto`: `cuda_graph` on
            a GPU; on the CPU `fused` for float32 or bfloat16 weights, as many streams as it beats eager's
            batched matmuls at (float32: up to 405 for `small`, 64 for `medium`; bfloat16: 1,028, 164 and 13
            for `large`) and, in float32, models up to 80 MiB (not `large`), where a C++ compiler is found, else
            `eager`. All of them compute the same function; with the same seed they draw the same noise.
        out: (B, num_samples) int64 tensor on the model's device to write the samples to as they are made:
            when generation stops early (Ctrl-C), those reported to `progress` so far are there.

    Returns:
        (B, num_samples) int64 classes, without the prime: `out` where given.

    Raises:
        TypeError, ValueError: Naming the argument of a wrong type or value, before any work is done.
    """
    if isinstance(getattr(model, "model", None), WaveNet):
        model = model.model
    if not isinstance(model, WaveNet):
        raise TypeError(f"model must be a WaveNet or a module holding one as .model, got {type(model).__name__}")
    device, dtype = model.embedding.weight.device, model.embedding.weight.dtype
    num_samples, batch_size = _check_arguments(
        device, num_samples, batch_size, temperature, prime, generator, progress, out
    )
    method = resolve_method(method, device, dtype, batch_size, sum(p.numel() for p in model.parameters()))
    prime = _check_prime(prime, model, batch_size).to(device)
    levels = model.quantization_channels
    chunk = min(_CHUNK_STEPS, max(1, _NOISE_ELEMENTS // (batch_size * levels)))

    bf16_weights = method == "fused" and _native_cpu(device) and dtype == torch.bfloat16
    if bf16_weights:
        # The kernel's state and arithmetic are float32 (the stepper's), its weight matrices the model's bfloat16.
        model = copy.deepcopy(model).float()
    stepper = IncrementalWaveNet(model, batch_size, device_counter=method == "cuda_graph")
    if method == "cuda_graph":
        run_chunk: Callable[[Tensor, Tensor, Tensor | None], None] = CudaGraphSampler(
            stepper, chunk, sampling=temperature > 0
        )
    elif method == "fused":
        if _native_cpu(device):
            from wavenet.kernels.cpu_step import cpu_steps as fused_steps
        else:
            from wavenet.kernels.fused_step import fused_steps

        options = {"bf16_weights": True} if bf16_weights else {}

        def run_chunk(classes: Tensor, out: Tensor, noise: Tensor | None) -> None:
            fused_steps(stepper, classes, out, noise=noise, **options)

    else:

        def run_chunk(classes: Tensor, out: Tensor, noise: Tensor | None) -> None:
            sample_steps(stepper, classes, out, noise)

    stepper.reset(prime[..., :-1])  # after the capture above, whose warm-up steps write the state
    samples = torch.empty(batch_size, num_samples, dtype=torch.long, device=device) if out is None else out
    # Steps write (chunk, B) rows; copied into `samples` chunk by chunk, so that the result is never transposed
    # whole (a second copy of every sample: gigabytes for thousands of long streams).
    steps = torch.empty(chunk, batch_size, dtype=torch.long, device=device)
    classes = prime[..., -1].expand(batch_size).contiguous()
    for start in range(0, num_samples, chunk):
        out = steps[: min(chunk, num_samples - start)]
        noise = None
        if temperature > 0:
            # Gumbel-max: argmax(logits / T + G) is a sample of softmax(logits / T); scaled by T, no division.
            noise = _gumbel_(torch.rand(len(out), batch_size, levels, generator=generator, device=device), temperature)
        run_chunk(classes, out, noise)
        samples[:, start : start + len(out)] = out.T
        classes = out[-1].clone()  # the next chunk's steps overwrite `out`
        if progress is not None:
            progress(len(out))
    return samples


def sample_steps(stepper: IncrementalWaveNet, classes: Tensor, out: Tensor, noise: Tensor | None) -> None:
    """Runs `len(out)` steps from input `classes`, each fed the sample drawn at the step before.

    Args:
        stepper: The state, advanced by `len(out)` steps.
        classes: (B,) the first step's input.
        out: (steps, B) int64: receives argmax(logits + noise[i]) of every step (argmax alone if no noise).
        noise: (steps, B, Q) Gumbel noise times the temperature, or None for greedy decoding.
    """
    for index in range(len(out)):
        logits = stepper.step(classes)
        if noise is not None:
            logits.add_(noise[index])
        classes = torch.argmax(logits, dim=1, out=out[index])


class CudaGraphSampler:
    """`sample_steps` for a fixed number of steps, captured once in a CUDA graph and replayed per chunk.

    A step of `small` is about 90 kernels of a few microseconds each, too short for the CPU to launch them
    as fast as the GPU runs them. Replaying a graph launches a whole chunk of steps, their sampling
    included, at once: no launch and no host synchronisation per sample. The graph reads its ring
    positions from the stepper's device-side counter, so a replay is right at any time.

    Capturing runs warm-up steps that overwrite the stepper's state: `reset` it afterwards.

    Args:
        stepper: Built with `device_counter=True`, on a CUDA device.
        steps: Steps per replay; calls with another number of steps run them eagerly.
        sampling: Whether the graph adds noise before the argmax (temperature > 0).
    """

    def __init__(self, stepper: IncrementalWaveNet, steps: int, sampling: bool) -> None:
        if stepper.phase is None or stepper.device.type != "cuda":
            raise ValueError("a CUDA graph needs a stepper on a CUDA device, built with device_counter=True")
        self.stepper = stepper
        shape = (stepper.batch_size, stepper.model.quantization_channels)
        # The graph's inputs and outputs: fixed addresses, refilled and read around every replay.
        self.classes = torch.zeros(shape[0], dtype=torch.long, device=stepper.device)
        self.noise = torch.zeros(steps, *shape, device=stepper.device) if sampling else None
        self.out = torch.empty(steps, shape[0], dtype=torch.long, device=stepper.device)
        with torch.cuda.device(stepper.device):  # capture happens on the current device's streams
            # Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisation (cuBLAS workspaces,
            # kernels' first use) must not happen during capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._steps()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._steps()

    def _steps(self) -> None:
        sample_steps(self.stepper, self.classes, self.out, self.noise)

    def __call__(self, classes: Tensor, out: Tensor, noise: Tensor | None) -> None:
        """As `sample_steps(stepper, classes, out, noise)`."""
        if (noise is None) != (self.noise is None):
            raise ValueError(f"this graph was captured {'with' if self.noise is not None else 'without'} noise")
        if len(out) != len(self.out):
            sample_steps(self.stepper, classes, out, noise)  # the last, shorter chunk
            return
        self.classes.copy_(classes)
        if noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()
        out.copy_(self.out)
        self.stepper.position += len(out)  # replays do not run the Python that counts


def _gumbel_(uniform: Tensor, temperature: float) -> Tensor:
    """Turns uniform draws in [0, 1), in place, into Gumbel noise times `temperature`.

    Gumbel-max: argmax(logits / T + G) is a sample of softmax(logits / T); scaled by T, no division. On the CPU
    through numpy, on one thread: torch's log of a chunk's draws wakes its OpenMP threads, which then spin for
    milliseconds on the very cores that the native kernel's threads are about to need.
    """
    if uniform.device.type == "cpu":
        draws = uniform.numpy()
        np.maximum(draws, np.finfo(draws.dtype).tiny, out=draws)
        np.log(draws, out=draws)
        np.negative(draws, out=draws)
        np.log(draws, out=draws)
        np.multiply(draws, -temperature, out=draws)
        return uniform
    return uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_().mul_(temperature)


def _check_arguments(
    device: torch.device,
    num_samples: int,
    batch_size: int,
    temperature: float,
    prime: Tensor | None,
    generator: torch.Generator | None,
    progress: Callable[[int], None] | None,
    out: Tensor | None,
) -> tuple[int, int]:
    """`generate`'s arguments checked, as cheaply as their types allow; num_samples and batch_size as ints."""
    num_samples = _check_integer("num_samples", num_samples, 0)
    batch_size = _check_integer("batch_size", batch_size, 1)
    check_temperature(temperature)
    if prime is not None and not isinstance(prime, Tensor):  # its values are checked by _check_prime
        raise TypeError(f"prime must be a tensor of mu-law classes or None, got {type(prime).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model on {device}, where noise is drawn")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
        if out.shape != (batch_size, num_samples) or out.dtype != torch.long or out.device != device:
            got = f"{out.dtype} {tuple(out.shape)} on {out.device}"
            raise ValueError(f"out must be int64 ({batch_size}, {num_samples}) on {device}, got {got}")
    return num_samples, batch_size


def _check_integer(name: str, value: int, least: int) -> int:
    """`value` as an int, after a TypeError or ValueError naming `name` unless it is an integer >= `least`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return int(value)


def _check_prime(prime: Tensor | None, model: WaveNet, batch_size: int) -> Tensor:
    """The prime, checked; one sample of silence when None."""
    if prime is None:
        return torch.full((1,), model.silence_class, dtype=torch.long)
    if prime.is_floating_point():  # the recording itself, the likeliest mistake: say how to make its classes
        raise ValueError(
            f"prime must be mu-law classes, got {prime.dtype} audio: encode it with "
            f"wavenet.mu_law_encode(prime, {model.quantization_channels})"
        )
    if prime.is_complex() or prime.dtype == torch.bool or prime.dim() not in (1, 2) or prime.shape[-1] < 1:
        raise ValueError(
            f"prime must be integer classes, (T,) or (B, T) with T >= 1, got {prime.dtype} {tuple(prime.shape)}"
        )
    if prime.dim() == 2 and prime.shape[0] != batch_size:
        raise ValueError(f"prime has {prime.shape[0]} streams, batch_size is {batch_size}")
    if prime.min() < 0 or prime.max() >= model.quantization_channels:
        raise ValueError(f"prime classes must be in [0, {model.quantization_channels})")
    return prime.long()  # uint8, as mu-law classes are stored, or int32, as `WaveNet` takes them


def _bias(conv: nn.Conv1d) -> Tensor:
    """A convolution's bias (a copy), or zeros when it has none."""
    if conv.bias is None:
        return torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    return conv.bias.detach().clone()
