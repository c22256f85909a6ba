"""The native CPU generation kernel equals the eager incremental step: logits, state, samples, threads, build."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wavenet import generation
from wavenet.generation import IncrementalWaveNet, generate, resolve_method
from wavenet.kernels import cpu_step
from wavenet.kernels.cpu_step import cpu_kernel_available, cpu_steps
from wavenet.models.wavenet import WaveNet


@pytest.fixture
def built_kernel() -> None:
    """Skips a test where the kernel cannot be built; builds it at the first test that needs it, not when the tests
    are collected (by every pytest worker at once: 15 s each on 2 cores)."""
    problem = cpu_step.cpu_kernel_problem()
    if problem is not None:
        pytest.skip(f"the CPU kernel cannot be built here: {problem}")


# Not module-wide: the tests of a missing compiler and of the thread choice run anywhere.
needs_kernel = pytest.mark.usefixtures("built_kernel")
needs_compiler = pytest.mark.skipif(cpu_step._compiler() is None, reason="no C++ compiler")

LEVELS = 48


def random_wavenet(kernel_size: int, widths: tuple[int, int, int], layers: int = 6) -> WaveNet:
    """Weights large enough that every layer, bias and gate moves the logits, small enough that the wide net's
    activations stay where float32 sums agree to 1e-5 whatever their order."""
    torch.manual_seed(kernel_size * 1000 + sum(widths))
    model = WaveNet(layers, 2, *widths, kernel_size=kernel_size, quantization_channels=LEVELS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 2.0 / widths[1] ** 0.5)
    return model.eval()


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0  # the outputs are not trivially small
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


# Widths (residual, dilation, skip) that differ from each other, so a transposed weight cannot go unnoticed:
# below one register tile of 32 columns, and above it with a remainder, whole or split across threads (in
# blocks of 16 columns: NARROW's 20 gated channels split as 16 and a part-block of 4). NARROW's odd residual and
# skip widths leave rows over after the kernel's rounds of 4 rows.
NARROW, WIDE = (9, 20, 13), (40, 80, 36)


@pytest.mark.parametrize(
    ("kernel_size", "widths", "batch", "threads", "split"),
    [
        (2, NARROW, 1, 1, True),
        (3, WIDE, 1, 2, True),  # one stream, its gated channels split across 2 threads
        (2, WIDE, 3, 3, True),  # one group of 3 streams split across 3 threads
        (3, NARROW, 8, 2, True),  # the largest group, split
        (3, WIDE, 5, 2, False),  # one group's worth of streams, as ranges of 2 and 3
        (3, NARROW, 11, 2, True),  # streams split across threads: 5 and 6
        (2, WIDE, 9, 1, True),  # groups of 8 and 1 on one thread
    ],
)
@needs_kernel
def test_teacher_forced_logits_equal_the_eager_step_and_the_full_forward(kernel_size, widths, batch, threads, split):
    model = random_wavenet(kernel_size, widths)
    longest_ring = max(layer.context for layer in model.layers)
    steps = model.receptive_field + 2 * longest_ring + 3  # every ring wraps twice
    x = torch.randint(0, LEVELS, (batch, steps + 20))
    context, inputs = x[:, :20], x[:, 20:].T.contiguous()
    with torch.inference_mode():
        expected = model(x).permute(2, 0, 1)[20:]  # (steps, B, Q)
        eager, native = IncrementalWaveNet(model, batch), IncrementalWaveNet(model, batch)
        eager.reset(context)
        native.reset(context)
        eager_out = torch.stack([eager.step(classes).clone() for classes in inputs])
        logits = torch.empty(steps, batch, LEVELS)
        out = torch.empty(steps, batch, dtype=torch.long)
        cpu_steps(native, inputs[0], out, forced=inputs, logits_out=logits, threads=threads, split=split)
    assert_relative_close(logits, eager_out)
    assert_relative_close(logits, expected)
    assert torch.equal(out, logits.argmax(dim=2))
    # The state is the eager path's too: same position, same rings (what later steps read).
    assert native.position == eager.position == steps
    assert_relative_close(native.rings, eager.rings)


@needs_kernel
@pytest.mark.parametrize("bf16_weights", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 5, 9])
def test_every_thread_plan_computes_the_same_bits(batch, bf16_weights):
    """The kernel picks its threads' plan by timing, so a seed would not reproduce samples if plans differed in
    the last bit: all of them must sum in the same order (NARROW splits its gated channels 16 + 4, WIDE 3 ways)."""
    for widths, threads in ((NARROW, 2), (WIDE, 3)):
        model = random_wavenet(3, widths)
        inputs = torch.randint(0, LEVELS, (model.receptive_field + 40, batch))
        results = []
        for plan_threads, split in ((1, False), (threads, True), (threads, False)):
            native = IncrementalWaveNet(model, batch)
            native.reset()
            logits = torch.empty(len(inputs), batch, LEVELS)
            out = torch.empty(len(inputs), batch, dtype=torch.long)
            with torch.inference_mode():
                cpu_steps(native, inputs[0], out, forced=inputs, logits_out=logits, threads=plan_threads, split=split,
                          bf16_weights=bf16_weights)  # fmt: skip
            results.append(logits)
        for logits in results[1:]:
            assert torch.equal(logits, results[0]), (widths, batch)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 13])
def test_sampled_classes_follow_the_same_noise_as_eager_and_turns_can_alternate(batch):
    """Chunks alternate between the kernel and the eager step on one state, with a device-side counter too."""
    model = random_wavenet(2, WIDE)
    noise = -0.9 * torch.log(-torch.log(torch.rand(5, 30, batch, LEVELS).clamp_min(1e-30)))
    with torch.inference_mode():
        for device_counter in (False, True):
            eager = IncrementalWaveNet(model, batch)
            mixed = IncrementalWaveNet(model, batch, device_counter=device_counter)
            eager.reset()
            mixed.reset()
            expected, sampled = [], []
            classes_eager = classes_mixed = torch.full((batch,), 3)
            for chunk in range(5):
                for index in range(30):
                    classes_eager = torch.argmax(eager.step(classes_eager) + noise[chunk, index], dim=1)
                    expected.append(classes_eager)
                out = torch.empty(30, batch, dtype=torch.long)
                if chunk % 2 == 0:
                    cpu_steps(mixed, classes_mixed, out, noise=noise[chunk].contiguous(), threads=2)
                else:
                    for index in range(30):
                        out[index] = torch.argmax(mixed.step(classes_mixed) + noise[chunk, index], dim=1)
                        classes_mixed = out[index]
                classes_mixed = out[-1]
                sampled.append(out)
            assert torch.equal(torch.cat(sampled), torch.stack(expected))
            if device_counter:
                assert int(mixed.phase) == 150 % mixed.period


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_fused_on_the_cpu_equals_eager_and_auto_picks_it(temperature):
    model = random_wavenet(3, NARROW)
    prime = torch.randint(0, LEVELS, (2, 40))

    def sample(method: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return generate(model, 150, 2, temperature, prime=prime, generator=generator, method=method)

    cpu = torch.device("cpu")
    small, medium, large = 641_600, 4_013_312, 47_509_760  # parameters of conf/model/
    assert resolve_method("auto", cpu, batch_size=2, parameters=small) == "fused"
    # Eager's batched matmuls catch up with more streams, and sooner for wider layers.
    assert resolve_method("auto", cpu, batch_size=405, parameters=small) == "fused"
    assert resolve_method("auto", cpu, batch_size=406, parameters=small) == "eager"
    assert resolve_method("auto", cpu, batch_size=64, parameters=medium) == "fused"
    assert resolve_method("auto", cpu, batch_size=65, parameters=medium) == "eager"
    assert resolve_method("auto", cpu, parameters=large) == "eager"  # it streams its weights from DRAM either way
    assert torch.equal(sample("fused"), sample("eager"))
    assert torch.equal(sample("auto"), sample("eager"))


@needs_kernel
@pytest.mark.parametrize(("widths", "batch", "threads"), [(WIDE, 1, 2), (NARROW, 1, 1), (WIDE, 9, 2), (NARROW, 3, 1)])
def test_bfloat16_weights_give_the_float32_steps_of_bfloat16_rounded_weights(widths, batch, threads):
    # The kernel's rewrites of the weights (halved gate, residual and skip; transposes) are exact in bfloat16,
    # so storing them in bfloat16 computes exactly what float32 weights of the same values do.
    rounded = random_wavenet(2, widths).bfloat16().float()
    steps = rounded.receptive_field + 40
    inputs = torch.randint(0, LEVELS, (steps, batch))
    with torch.inference_mode():
        eager, native = IncrementalWaveNet(rounded, batch), IncrementalWaveNet(rounded, batch)
        eager.reset()
        native.reset()
        expected = torch.stack([eager.step(classes).clone() for classes in inputs])
        logits = torch.empty(steps, batch, LEVELS)
        out = torch.empty(steps, batch, dtype=torch.long)
        cpu_steps(native, inputs[0], out, forced=inputs, logits_out=logits, threads=threads, bf16_weights=True)
    assert cpu_step._weights[native].tensors["filter_gate"].dtype == torch.bfloat16  # half the bytes, read
    assert_relative_close(logits, expected)


@needs_kernel
def test_a_bfloat16_model_generates_with_the_kernel_on_the_cpu(monkeypatch):
    model = random_wavenet(3, WIDE).bfloat16()
    cpu = torch.device("cpu")
    small, large = 641_600, 47_509_760
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=2) == "fused"
    # Where oneDNN multiplies bfloat16, eager's matmuls catch up later than float32's: `small` 1,028 streams, not
    # 405; `large` (91 MiB a step, streamed by eager too) at 13.
    monkeypatch.setattr("wavenet.generation._cpu_multiplies_bfloat16", lambda: True)
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=1028, parameters=small) == "fused"
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=1029, parameters=small) == "eager"
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=13, parameters=large) == "fused"
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=14, parameters=large) == "eager"
    # Where it emulates them (AVX2), they never catch up; float32 keeps its limit.
    monkeypatch.setattr("wavenet.generation._cpu_multiplies_bfloat16", lambda: False)
    assert resolve_method("auto", cpu, torch.bfloat16, batch_size=100_000, parameters=large) == "fused"
    assert resolve_method("auto", cpu, torch.float32, batch_size=406, parameters=small) == "eager"
    with pytest.raises(ValueError, match="its kernel runs float32 or bfloat16 weights, these are torch.float16"):
        resolve_method("fused", cpu, torch.float16)
    with pytest.raises(ValueError, match="float32"):  # the stepper itself stays float32
        cpu_steps(IncrementalWaveNet(model, 1), *_chunk_arguments(1))

    def sample(model: WaveNet) -> torch.Tensor:
        return generate(model, 120, 2, 0.9, generator=torch.Generator().manual_seed(3), method="fused")

    # The same samples as float32 weights of the same values: bfloat16 weights, float32 arithmetic.
    assert torch.equal(sample(model), sample(copy.deepcopy(model).float()))
    assert model.embedding.weight.dtype == torch.bfloat16  # the caller's model is left as it was


def _chunk_arguments(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, dtype=torch.long), torch.empty(4, batch, dtype=torch.long)


def test_without_a_compiler_auto_stays_eager_and_fused_names_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WAVENET_CACHE_DIR", str(tmp_path))  # an empty cache: the kernel must be built
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++
    cpu_step._library.cache_clear()
    generation._warn_once.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert resolve_method("auto", cpu) == "eager"
        assert resolve_method("auto", cpu) == "eager"
        # Said once, with the reason: a user should know why generation runs at a third of its speed.
        assert caplog.text.count("Generating eagerly") == 1 and "no C++ compiler found" in caplog.text
        with pytest.raises(ValueError, match="no C\\+\\+ compiler found"):
            resolve_method("fused", cpu)
        with pytest.raises(RuntimeError, match="CPU generation kernel is not available"):
            cpu_steps(IncrementalWaveNet(random_wavenet(2, NARROW), 1), *_chunk_arguments(1))
    finally:
        cpu_step._library.cache_clear()


# What ctypes looks up in the library: a source that builds in a fraction of a second, where the kernel's own takes
# 15 s (the kernel tests build that one, into the session's cache).
STAND_IN_SOURCE = """
extern "C" void wavenet_cpu_steps() {}
extern "C" long long wavenet_cpu_block() { return 0; }
"""


@pytest.fixture
def stand_in_source(monkeypatch, tmp_path) -> Iterator[Path]:
    """The stand-in as the kernel's source, built into an empty cache at `tmp_path / "cache"`."""
    monkeypatch.setenv("WAVENET_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "stand_in.cpp"
    source.write_text(STAND_IN_SOURCE)
    monkeypatch.setattr(cpu_step, "_SOURCE", source)
    cpu_step._library.cache_clear()
    yield source
    cpu_step._library.cache_clear()


@needs_compiler
def test_the_build_is_cached_per_machine_and_a_failed_build_leaves_nothing(stand_in_source, tmp_path):
    kernels = tmp_path / "cache" / "kernels"
    assert cpu_kernel_available()
    lock, library = sorted(kernels.iterdir())  # nothing else: the scratch folder is gone
    assert library.name.startswith("cpu_step-") and library.suffix == ".so" and lock.name == ".build.lock"
    built = library.stat().st_mtime_ns
    cpu_step._library.cache_clear()
    assert cpu_kernel_available()  # found again, not rebuilt
    assert library.stat().st_mtime_ns == built

    # A compiler that fails (a source it cannot build): the reason comes back, and no library is left.
    stand_in_source.write_text("this is not C++\n")
    cpu_step._library.cache_clear()
    assert "could not build stand_in.cpp" in cpu_step.cpu_kernel_problem()
    assert sorted(path.name for path in kernels.iterdir()) == [".build.lock", library.name]


@needs_compiler
def test_processes_that_need_the_kernel_at_once_build_it_once(stand_in_source, monkeypatch, tmp_path):
    # A job array of generate.py runs on a new machine: without the lock, each process built its own.
    builds, build = tmp_path / "builds", cpu_step._build

    def counted_build(compiler: str, path: Path) -> str | None:
        with builds.open("a") as file:
            file.write(f"{os.getpid()}\n")
        return build(compiler, path)

    monkeypatch.setattr(cpu_step, "_build", counted_build)
    children = []
    for _ in range(3):
        child = os.fork()
        if child == 0:
            status = 1
            try:
                status = 0 if cpu_kernel_available() else 2
            finally:
                os._exit(status)
        children.append(child)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) for child in children]
    assert statuses == [0, 0, 0]
    assert len(builds.read_text().splitlines()) == 1


@needs_compiler
def test_an_unwritable_cache_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be\n")  # unwritable even for root
    monkeypatch.setenv("WAVENET_CACHE_DIR", str(not_a_folder))
    cpu_step._library.cache_clear()
    try:
        assert "could not write the CPU kernel to" in cpu_step.cpu_kernel_problem()
        assert resolve_method("auto", torch.device("cpu")) == "eager"
        assert not_a_folder.read_text() == "a file where the cache folder should be\n"
    finally:
        cpu_step._library.cache_clear()


def test_the_thread_count_follows_the_load_on_the_machine():
    from wavenet.kernels.cpu_step import _RETRY_EVERY, Plan, _ThreadChoice

    choice = _ThreadChoice(most=2, batch=1)
    both, one = Plan(2, True), Plan(1, False)
    assert choice.candidates == [both, one]
    seconds_per_step = {both: 5e-4, one: 1e-4}  # beside a busy process: a barrier per layer waits on a lost core

    def run(calls: int) -> list[Plan]:
        picks = []
        for _ in range(calls):
            plan = choice.pick()
            picks.append(plan)
            choice.record(plan, seconds_per_step[plan] * 64, 64)
        return picks

    picks = run(3 * _RETRY_EVERY)
    assert picks[:4] == [both, one, both, one]  # each candidate timed twice: a first call is slow
    assert picks.count(both) == 2 + 3  # then only the retries, one call in _RETRY_EVERY
    seconds_per_step[both] = 0.5e-4  # the other process is gone
    assert run(_RETRY_EVERY)[-1] == both  # noticed at the next retry
    assert set(run(_RETRY_EVERY - 1)) == {both}
    # Alone on the machine, a call slowed down by an interrupt now and then does not switch plans.
    seconds_per_step[one] = 1.45e-4
    for call in range(5 * _RETRY_EVERY):
        seconds_per_step[both] = 1.7e-4 if call % 7 == 0 else 1.1e-4
        plan = choice.pick()
        assert plan == both or choice.calls % _RETRY_EVERY == 0
        choice.record(plan, seconds_per_step[plan] * 64, 64)
    alone = _ThreadChoice(most=1, batch=4)  # torch on one thread: nothing to choose, nothing to retry
    for _ in range(2 * _RETRY_EVERY):
        assert alone.pick() == one
        alone.record(one, 1e-3, 64)
    assert _ThreadChoice(most=2, batch=9).candidates == [Plan(2, False), one]  # more than one group: ranges


def test_a_few_streams_take_the_faster_of_split_channels_and_ranges_and_retry_the_others_in_turn():
    from wavenet.kernels.cpu_step import _RETRY_EVERY, Plan, _ThreadChoice

    choice = _ThreadChoice(most=2, batch=4)
    split, ranges, one = Plan(2, True), Plan(2, False), Plan(1, False)
    assert choice.candidates == [split, ranges, one]
    seconds_per_step = {split: 3e-5, ranges: 2e-5, one: 4e-5}  # weights that fit one core's L2: ranges win
    picks = []
    for _ in range(4 * _RETRY_EVERY):
        plan = choice.pick()
        picks.append(plan)
        choice.record(plan, seconds_per_step[plan] * 64, 64)
    assert picks[:6] == [split, ranges, one] * 2
    retries = [picks[call - 1] for call in range(_RETRY_EVERY, len(picks) + 1, _RETRY_EVERY)]
    assert set(retries) == {split, one}  # both others, in turn
    assert {plan for call, plan in enumerate(picks[6:], 7) if call % _RETRY_EVERY} == {ranges}
