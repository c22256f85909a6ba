"""Incremental generation equals the full forward; sampling is seeded and greedy is argmax; generate.py."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import run_script, save_checkpoint
from wavenet.data.mulaw import mu_law_decode, mu_law_encode
from wavenet.generation import IncrementalWaveNet, generate
from wavenet.models.wavenet import WaveNet
from wavenet.module import WaveNetModule

LEVELS = 32  # fewer mu-law classes than 256 keep the tests fast and the softmax check well populated


def random_wavenet(kernel_size: int = 2, layers: int = 6, stacks: int = 2, bias: bool = True) -> WaveNet:
    """A small WaveNet with weights large enough that every layer, bias and gate moves the logits."""
    torch.manual_seed(kernel_size * 100 + layers * 10 + stacks)
    # Dilation width differs from the residual width, so a transposed weight cannot go unnoticed.
    model = WaveNet(layers, stacks, 8, 6, 12, kernel_size=kernel_size, quantization_channels=LEVELS, bias=bias)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def teacher_forced(model: WaveNet, x: torch.Tensor, context: int = 0, device_counter: bool = False) -> torch.Tensor:
    """(B, Q, T - context) logits of the incremental model stepping through x after resetting to x[:, :context]."""
    stepper = IncrementalWaveNet(model, x.shape[0], device_counter=device_counter)
    with torch.inference_mode():
        stepper.reset(x[:, :context])
        return torch.stack([stepper.step(x[:, t]).clone() for t in range(context, x.shape[1])], dim=2)


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0  # the outputs are not trivially small
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize(
    ("kernel_size", "layers", "stacks", "bias"),
    [(2, 6, 2, True), (2, 8, 1, True), (3, 6, 3, True), (3, 8, 2, True), (2, 6, 2, False), (3, 4, 2, False)],
)
def test_teacher_forced_incremental_logits_equal_the_full_forward(kernel_size, layers, stacks, bias):
    model = random_wavenet(kernel_size, layers, stacks, bias)
    # Long enough for every ring buffer to wrap around more than once.
    x = torch.randint(0, LEVELS, (3, 2 * model.receptive_field + 7))
    with torch.inference_mode():
        expected = model(x)
    assert_relative_close(teacher_forced(model, x), expected)
    # The CUDA-graph step, ring positions from the device-side counter, is the same function.
    assert_relative_close(teacher_forced(model, x, device_counter=True), expected)


def test_the_device_counter_step_after_a_reset_to_a_context_equals_the_full_forward():
    model = random_wavenet(3)
    x = torch.randint(0, LEVELS, (2, 100))
    with torch.inference_mode():
        expected = model(x)[:, :, 37:]
    assert_relative_close(teacher_forced(model, x, 37, device_counter=True), expected)


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("context", [1, 10, 100])
def test_state_reset_to_a_context_equals_the_full_forward_after_it(kernel_size, context):
    model = random_wavenet(kernel_size)  # receptive field 15 (kernel 2) or 29 (kernel 3): contexts below/above
    x = torch.randint(0, LEVELS, (2, context + 40))
    with torch.inference_mode():
        expected = model(x)[:, :, context:]
    assert_relative_close(teacher_forced(model, x, context), expected)


def test_reset_in_groups_of_streams_equals_reset_at_once(monkeypatch):
    model = random_wavenet(3)
    x = torch.randint(0, LEVELS, (3, 60))
    with torch.inference_mode():
        expected = model(x)[:, :, 20:]
    monkeypatch.setattr("wavenet.generation._RESET_ELEMENTS", 1)  # one stream at a time
    assert_relative_close(teacher_forced(model, x, 20), expected)


def test_seeded_sampling_is_reproducible():
    model = random_wavenet(3)
    prime = torch.randint(0, LEVELS, (50,))

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, 300, batch_size=4, temperature=0.9, prime=prime, generator=generator)

    first = sample(1)
    assert first.shape == (4, 300) and first.dtype == torch.long
    assert torch.equal(first, sample(1))
    assert not torch.equal(first, sample(2))
    assert not torch.equal(first[0], first[1])  # streams are independent


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_greedy_generation_is_the_argmax_of_the_full_forward_on_its_own_output(kernel_size):
    model = random_wavenet(kernel_size)
    batch, steps = 3, 200
    unprimed = generate(model, steps, batch_size=batch, temperature=0.0)
    silence = torch.full((batch, 1), model.silence_class)
    with torch.inference_mode():
        # Output t of the full forward predicts input t + 1; without a prime the first input is silence.
        expected = model(torch.cat([silence, unprimed[:, :-1]], dim=1)).argmax(dim=1)
    assert torch.equal(unprimed, expected)

    prime = torch.randint(0, LEVELS, (batch, 40))
    primed = generate(model, steps, batch_size=batch, temperature=0.0, prime=prime)
    with torch.inference_mode():
        expected = model(torch.cat([prime, primed[:, :-1]], dim=1))[:, :, prime.shape[1] - 1 :].argmax(dim=1)
    assert torch.equal(primed, expected)
    assert not torch.equal(primed, unprimed)


def test_sampling_follows_the_softmax_at_the_temperature():
    model, temperature, streams = random_wavenet(), 0.7, 20_000
    first = generate(model, 1, batch_size=streams, temperature=temperature, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(torch.full((1, 1), model.silence_class))[0, :, 0]
    expected = torch.softmax(logits / temperature, dim=0)
    counts = torch.bincount(first[:, 0], minlength=LEVELS).double()
    observed = counts / streams
    # 5 standard deviations of a frequency estimated from 20,000 draws, at the largest probability.
    assert (observed - expected).abs().max() < 5 * math.sqrt(expected.max() / streams)

    def chi_square(probabilities: torch.Tensor) -> tuple[float, int]:
        """Pearson's statistic over the classes expected at least 5 times, and its degrees of freedom."""
        expected_counts = streams * probabilities.double()
        kept = expected_counts >= 5
        return float(((counts[kept] - expected_counts[kept]) ** 2 / expected_counts[kept]).sum()), int(kept.sum()) - 1

    statistic, freedom = chi_square(expected)
    assert statistic < freedom + 4.5 * math.sqrt(2 * freedom)  # about its 0.1 % critical value (fixed seed)
    for wrong in (0.6, 0.8, 1.0):  # a temperature a little off is rejected
        statistic, freedom = chi_square(torch.softmax(logits / wrong, dim=0))
        assert statistic > freedom + 10 * math.sqrt(2 * freedom), wrong


def test_bfloat16_steps_keep_the_distribution_of_float32():
    torch.manual_seed(0)
    model = WaveNet(10, 2, 32, 32, 64, kernel_size=3)
    with torch.no_grad():
        for parameter in model.parameters():
            # Peaked, like a trained model's: about 3.5 nats of entropy per sample, not a uniform 5.5.
            parameter.normal_(0.0, 0.2)
    x = torch.randint(0, model.quantization_channels, (2, 300))
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)
    observed = torch.softmax(teacher_forced(copy.deepcopy(model).bfloat16(), x).float(), dim=1)
    total_variation = 0.5 * (observed - expected).abs().sum(dim=1)
    assert total_variation.mean() < 0.02 and total_variation.max() < 0.06
    assert total_variation.mean() > 1e-4  # bfloat16 did run: float32 would agree to ~1e-6


def test_a_shared_prime_equals_the_same_prime_per_stream():
    model = random_wavenet()
    prime = torch.randint(0, LEVELS, (30,))
    shared = generate(model, 50, batch_size=2, temperature=0.0, prime=prime)
    per_stream = generate(model, 50, batch_size=2, temperature=0.0, prime=prime.expand(2, -1))
    assert torch.equal(shared, per_stream)


def test_a_lightning_module_generates_like_its_network():
    module = WaveNetModule(layers=4, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=8)
    assert torch.equal(generate(module, 30, temperature=0.0), generate(module.model, 30, temperature=0.0))


@pytest.mark.parametrize(
    "prime",
    [torch.zeros(0, dtype=torch.long), torch.zeros(5), torch.full((7,), LEVELS), torch.zeros(3, 5, dtype=torch.long)],
    ids=["empty", "float", "out-of-range", "wrong-batch"],
)
def test_bad_primes_are_refused(prime):
    with pytest.raises(ValueError, match="prime"):
        generate(random_wavenet(), 10, batch_size=2, prime=prime)


def test_a_prime_of_audio_says_how_to_encode_it_and_integer_classes_of_any_width_prime():
    model = random_wavenet()
    audio = 0.5 * torch.sin(torch.arange(40) / 3)
    with pytest.raises(ValueError, match=rf"float32 audio: encode it with wavenet.mu_law_encode\(prime, {LEVELS}\)"):
        generate(model, 10, prime=audio)
    classes = mu_law_encode(audio, LEVELS)
    expected = generate(model, 10, temperature=0.0, prime=classes)
    for dtype in (torch.uint8, torch.int32):  # uint8: as mu-law classes are stored
        assert torch.equal(generate(model, 10, temperature=0.0, prime=classes.to(dtype)), expected)


BAD_ARGUMENTS = {
    "batch_size 0": ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
    "batch_size float": ({"batch_size": 2.0}, TypeError, "batch_size must be an integer, got 2.0"),
    "batch_size bool": ({"batch_size": True}, TypeError, "batch_size must be an integer, got True"),
    "num_samples fraction": ({"num_samples": 2.5}, TypeError, "num_samples must be an integer, got 2.5"),
    "num_samples text": ({"num_samples": "10"}, TypeError, "num_samples must be an integer, got '10'"),
    "temperature None": ({"temperature": None}, TypeError, "temperature must be a number, got NoneType"),
    "temperature nan": ({"temperature": math.nan}, ValueError, "temperature must be 0 .greedy. or more"),
    "temperature past float32": ({"temperature": 1e38}, ValueError, "at most 2e\\+37, got 1e\\+38"),
    "prime list": ({"prime": [1, 2]}, TypeError, "prime must be a tensor of mu-law classes or None, got list"),
    "generator int": ({"generator": 0}, TypeError, "generator must be a torch.Generator or None, got int"),
    "progress": ({"progress": 1}, TypeError, "progress must be callable or None, got int"),
    "out shape": ({"out": torch.empty(2, 5, dtype=torch.long)}, ValueError, "out must be int64 \\(1, 10\\) on cpu"),
    "model None": ({"model": None}, TypeError, "model must be a WaveNet or a module holding one as .model"),
    "model Linear": ({"model": torch.nn.Linear(2, 2)}, TypeError, "holding one as .model, got Linear"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_generate_names_a_bad_argument_before_any_work(case):
    overrides, error, message = BAD_ARGUMENTS[case]
    arguments = {"model": random_wavenet(), "num_samples": 10, **overrides}
    with pytest.raises(error, match=message):
        generate(**arguments)


def test_the_largest_temperature_samples_every_class_without_overflow():
    from wavenet.temperature import MAX_TEMPERATURE

    assert MAX_TEMPERATURE == float(torch.finfo(torch.float32).max) / 17  # its float32 bound, written without torch
    # Noise scaled past float32's range was inf for many classes at once; the argmax of such ties is the lowest.
    classes = generate(random_wavenet(), 1, batch_size=4000, temperature=MAX_TEMPERATURE)
    counts = torch.bincount(classes[:, 0], minlength=LEVELS)
    assert counts.min() > 60 and counts.max() < 200  # all but uniform: 125 each


def test_generation_writes_into_out_as_it_goes():
    model, out = random_wavenet(), torch.full((2, 100), -1)
    seen = []
    classes = generate(model, 100, 2, temperature=0.0, out=out, progress=lambda steps: seen.append(out[0].clone()))
    assert classes is out and torch.equal(out, generate(model, 100, 2, temperature=0.0))
    assert (seen[0][:64] >= 0).all() and (seen[0][64:] == -1).all()  # a chunk is in place when it is reported


@pytest.mark.parametrize(
    ("method", "message"),
    [("fast", "method must be one of"), ("cuda_graph", "needs a CUDA device")],
)
def test_methods_that_cannot_run_here_are_refused(method, message):
    if torch.cuda.is_available() and method != "fast":
        pytest.skip("they run on a GPU")
    with pytest.raises(ValueError, match=message):
        generate(random_wavenet(), 10, method=method)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fused_generation_through_the_triton_interpreter_equals_eager_generation(monkeypatch, temperature):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel on CPU tensors; wavenet.kernels isolates it
    model = WaveNet(4, 2, 16, 16, 16, kernel_size=3, quantization_channels=LEVELS)
    prime = torch.randint(0, LEVELS, (3, 20))

    def sample(method: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        # 70 steps: a full chunk of 64, then a shorter one.
        return generate(model, 70, 3, temperature, prime=prime, generator=generator, method=method)

    assert torch.equal(sample("fused"), sample("eager"))


# --- The GPU paths, against the eager path on the same GPU ------------------------------------------------


@pytest.fixture
def exact_cuda(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The GPU with TF32 off, so that fp32 convolutions and matmuls are as exact as on the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_cuda_graph_teacher_forced_logits_equal_the_full_forward(exact_cuda, kernel_size):
    from wavenet.generation import CudaGraphSampler

    model = random_wavenet(kernel_size).to(exact_cuda)
    x = torch.randint(0, LEVELS, (3, 2 * model.receptive_field + 7), device=exact_cuda)
    with torch.inference_mode():
        expected = model(x)
        stepper = IncrementalWaveNet(model, 3, device_counter=True)
        graph = CudaGraphSampler(stepper, 1, sampling=False)
        stepper.reset()
        logits = []
        for t in range(x.shape[1]):
            graph(x[:, t], torch.empty(1, 3, dtype=torch.long, device=exact_cuda), None)
            logits.append(stepper.logits.clone())
    assert_relative_close(torch.stack(logits, dim=2), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cuda_graph", "fused"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_gpu_generation_paths_equal_eager_generation_on_the_gpu(exact_cuda, method, temperature):
    model = random_wavenet(3).to(exact_cuda)
    prime = torch.randint(0, LEVELS, (4, 50), device=exact_cuda)

    def sample(method: str) -> torch.Tensor:
        generator = torch.Generator(exact_cuda).manual_seed(3)
        # 150 steps: two full chunks (from the graph), then a shorter one (run eagerly by cuda_graph).
        return generate(model, 150, 4, temperature, prime=prime, generator=generator, method=method)

    fast = sample(method)
    assert torch.equal(fast, sample("eager"))
    if temperature == 0:
        with torch.inference_mode():
            expected = model(torch.cat([prime, fast[:, :-1]], dim=1))[:, :, prime.shape[1] - 1 :].argmax(dim=1)
        assert torch.equal(fast, expected)


# --- generate.py, as users run it -------------------------------------------------------------------------

SAMPLE_RATE = 8000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model saved the way Lightning saves one, without running a Trainer."""
    module = WaveNetModule(
        layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16, sample_rate=SAMPLE_RATE
    )
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.ckpt"
    return save_checkpoint(module, path, **{"pytorch-lightning_version": L.__version__})


@pytest.mark.slow
def test_generate_script_writes_pcm_wavs_at_the_models_rate(tmp_path, checkpoint):
    # A prime at another rate than the model's, so that it goes through resampling.
    prime = tmp_path / "prime.wav"
    sf.write(prime, 0.5 * np.sin(np.linspace(0, 200 * np.pi, 11025)).astype(np.float32), 22050)
    run_dir = tmp_path / "run"
    result = run_script(
        "generate.py",
        f"ckpt_path={checkpoint}",
        "num_samples=1234",
        "batch_size=2",
        "seed=1",
        f"prime={prime}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(run_dir.glob("*.wav"))
    assert [file.name for file in files] == ["sample_000.wav", "sample_001.wav"]
    for file in files:
        info = sf.info(file)
        assert (info.frames, info.samplerate, info.channels) == (1234, SAMPLE_RATE, 1)
        assert (info.format, info.subtype) == ("WAV", "PCM_16")
    assert "Wrote 2 file(s)" in (run_dir / "generate.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["checkpoint", "prime"])
def test_generate_script_names_a_missing_file_in_one_line(tmp_path, checkpoint, problem):
    missing = tmp_path / "missing.file"
    ckpt_path, prime = (missing, "null") if problem == "checkpoint" else (checkpoint, missing)
    result = run_script("generate.py", f"ckpt_path={ckpt_path}", f"prime={prime}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr


def test_generate_task_uses_the_ema_weights_when_the_checkpoint_has_them(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.ema import EMA_STATE_KEY
    from wavenet.tasks.generate import run

    saved = torch.load(checkpoint, weights_only=False)
    averaged = WaveNetModule(**saved["hyper_parameters"])  # other random weights: the "average"
    saved[EMA_STATE_KEY] = averaged.state_dict()
    path = tmp_path / "with_ema.ckpt"
    torch.save(saved, path)

    def greedy(use_ema: bool) -> np.ndarray:
        overrides = [f"ckpt_path={path}", "num_samples=300", "temperature=0", f"use_ema={use_ema}", "device=cpu"]
        cfg = compose_config("generate", overrides, tmp_path / f"ema_{use_ema}")
        (wav,) = run(cfg)
        return sf.read(wav, dtype="float32")[0]

    expected = mu_law_decode(generate(averaged.model.eval(), 300, temperature=0))[0].numpy()
    with_ema = greedy(True)
    np.testing.assert_allclose(with_ema, expected, atol=1 / 16384)  # up to 16-bit PCM rounding
    assert np.abs(with_ema - greedy(False)).max() > 0.01


def test_load_for_generation_takes_the_ema_weights_as_asked(tmp_path, checkpoint, caplog):
    from wavenet.checkpoint import load_wavenet
    from wavenet.ema import EMA_STATE_KEY
    from wavenet.errors import UserError

    saved = torch.load(checkpoint, weights_only=False)
    averaged = WaveNetModule(**saved["hyper_parameters"]).state_dict()  # other random weights: the "average"
    with_ema = tmp_path / "with_ema.ckpt"
    torch.save({**saved, EMA_STATE_KEY: averaged}, with_ema)

    for path, use_ema, expected in [
        (with_ema, "auto", averaged),
        (with_ema, True, averaged),
        (with_ema, False, saved["state_dict"]),
        (checkpoint, "auto", saved["state_dict"]),
    ]:
        loaded = WaveNetModule.load_for_generation(path, use_ema=use_ema)
        assert not loaded.training
        torch.testing.assert_close(loaded.state_dict(), expected, rtol=0, atol=0)
        network, hparams = load_wavenet(path, use_ema=use_ema)  # generate.py's, without Lightning
        assert not network.training and hparams == saved["hyper_parameters"]
        torch.testing.assert_close(network.state_dict(), loaded.model.state_dict(), rtol=0, atol=0)
    with pytest.raises(UserError, match=f"use_ema=true but checkpoint {checkpoint} has no EMA weights"):
        WaveNetModule.load_for_generation(checkpoint, use_ema=True)
    with pytest.raises(ValueError, match="use_ema must be 'auto', True or False, got 1"):
        WaveNetModule.load_for_generation(checkpoint, use_ema=1)
    with pytest.raises(UserError, match=f"use_ema=true but checkpoint {checkpoint} has no EMA weights"):
        load_wavenet(checkpoint, use_ema=True)
    # Which weights, said either way.
    with caplog.at_level(logging.INFO, logger="wavenet.checkpoint"):
        load_wavenet(with_ema)
        load_wavenet(checkpoint)
    assert [record.getMessage() for record in caplog.records] == [
        f"Using the EMA weights of {with_ema}",
        f"Using the training weights of {checkpoint}: it holds no EMA weights (trained without callbacks.ema, or saved "
        "with weights only)",
    ]


def test_generate_task_names_the_method_that_cannot_run_here(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.errors import UserError
    from wavenet.tasks.generate import run

    cfg = compose_config("generate", [f"ckpt_path={checkpoint}", "method=cuda_graph", "device=cpu"], tmp_path)
    with pytest.raises(UserError, match="method=cuda_graph: .*needs a CUDA device"):
        run(cfg)
    assert not list(tmp_path.glob("*.wav"))


def test_file_names_sort_in_stream_order_past_a_thousand_streams(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.tasks.generate import run

    overrides = [f"ckpt_path={checkpoint}", "num_samples=3", "batch_size=1001", "device=cpu", "seed=0"]
    paths = run(compose_config("generate", overrides, tmp_path))
    names = [path.name for path in paths]
    assert names[:2] == ["sample_0000.wav", "sample_0001.wav"] and names[-1] == "sample_1000.wav"
    assert sorted(path.name for path in tmp_path.glob("sample_*.wav")) == names


def test_generate_task_runs_in_bfloat16_and_refuses_other_precisions(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.errors import UserError
    from wavenet.tasks.generate import run

    overrides = [f"ckpt_path={checkpoint}", "num_samples=200", "device=cpu", "seed=0"]
    (wav,) = run(compose_config("generate", [*overrides, "precision=bf16"], tmp_path / "bf16"))
    assert sf.info(wav).frames == 200
    with pytest.raises(UserError, match="precision must be 32 or bf16, got 16"):
        run(compose_config("generate", [*overrides, "precision=16"], tmp_path / "16"))


def bad_inputs(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    """Overrides a user could type, each with the start of the one error it must give (found in an audit)."""
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:2000])
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(800, np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    diverged = tmp_path / "diverged.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    saved["state_dict"]["model.embedding.weight"][0, 0] = math.nan
    torch.save(saved, diverged)
    no_rate = tmp_path / "no_rate.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    saved["hyper_parameters"]["sample_rate"] = 0
    torch.save(saved, no_rate)
    # A setting of the network that differs from its weights': an older checkpoint without the setting, say.
    misfit = tmp_path / "misfit.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    saved["hyper_parameters"]["residual_channels"] *= 2
    torch.save(saved, misfit)
    loud = tmp_path / "integer_units.wav"  # int16 values saved as float: mu-law would make it a square wave
    sf.write(loud, np.linspace(-3000, 3000, 800, dtype=np.float32), SAMPLE_RATE, subtype="FLOAT")
    return {
        "nan temperature": (["temperature=nan"], "temperature must be a number"),
        "inf temperature": (["temperature=inf"], "temperature must be a number"),
        "text num_samples": (["num_samples=abc"], "num_samples must be a positive integer, got 'abc'"),
        "fractional batch": (["batch_size=2.5"], "batch_size must be a positive integer, got 2.5"),
        "text seed": (["seed=abc"], "seed must be an integer or null"),
        "use_ema no": (["use_ema=no"], "use_ema must be auto, true or false, got 'no'"),
        # Naming a file to give instead: the folder holds this test's broken checkpoints.
        "folder checkpoint": ([f"ckpt_path={tmp_path}"], f"checkpoint {tmp_path} is a folder, not a file; it holds "),
        "text checkpoint": ([f"ckpt_path={text}"], f"{text} is not a PyTorch checkpoint"),
        "cut checkpoint": ([f"ckpt_path={cut}"], f"{cut} is not a PyTorch checkpoint"),
        "folder prime": ([f"prime={tmp_path}"], f"prime {tmp_path} is a folder"),
        "nan prime": ([f"prime={nan}"], f"prime file {nan} holds NaN"),
        "loud prime": ([f"prime={loud}"], f"prime file {loud}: samples reach 3000, far outside audio's [-1, 1]"),
        "diverged checkpoint": ([f"ckpt_path={diverged}"], f"checkpoint {diverged}: its "),
        "rateless checkpoint": ([f"ckpt_path={no_rate}"], f"cannot load the model of checkpoint {no_rate}: it has no"),
        # Torch's first line alone named no mismatch: "RuntimeError: Error(s) in loading state_dict for WaveNet:".
        "misfit checkpoint": (
            [f"ckpt_path={misfit}"],
            f"cannot load the model of checkpoint {misfit}: its weights do not fit the network its hyperparameters "
            "give: size mismatch for embedding.weight: copying a param with shape torch.Size([256, ",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["nan temperature", "inf temperature", "text num_samples", "fractional batch", "text seed", "use_ema no",
     "folder checkpoint", "text checkpoint", "cut checkpoint", "folder prime", "nan prime", "loud prime",
     "diverged checkpoint", "rateless checkpoint", "misfit checkpoint"],
)  # fmt: skip
def test_generate_task_refuses_bad_input_naming_the_key_or_file(tmp_path, checkpoint, case):
    from tests.conftest import compose_config
    from wavenet.errors import UserError
    from wavenet.tasks.generate import run

    overrides, message = bad_inputs(tmp_path, checkpoint)[case]
    cfg = compose_config("generate", [f"ckpt_path={checkpoint}", "device=cpu", *overrides], tmp_path / "run")
    with pytest.raises(UserError) as error:
        run(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_generate_task_takes_the_cpu_by_index_as_torch_names_it(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.tasks.generate import run

    (wav,) = run(compose_config("generate", [f"ckpt_path={checkpoint}", "num_samples=50", "device=cpu:0"], tmp_path))
    assert sf.info(wav).frames == 50  # torch.load cannot map to cpu:0: it blamed the checkpoint


def test_generate_task_never_writes_over_the_samples_of_an_earlier_run(tmp_path, checkpoint):
    from tests.conftest import compose_config
    from wavenet.errors import UserError
    from wavenet.tasks.generate import run

    overrides = [f"ckpt_path={checkpoint}", "num_samples=100", "device=cpu", "batch_size=2"]
    first = run(compose_config("generate", overrides, tmp_path))
    written = [path.read_bytes() for path in first]
    with pytest.raises(UserError, match="already holds 2 sample_\\*.wav of an earlier run"):
        run(compose_config("generate", [*overrides, "batch_size=1"], tmp_path))
    assert [path.read_bytes() for path in first] == written


def test_generate_task_continues_the_last_receptive_field_of_the_prime_from_the_seed(tmp_path):
    from tests.conftest import compose_config
    from wavenet.data.audio import read_audio
    from wavenet.data.mulaw import mu_law_encode
    from wavenet.tasks.generate import run

    torch.manual_seed(0)
    module = WaveNetModule(layers=4, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16,
                           quantization_channels=32, sample_rate=SAMPLE_RATE)  # fmt: skip
    with torch.no_grad():  # samples that depend on their context (entropy ~2.4 nats of 3.5): the prime matters
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5) if parameter.dim() > 1 else parameter.zero_()
    path = save_checkpoint(module, tmp_path / "strong.ckpt")
    field = module.receptive_field
    rng = np.random.default_rng(0)
    prime = (0.5 * rng.standard_normal(3 * field)).astype(np.float32)
    older_differs = prime.copy()
    older_differs[:field] = 0.0  # only samples before the last receptive field differ
    last_differs = prime.copy()
    last_differs[-field:] = -last_differs[-field:]

    def task(audio: np.ndarray, seed: int, name: str) -> np.ndarray:
        sf.write(tmp_path / f"{name}.wav", audio, SAMPLE_RATE, subtype="FLOAT")
        overrides = [f"ckpt_path={path}", "num_samples=400", "batch_size=2", f"seed={seed}", "device=cpu",
                     "method=eager", f"prime={tmp_path / name}.wav"]  # fmt: skip
        wavs = run(compose_config("generate", overrides, tmp_path / name))
        return np.stack([sf.read(wav, dtype="float32")[0] for wav in wavs])

    written = task(prime, 1, "prime")
    read_back = read_audio(tmp_path / "prime.wav", SAMPLE_RATE)
    with torch.no_grad():
        classes = generate(
            module.model.eval(), 400, batch_size=2, prime=mu_law_encode(read_back[-field:], 32),
            generator=torch.Generator().manual_seed(1), method="eager",
        )  # fmt: skip
    np.testing.assert_allclose(written, mu_law_decode(classes, 32).numpy(), atol=1 / 16384)  # 16-bit PCM rounding
    assert not np.array_equal(written[0], written[1])  # two streams, not one copied
    np.testing.assert_array_equal(task(prime, 1, "again"), written)  # the seed reproduces the files
    assert not np.array_equal(task(prime, 2, "other_seed"), written)
    np.testing.assert_array_equal(task(older_differs, 1, "older"), written)  # older samples cannot matter
    assert not np.array_equal(task(last_differs, 1, "last"), written)


def test_a_prime_shorter_than_the_receptive_field_is_said_to_follow_silence(tmp_path, checkpoint, caplog):
    from tests.conftest import compose_config
    from wavenet.tasks.generate import run

    short = tmp_path / "short.wav"
    sf.write(short, np.full(5, 0.25, np.float32), SAMPLE_RATE)
    caplog.set_level(logging.INFO, logger="wavenet.tasks.generate")
    overrides = [f"ckpt_path={checkpoint}", "num_samples=20", "device=cpu", f"prime={short}"]
    run(compose_config("generate", overrides, tmp_path / "run"))
    field = WaveNetModule.load_for_generation(checkpoint).receptive_field
    assert f"The prime's 5 samples are fewer than the receptive field's {field}: silence comes before them" in caplog.text
