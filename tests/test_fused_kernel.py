"""The fused Triton generation kernel equals the eager incremental step: logits, samples, mixing, bfloat16.

Without CUDA the kernel runs through Triton's interpreter on CPU tensors (numpy: slow, so small shapes and
tens of steps); the `gpu` test runs the same checks compiled on CUDA, where it also runs the real sizes.
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

pytest.importorskip("triton")

from wavenet.generation import IncrementalWaveNet  # noqa: E402
from wavenet.kernels.fused_step import (  # noqa: E402
    LaunchConfig,
    fused_available,
    fused_steps,
    fused_weights,
)
from wavenet.models.wavenet import WaveNet  # noqa: E402

LEVELS = 32
# Widths (residual, dilation, skip): the dilation width differs from the residual one, so a transposed weight
# cannot go unnoticed; ODD ones are padded to powers of two in the kernel, each to a different one.
WIDTHS = (16, 32, 32)
ODD = (12, 20, 24)
CPU = dict(device="cpu", interpret=True)


def random_wavenet(
    kernel_size: int = 2,
    layers: int = 6,
    stacks: int = 2,
    widths: tuple[int, int, int] = WIDTHS,
    levels: int = LEVELS,
) -> WaveNet:
    """A WaveNet with weights large enough that every layer, bias and gate moves the logits."""
    torch.manual_seed(kernel_size * 100 + layers * 10 + stacks)
    model = WaveNet(layers, stacks, *widths, kernel_size=kernel_size, quantization_channels=levels)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0  # the outputs are not trivially small
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def eager_logits(stepper: IncrementalWaveNet, inputs: torch.Tensor) -> torch.Tensor:
    """(steps, B, Q) logits of `stepper.step` over inputs (steps, B)."""
    return torch.stack([stepper.step(classes).clone() for classes in inputs])


def fused_logits(
    stepper: IncrementalWaveNet, inputs: torch.Tensor, config: LaunchConfig | None = None, **run
) -> torch.Tensor:
    """(steps, B, Q) float32 logits of `fused_steps` teacher-forced with inputs (steps, B)."""
    steps, batch = inputs.shape
    out = torch.empty(steps, batch, dtype=torch.long, device=inputs.device)
    logits = torch.empty(steps, batch, stepper.logits.shape[1], device=inputs.device)
    fused_steps(stepper, inputs[0], out, forced=inputs, logits_out=logits, config=config, **run)
    return logits


# --- checks, each run on CPU through the interpreter and on CUDA compiled ----------------------------------


def check_teacher_forced_logits(
    model: WaveNet, batch: int, config: LaunchConfig | None = None, *, device: str, interpret: bool
) -> None:
    """Logits equal the eager step's and the full forward's, long enough for every ring to wrap twice."""
    model = model.to(device)
    longest_ring = max(layer.context for layer in model.layers)
    steps = model.receptive_field + 2 * longest_ring + 3
    x = torch.randint(0, model.quantization_channels, (batch, steps), device=device)
    with torch.inference_mode():
        expected = model(x).permute(2, 0, 1)  # (steps, B, Q)
        eager, fused = IncrementalWaveNet(model, batch), IncrementalWaveNet(model, batch)
        eager.reset()
        fused.reset()
        eager_out = eager_logits(eager, x.T)
        fused_out = fused_logits(fused, x.T.contiguous(), config, interpret=interpret)
    assert_relative_close(eager_out, expected)
    assert_relative_close(fused_out, eager_out)
    assert_relative_close(fused_out, expected)
    # The state is the eager path's too: same position, same rings (what later steps read).
    assert fused.position == eager.position == steps
    assert_relative_close(fused.rings, eager.rings)


def check_sampling(model: WaveNet, batch: int, steps: int, *, device: str, interpret: bool) -> None:
    """With the same Gumbel noise the samples are the eager loop's; greedy is the full forward's argmax."""
    model = model.to(device)
    levels = model.quantization_channels
    prime = torch.randint(0, levels, (batch, 9), device=device)
    generator = torch.Generator(device).manual_seed(1)
    noise = torch.rand(steps, batch, levels, generator=generator, device=device)
    noise = -0.9 * torch.log(-torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny)))  # temperature 0.9
    with torch.inference_mode():
        eager = IncrementalWaveNet(model, batch)
        eager.reset(prime[:, :-1])
        expected = torch.empty(steps, batch, dtype=torch.long, device=device)
        classes = prime[:, -1]
        for index in range(steps):
            classes = torch.argmax(eager.step(classes) + noise[index], dim=1)
            expected[index] = classes

        fused = IncrementalWaveNet(model, batch)
        fused.reset(prime[:, :-1])
        sampled = torch.empty(steps, batch, dtype=torch.long, device=device)
        fused_steps(fused, prime[:, -1].contiguous(), sampled, noise=noise, interpret=interpret)
        assert torch.equal(sampled, expected)
        assert len(sampled.unique()) > 3  # the noise did move the samples around

        fused.reset(prime[:, :-1])
        greedy = torch.empty(steps, batch, dtype=torch.long, device=device)
        fused_steps(fused, prime[:, -1].contiguous(), greedy, interpret=interpret)
        # Output t of the full forward predicts input t + 1: the prime, then the samples themselves.
        logits = model(torch.cat([prime, greedy[:-1].T], dim=1))[:, :, prime.shape[1] - 1 :]
        assert torch.equal(greedy.T, logits.argmax(dim=1))
        assert not torch.equal(greedy, sampled)


def check_mixing(
    model: WaveNet, batch: int, *, device: str, interpret: bool, lag: int = 0, **stepper_options
) -> None:
    """reset(context), eager steps, fused steps, eager steps again: all of it equals the full forward.

    `lag` steps that `position` misses, as after CUDA graph replays: a stepper with a device-side counter
    must be followed by that counter."""
    model = model.to(device)
    context, first, middle, last = 11, 5, 13, 17  # `first` leaves the fused launch a phase that is not 0
    x = torch.randint(0, model.quantization_channels, (batch, context + first + middle + last), device=device)
    with torch.inference_mode():
        expected = model(x)[:, :, context:].permute(2, 0, 1)
        stepper = IncrementalWaveNet(model, batch, **stepper_options)
        stepper.reset(x[:, :context])
        inputs = x[:, context:].T
        before = eager_logits(stepper, inputs[:first])
        stepper.position -= lag
        fused = fused_logits(stepper, inputs[first : first + middle].contiguous(), interpret=interpret)
        after = eager_logits(stepper, inputs[first + middle :])
    assert_relative_close(torch.cat([before, fused, after]), expected)
    if stepper.phase is not None:
        assert stepper.phase.item() == (stepper.position + lag) % stepper.period


def check_bfloat16(model: WaveNet, batch: int, *, device: str, interpret: bool) -> float:
    """bfloat16 logits are near float32's, as near as the eager bfloat16 step's; returns the fused error."""
    model = model.to(device)
    steps = model.receptive_field + 10
    x = torch.randint(0, model.quantization_channels, (batch, steps), device=device)
    with torch.inference_mode():
        expected = model(x).permute(2, 0, 1)
        half = copy.deepcopy(model).to(torch.bfloat16)
        eager = IncrementalWaveNet(half, batch)
        eager.reset()
        eager_out = eager_logits(eager, x.T).float()
        fused = IncrementalWaveNet(half, batch)
        fused.reset()
        fused_out = fused_logits(fused, x.T.contiguous(), interpret=interpret)
    scale = expected.abs().max()
    fused_error = ((fused_out - expected).abs().max() / scale).item()
    eager_error = ((eager_out - expected).abs().max() / scale).item()
    # bfloat16 keeps 8 bits: 2^-8 relative per rounding, compounded over the layers (~2% of the largest logit
    # here). Both paths round at the same places (weights, every layer's input and gated activation, skip,
    # hidden, logits), in a different order, so neither is nearer float32 than the other by much.
    assert fused_error < max(0.05, 2 * eager_error), (fused_error, eager_error)
    return fused_error


# --- on CPU, through Triton's interpreter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel_size", "layers", "stacks", "widths", "levels", "batch", "config"),
    [
        # Two programs of 2 streams and two of 16 (the default), the second one partly past the batch.
        (2, 6, 2, WIDTHS, LEVELS, 3, LaunchConfig(block_b=2)),
        (3, 6, 3, WIDTHS, LEVELS, 17, None),
        # Every width padded, classes too; 16-channel tiles, so the tile loops run more than once.
        (2, 4, 1, ODD, 40, 5, LaunchConfig(block_b=4, block_d=16, block_s=16)),
    ],
    ids=["kernel2", "kernel3-two-programs", "odd-widths-tiled"],
)
def test_teacher_forced_logits_equal_the_eager_step_and_the_full_forward(
    kernel_size, layers, stacks, widths, levels, batch, config
):
    model = random_wavenet(kernel_size, layers, stacks, widths, levels)
    check_teacher_forced_logits(model, batch, config, **CPU)


def test_samples_equal_the_eager_loop_with_the_same_noise_and_greedy_is_the_argmax():
    check_sampling(random_wavenet(3, layers=4, stacks=2), batch=3, steps=30, **CPU)


@pytest.mark.parametrize("device_counter", [False, True], ids=["python-counter", "device-counter"])
def test_fused_and_eager_steps_take_turns_on_the_same_streams(device_counter):
    """With `device_counter` the kernel reads the stepper's step counter on the device and advances it."""
    if device_counter and "device_counter" not in inspect.signature(IncrementalWaveNet).parameters:
        pytest.skip("IncrementalWaveNet has no device-side step counter")
    options = {"device_counter": True, "lag": 3} if device_counter else {}
    check_mixing(random_wavenet(2, layers=6, stacks=2), batch=2, **CPU, **options)


def test_bfloat16_logits_are_near_float32():
    check_bfloat16(random_wavenet(2, layers=4, stacks=2), batch=3, **CPU)


def test_the_interpreter_is_switched_on_for_the_kernel_alone():
    """Other Triton code in the process (torch.compile's) still compiles: the variable is not left set, and
    the kernel module for CUDA holds a compiled JITFunction whatever ran through the interpreter before."""
    import triton

    from wavenet.kernels import _fused_step_kernel

    check_mixing(random_wavenet(2, layers=2, stacks=1), batch=1, **CPU)  # loads the interpreted variant
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for the whole process")
    assert "TRITON_INTERPRET" not in os.environ
    assert not triton.knobs.runtime.interpret
    assert isinstance(_fused_step_kernel.fused_steps_kernel, triton.runtime.JITFunction)
    assert isinstance(triton.language.standard.max, triton.runtime.JITFunction)


def test_where_it_cannot_run_it_says_so():
    model = random_wavenet()
    stepper = IncrementalWaveNet(model, 2)
    out = torch.empty(4, 2, dtype=torch.long)
    classes = torch.zeros(2, dtype=torch.long)
    assert fused_available("cpu", interpret=True)
    assert not fused_available("cpu", interpret=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        fused_steps(stepper, classes, out, interpret=False)
    with pytest.raises(ValueError, match="out"):
        fused_steps(stepper, classes, out.int(), interpret=True)
    with pytest.raises(ValueError, match="noise"):
        fused_steps(stepper, classes, out, noise=torch.zeros(4, 2, LEVELS + 1), interpret=True)
    with pytest.raises(ValueError, match="block"):
        fused_steps(stepper, classes, out, config=LaunchConfig(block_d=8), interpret=True)
    assert stepper.position == 0  # nothing ran
    assert fused_weights(stepper) is fused_weights(stepper)  # prepared once per stepper


# --- on CUDA, compiled -------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_compiled_kernel_on_cuda():
    run = dict(device="cuda", interpret=False)
    assert fused_available("cuda", interpret=False)
    # cuDNN convolutions may run in tf32 by default, and the full forward is the reference here.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for kernel_size, layers, stacks, widths, levels, batch, configs in [
            (2, 6, 2, WIDTHS, LEVELS, 3, [None, LaunchConfig(block_b=1, block_d=16)]),
            (3, 6, 3, WIDTHS, LEVELS, 17, [None, LaunchConfig(block_b=4, block_d=16, num_warps=4)]),
            (2, 4, 1, ODD, 40, 5, [None, LaunchConfig(block_b=2, block_d=16)]),
            (2, 20, 2, (64, 64, 128), 256, 1, [None]),  # conf/model/small.yaml
            (3, 30, 3, (128, 128, 128), 256, 33, [None]),  # conf/model/medium.yaml
        ]:
            model = random_wavenet(kernel_size, layers, stacks, widths, levels)
            for config in configs:
                check_teacher_forced_logits(model, batch, config, **run)
        check_sampling(random_wavenet(3, layers=4, stacks=2), batch=3, steps=300, **run)
        check_mixing(random_wavenet(2, layers=6, stacks=2), batch=19, **run)
        if "device_counter" in inspect.signature(IncrementalWaveNet).parameters:
            check_mixing(random_wavenet(2, layers=6, stacks=2), batch=19, **run, lag=3, device_counter=True)
        check_bfloat16(random_wavenet(2, layers=4, stacks=2), batch=19, **run)
