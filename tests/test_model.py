"""The network's contract: shapes, causality, receptive field, and mu-law coding."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from wavenet import WaveNet, mu_law_decode, mu_law_encode

SHAPES = {
    # name: (constructor kwargs, receptive field)
    "k2": (dict(layers=6, stacks=2, residual_channels=8, dilation_channels=8, skip_channels=16), 15),
    "k3": (dict(layers=6, stacks=3, residual_channels=8, dilation_channels=6, skip_channels=12, kernel_size=3), 19),
    "one_stack": (dict(layers=4, stacks=1, residual_channels=4, dilation_channels=4, skip_channels=4), 16),
}


def make(name: str, seed: int = 0) -> WaveNet:
    torch.manual_seed(seed)
    return WaveNet(**SHAPES[name][0]).double()


@pytest.mark.parametrize("name", SHAPES)
def test_receptive_field_formula(name):
    assert make(name).receptive_field == SHAPES[name][1]


def test_paper_sizes_receptive_fields():
    small = WaveNet(20, 2, 64, 64, 128, kernel_size=2)
    medium = WaveNet(30, 3, 128, 128, 128, kernel_size=3)
    large = WaveNet(30, 3, 512, 512, 512, kernel_size=2)
    assert small.dilations[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert (small.receptive_field, medium.receptive_field, large.receptive_field) == (2047, 6139, 3070)


@pytest.mark.parametrize("name", SHAPES)
def test_output_shape(name):
    model = make(name)
    x = torch.randint(0, 256, (3, 50))
    assert model(x).shape == (3, 256, 50)
    assert model(x, causal_pad=False).shape == (3, 256, 50 - model.receptive_field + 1)


@pytest.mark.parametrize("name", SHAPES)
def test_causality_gradient_is_zero_after_t(name):
    model = make(name)
    x = torch.randint(0, 256, (2, 40))
    embedded = {}

    def keep_grad(module, inputs, output):
        output.retain_grad()
        embedded["h"] = output

    model.embedding.register_forward_hook(keep_grad)
    logits = model(x)  # the embedding sees the input after receptive_field - 1 steps of padding
    pad = model.receptive_field - 1
    t = 25
    logits[:, :, t].sum().backward()
    grad = embedded["h"].grad[:, pad:].abs().sum(dim=(0, 2))  # (T,) over the real inputs
    assert torch.all(grad[t + 1 :] == 0), "output t depends on a later input"
    assert grad[t] > 0 and grad[t - model.receptive_field + 1] > 0


@pytest.mark.parametrize("name", SHAPES)
def test_receptive_field_edges(name):
    model = make(name)
    rf = model.receptive_field
    x = torch.randint(0, 256, (1, 3 * rf))
    t = 2 * rf
    base = model(x)[0, :, t]

    def changed_at(position: int) -> bool:
        y = x.clone()
        y[0, position] = (y[0, position] + 100) % 256
        return not torch.allclose(model(y)[0, :, t], base, rtol=0, atol=1e-12)

    assert changed_at(t - rf + 1), "output t ignores the oldest input of its receptive field"
    assert not changed_at(t - rf), "output t depends on an input beyond its receptive field"
    assert changed_at(t)


@pytest.mark.parametrize("name", SHAPES)
def test_unpadded_forward_is_the_tail_of_the_padded_one(name):
    model = make(name)
    x = torch.randint(0, 256, (2, 60))
    full = model(x)
    valid = model(x, causal_pad=False)
    torch.testing.assert_close(valid, full[:, :, model.receptive_field - 1 :])


def test_padding_is_silence():
    model = make("k2")
    x = torch.randint(0, 256, (1, 30))
    silence = torch.full((1, 50), model.silence_class)
    padded_by_hand = model(torch.cat([silence, x], dim=1))[:, :, 50:]
    torch.testing.assert_close(model(x), padded_by_hand)


def test_too_short_input_is_an_error():
    model = make("k2")
    with pytest.raises(ValueError, match="receptive field"):
        model(torch.randint(0, 256, (1, model.receptive_field - 1)), causal_pad=False)
    with pytest.raises(ValueError, match="input of 0 steps"):  # the user's length, not the padded one
        model(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.zeros(1, 20), TypeError, "int64 mu-law classes, got torch.float32 tensor: audio. encode it with wavenet"),
        (torch.zeros(1, 20, dtype=torch.uint8), TypeError, "got torch.uint8 tensor"),
        (torch.zeros(1, 20, dtype=torch.bool), TypeError, "got torch.bool tensor"),
        ([[1, 2, 3]], TypeError, "got list"),
        (torch.zeros(20, dtype=torch.long), ValueError, r"\(B, T\) mu-law classes, got shape \(20,\)"),
        (torch.zeros(1, 1, 20, dtype=torch.long), ValueError, r"got shape \(1, 1, 20\)"),
    ],
    ids=["float", "uint8", "bool", "list", "1-d", "3-d"],
)
def test_forward_names_the_expected_input_of_b_t_integer_classes(x, error, message):
    with pytest.raises(error, match=message):
        make("k2")(x)


def test_bad_shape_arguments():
    shape = dict(layers=4, stacks=2, residual_channels=4, dilation_channels=4, skip_channels=4)
    with pytest.raises(ValueError, match="multiple of stacks"):
        WaveNet(**{**shape, "layers": 5})
    for name, value in [("residual_channels", 0), ("stacks", 0), ("skip_channels", "8"), ("kernel_size", 1)]:
        with pytest.raises(ValueError, match=f"{name} must be an integer of at least"):
            WaveNet(**{**shape, name: value})
    with pytest.raises(ValueError, match="quantization_channels"):
        WaveNet(**shape, quantization_channels=1)
    for name in ("bias", "checkpoint_activations"):
        with pytest.raises(ValueError, match=f"{name} must be true or false, got 'yes'"):
            WaveNet(**shape, **{name: "yes"})


@pytest.mark.parametrize("channels", [256, 64])
def test_mu_law_matches_torchaudio(channels):
    audio = torch.cat([torch.linspace(-1, 1, 10001), torch.rand(1000) * 2 - 1, torch.tensor([0.0, 1.0, -1.0])])
    classes = mu_law_encode(audio, channels)
    assert torch.equal(classes, AF.mu_law_encoding(audio, channels))
    assert classes.dtype == torch.int64 and classes.min() == 0 and classes.max() == channels - 1
    torch.testing.assert_close(mu_law_decode(classes, channels), AF.mu_law_decoding(classes, channels))


def test_mu_law_decodes_within_full_scale_for_every_number_of_levels():
    levels = range(2, 1100)
    assert max(mu_law_decode(torch.arange(q), q).abs().max().item() for q in levels) <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mu_law_codes_half_precision_audio_as_float32(dtype):
    # Every value the dtype has in [-1, 1]: in bfloat16 torchaudio's own rounding put 1.0 in class 256.
    audio = torch.linspace(-1, 1, 100001).to(dtype).unique()
    assert torch.equal(mu_law_encode(audio), AF.mu_law_encoding(audio.float(), 256))


def test_mu_law_round_trip_and_clipping():
    audio = torch.rand(10000) * 2 - 1
    decoded = mu_law_decode(mu_law_encode(audio))
    # 8-bit mu-law: the step is finest near zero and ~0.03 at full scale.
    assert (decoded - audio).abs().max() < 0.04
    assert mu_law_encode(torch.tensor([0.0])).item() == 128
    assert mu_law_encode(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(TypeError):
        mu_law_encode(torch.tensor([1, 2]))


def test_mu_law_refuses_what_it_would_code_wrong():
    with pytest.raises(ValueError, match="NaN"):  # torchaudio gives INT64_MIN
        mu_law_encode(torch.tensor([float("nan"), 0.5]))
    for levels in (1, 2**16 + 1):  # no class to pick from; more levels than 16-bit audio has
        with pytest.raises(ValueError, match="quantization_channels must be from 2 to 65536"):
            mu_law_encode(torch.zeros(3), levels)
        with pytest.raises(ValueError, match="quantization_channels must be from 2 to 65536"):
            mu_law_decode(torch.zeros(3, dtype=torch.long), levels)
    for audio in (np.zeros(3, np.float32), [0.0, 0.5]):
        with pytest.raises(TypeError, match="expects audio as a float tensor, got (ndarray|list)"):
            mu_law_encode(audio)
    with pytest.raises(ValueError, match=r"in \[0, quantization_channels=256\), got values from -5 to 300"):
        mu_law_decode(torch.tensor([300, -5]))  # torchaudio decodes them past [-1, 1]
    # More levels than uint8 holds: every uint8 is a class, the bound must not wrap around to 0.
    assert mu_law_decode(torch.tensor([0, 255], dtype=torch.uint8), 2**16).abs().max() <= 1.0
    with pytest.raises(ValueError, match="got values from 0 to 200"):
        mu_law_decode(torch.tensor([0, 200], dtype=torch.uint8), 32)
    for classes in (torch.tensor([0.5]), torch.tensor([True])):
        with pytest.raises(TypeError, match="expects classes as an integer tensor"):
            mu_law_decode(classes)


def test_flops_per_step_counts_every_matmul():
    model = WaveNet(layers=2, stacks=1, residual_channels=4, dilation_channels=3, skip_channels=5, kernel_size=2)
    # layer 1: conv 2*4*6 + residual 3*4 + skip 3*5; layer 2 (no residual): 2*4*6 + 3*5; head 5*5 + 5*256
    assert model.flops_per_step() == 2 * (48 + 12 + 15 + 48 + 15 + 25 + 1280)


def paper_wavenet(model: WaveNet, x: torch.Tensor) -> torch.Tensor:
    """The network as the paper draws it, from `model`'s weights: a one-hot input, separate filter and gate
    convolutions, each layer zero-padded to its own causal length, residual and skip 1x1s over every step."""
    import torch.nn.functional as F

    one_hot = F.one_hot(x, model.quantization_channels).transpose(1, 2).double()
    h = F.conv1d(one_hot, model.embedding.weight.T[..., None])
    skips = 0
    for layer in model.layers:
        padded = F.pad(h, (layer.context, 0))
        weight, bias = layer.filter_gate.weight, layer.filter_gate.bias
        filter_weight, gate_weight = weight.chunk(2)
        filter_bias, gate_bias = (None, None) if bias is None else bias.chunk(2)
        filter_ = F.conv1d(padded, filter_weight, filter_bias, dilation=layer.dilation)
        gate = F.conv1d(padded, gate_weight, gate_bias, dilation=layer.dilation)
        z = torch.tanh(filter_) * torch.sigmoid(gate)
        skips = skips + layer.skip(z)
        if layer.residual is not None:
            h = h + layer.residual(z)
    return model.head(skips)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_efficient_layers_equal_the_papers_network(name, bias, checkpointed):
    # The model fuses filter and gate, runs valid convolutions and skips only where the output needs them.
    torch.manual_seed(0)
    model = WaveNet(**SHAPES[name][0], bias=bias, checkpoint_activations=checkpointed).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)  # every layer, bias and gate moves the logits
    x = torch.randint(0, model.quantization_channels, (2, 3 * model.receptive_field))
    expected = paper_wavenet(model, x)[..., model.receptive_field - 1 :]  # the steps that see no padding
    actual = model(x, causal_pad=False)
    assert expected.abs().max() > 0.5  # far above the tolerance
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    # Gradients too (training runs with grad enabled, through checkpointing where it is on).
    (actual.square().mean()).backward()
    efficient = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    paper_wavenet(model, x)[..., model.receptive_field - 1 :].square().mean().backward()
    for got, want in zip(efficient, [parameter.grad for parameter in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_type_checkers_see_the_public_names_as_what_they_are():
    # The names load on first use (a module `__getattr__`), which type checkers and editors take for `Any`: no
    # completion of `WaveNetModule(...)`'s arguments. They read imports under TYPE_CHECKING, and a package's hints
    # only where it holds py.typed (PEP 561), installed with it.
    import wavenet

    package = Path(wavenet.__file__).parent
    imported = {}
    for node in ast.walk(ast.parse((package / "__init__.py").read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            imported |= {alias.name: statement.module for statement in node.body for alias in statement.names}
    assert imported == wavenet._EXPORTS
    assert (package / "py.typed").is_file()
    pyproject = (package.parents[1] / "pyproject.toml").read_text()  # tomllib is Python 3.11's, and 3.10 is supported
    assert re.search(r'^wavenet = \[.*"py\.typed"', pyproject, re.MULTILINE), "py.typed is not in the package data"
