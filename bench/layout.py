"""Channels layout of the network: (B, C, T) with Conv1d, as the model runs, against (B, T, C) with matmuls.

    python bench/layout.py                                  # GPU: small/medium/large at 8 x 10,240
    python bench/layout.py --sizes small --batch 2 --chunk 2048 --steps 3
    python bench/layout.py --compile                        # each layout through torch.compile

The model keeps channels before time, (B, C, T), and runs each dilated causal convolution as a Conv1d.
The alternative keeps time before channels, (B, T, C), where every layer is a matmul over the channels,
the last dimension. A layer's valid convolution with kernel K and dilation d is
    out[t] = sum_k W_k x[t + k d],    t < T - (K - 1) d,
so its input is K shifted views of the (B, T, R) tensor, either concatenated into (B, T', K R) and multiplied
once by the (2D, K R) weight ("(B, T, C) cat": one big matmul, one copy of the input) or multiplied one by
one and summed ("(B, T, C) sum": K matmuls, no copy). 1x1 convolutions are F.linear; the head's logits come
out as (B, T, Q), which the loss takes flattened, and the embedding's output needs no transpose.

Each layout also runs with a layer's residual and skip 1x1s as one (", one 1x1"): their weights stacked into one
(R + S, D) matmul over all of z's steps, whose output is split into the residual and the skip, the skip cropped
to the last steps. One launch and one read of z instead of two, for skip FLOPs on the steps cropped away
(every step but the last chunk's, in every layer but the last), counted and printed for each size.

All of them run on the model's own parameters, so they are checked first: logits and every gradient equal to
the Conv1d model's in fp32 (TF32 off). Then a training step's forward, loss and backward (no optimiser, the same
in every layout) is timed, fp32 and under bf16 autocast, layouts interleaved round by round so that a change of
load on a shared machine hits them alike; the median round is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wavenet import WaveNet
from wavenet.models.wavenet import ResidualLayer

Forward = Callable[[WaveNet, Tensor], Tensor]


def _bench_train() -> ModuleType:
    """bench/train.py, loaded by path (bench/ is a folder of scripts): its sizes and helpers."""
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_train = _bench_train()
SIZES = bench_train.SIZES
synchronize = bench_train.synchronize


def pointwise(conv: torch.nn.Conv1d) -> tuple[Tensor, Tensor | None]:
    """A 1x1 Conv1d's (out, in) weight and bias, for F.linear."""
    return conv.weight[:, :, 0], conv.bias


def stacked_1x1(layer: ResidualLayer) -> tuple[Tensor, Tensor | None]:
    """The (R + S, D, 1) Conv1d weight and bias of the layer's residual and skip 1x1s as one.

    A model adopting it would hold them as one parameter; stacking the model's two at every step (a copy of
    weights, not of activations) keeps the gradients comparable with the model's.
    """
    bias = None if layer.skip.bias is None else torch.cat([layer.residual.bias, layer.skip.bias])
    return torch.cat([layer.residual.weight, layer.skip.weight]), bias


def forward_bct(model: WaveNet, x: Tensor) -> Tensor:
    """(B, T) classes -> (B, Q, T') logits of the model as it is, (B, C, T) with Conv1d."""
    return model(x, causal_pad=False)


def forward_bct_one_1x1(model: WaveNet, x: Tensor) -> Tensor:
    """(B, T) classes -> (B, Q, T') logits of the model's forward, each residual and skip 1x1 one Conv1d."""
    output_length = x.shape[-1] - model.receptive_field + 1
    h = model.embedding(x).transpose(1, 2)  # (B, R, T)
    skips = 0
    for layer in model.layers:
        z = layer.gated(h)
        if layer.residual is None:  # the last layer: its skip alone, nothing to stack it with
            skips = skips + layer.skip(z[:, :, z.shape[-1] - output_length :])
            continue
        residual, skip = F.conv1d(z, *stacked_1x1(layer)).split([h.shape[1], layer.skip.out_channels], dim=1)
        h = h[:, :, layer.context :] + residual
        skips = skips + skip[:, :, skip.shape[-1] - output_length :]
    return model.head(skips)


def forward_btc(model: WaveNet, x: Tensor, concat: bool, one_1x1: bool) -> Tensor:
    """(B, T) classes -> (B, T', Q) logits of the same network, (B, T, C) with matmuls, on its parameters."""
    output_length = x.shape[-1] - model.receptive_field + 1
    h = model.embedding(x)  # (B, T, R)
    skips = 0
    for layer in model.layers:
        conv = layer.filter_gate
        length = h.shape[1] - layer.context
        taps = [h[:, k * layer.dilation : k * layer.dilation + length] for k in range(layer.kernel_size)]  # (B, T', R)
        if concat:
            weight = conv.weight.permute(0, 2, 1).flatten(1)  # (2D, K R), tap-major like the concatenation
            filter_gate = F.linear(torch.cat(taps, dim=-1), weight, conv.bias)
        else:
            filter_gate = sum(F.linear(tap, conv.weight[:, :, k]) for k, tap in enumerate(taps))
            if conv.bias is not None:
                filter_gate = filter_gate + conv.bias
        filter_, gate = filter_gate.chunk(2, dim=-1)
        z = torch.tanh(filter_) * torch.sigmoid(gate)  # (B, T', D)
        if one_1x1 and layer.residual is not None:
            weight, bias = stacked_1x1(layer)
            residual, skip = F.linear(z, weight[:, :, 0], bias).split([h.shape[-1], layer.skip.out_channels], dim=-1)
            h = h[:, layer.context :] + residual
            skips = skips + skip[:, length - output_length :]
            continue
        if layer.residual is not None:
            h = h[:, layer.context :] + F.linear(z, *pointwise(layer.residual))
        skips = skips + F.linear(z[:, length - output_length :], *pointwise(layer.skip))
    _, first, _, last = model.head  # ReLU, 1x1, ReLU, 1x1
    hidden = F.relu(F.linear(F.relu(skips), *pointwise(first)))
    return F.linear(hidden, *pointwise(last))  # (B, T', Q)


class Layout(NamedTuple):
    forward: Forward
    channels_last: bool  # logits (B, T', Q) rather than (B, Q, T')


ONE_1X1 = ", one 1x1"
LAYOUTS = {
    "(B, C, T) Conv1d": Layout(forward_bct, channels_last=False),
    "(B, C, T) Conv1d" + ONE_1X1: Layout(forward_bct_one_1x1, channels_last=False),
    "(B, T, C) cat": Layout(partial(forward_btc, concat=True, one_1x1=False), channels_last=True),
    "(B, T, C) cat" + ONE_1X1: Layout(partial(forward_btc, concat=True, one_1x1=True), channels_last=True),
    "(B, T, C) sum": Layout(partial(forward_btc, concat=False, one_1x1=False), channels_last=True),
    "(B, T, C) sum" + ONE_1X1: Layout(partial(forward_btc, concat=False, one_1x1=True), channels_last=True),
}


def forward_flops(model: WaveNet, chunk: int) -> tuple[int, int]:
    """FLOPs of one example's forward scoring `chunk` samples (2 per MAC, every layer over its valid steps),
    and how many more the skip 1x1s cost when they run over all of z's steps, as one 1x1 with the residual's."""
    length = model.receptive_field - 1 + chunk
    flops = extra = 0
    for layer in model.layers:
        length -= layer.context  # z's steps
        conv = layer.filter_gate
        flops += 2 * length * conv.kernel_size[0] * conv.in_channels * conv.out_channels
        skip = 2 * layer.skip.in_channels * layer.skip.out_channels
        flops += chunk * skip
        if layer.residual is not None:
            flops += 2 * length * layer.residual.in_channels * layer.residual.out_channels
            extra += (length - chunk) * skip
    head = sum(c.in_channels * c.out_channels for c in model.head if isinstance(c, torch.nn.Conv1d))
    return flops + 2 * chunk * head, extra


def nll(logits: Tensor, targets: Tensor, channels_last: bool) -> Tensor:
    """The module's loss on (B, Q, T') logits; on (B, T', Q) ones the same, flattened (a view, no copy)."""
    if channels_last:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits.float(), targets)


def loss_and_grads(layout: Layout, model: WaveNet, x: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(B, T', Q) logits and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    logits = layout.forward(model, x)
    nll(logits, targets, layout.channels_last).backward()
    logits = logits.detach() if layout.channels_last else logits.detach().transpose(1, 2)
    return logits, [p.grad.clone() for p in model.parameters()]


def check_numerics(model: WaveNet, x: Tensor, targets: Tensor) -> float:
    """Asserts every layout's logits and gradients equal the Conv1d model's (fp32); returns the worst
    difference relative to the largest value of its tensor."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = loss_and_grads(LAYOUTS["(B, C, T) Conv1d"], model, x, targets)
        worst = 0.0
        for name, layout in LAYOUTS.items():
            logits, grads = loss_and_grads(layout, model, x, targets)
            for got, want in zip([logits, *grads], [reference[0], *reference[1]]):
                error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                assert error < 1e-4, f"{name}: relative difference {error:.1e} from the Conv1d model"
                worst = max(worst, error)
        return worst
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def time_layouts(
    layouts: dict[str, Layout],
    model: WaveNet,
    x: Tensor,
    targets: Tensor,
    precision: str,
    steps: int,
    rounds: int,
    device: torch.device,
) -> dict[str, float]:
    """Median seconds per forward + loss + backward of each layout, over `rounds` interleaved rounds.

    A layout whose warm-up fails (a compiler error) is left out of the rounds and timed as NaN.
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step(layout: Layout) -> None:
        with autocast:
            logits = layout.forward(model, x)
        nll(logits, targets, layout.channels_last).backward()
        model.zero_grad(set_to_none=True)

    working = {}
    for name, layout in layouts.items():  # warm-up: compiled, kernels chosen, allocator and caches filled
        try:
            for _ in range(2):
                step(layout)
            working[name] = layout
        except Exception as error:  # noqa: BLE001 (reported, and the other layouts still measured)
            print(f"<!-- {name}, {precision}: {type(error).__name__}: {str(error).splitlines()[0][:200]} -->")
    times: dict[str, list[float]] = {name: [] for name in working}
    for _ in range(rounds):
        for name, layout in working.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(layout)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(times[name]) if name in times else math.nan for name in layouts}


def main() -> None:
    # The defaults depend on the device: read it first, without answering --help before all options exist.
    device_parser = argparse.ArgumentParser(add_help=False)
    device_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device_parser.parse_known_args()[0].device.startswith("cuda")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[device_parser]
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES) if on_gpu else ["small"], choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 2)
    parser.add_argument(
        "--chunk", type=int, default=10240 if on_gpu else 4096, help="scored samples per example"
    )
    parser.add_argument("--precision", nargs="+", default=["32", "bf16"], choices=["32", "bf16"])
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 3, help="per layout and round")
    parser.add_argument("--rounds", type=int, default=5 if on_gpu else 3)
    parser.add_argument("--compile", action="store_true", help="time each layout's forward torch.compiled")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as bench/train.py and bf16-mixed training do
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"batch {args.batch} x {args.chunk}; forward + loss + backward{', compiled' if args.compile else ''}, "
        f"median of {args.rounds} rounds"
    )
    print("| device | size | precision | layout | ms per step | samples/s | vs Conv1d | vs two 1x1s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        torch.manual_seed(0)
        model = WaveNet(**SIZES[size]).to(device)
        x = torch.randint(0, 256, (args.batch, model.receptive_field - 1 + args.chunk), device=device)
        targets = torch.randint(0, 256, (args.batch, args.chunk), device=device)
        check = torch.randint(0, 256, (2, model.receptive_field - 1 + 256), device=device)
        worst = check_numerics(model, check, torch.randint(0, 256, (2, 256), device=device))
        print(f"<!-- {size}: logits and gradients of every layout within {worst:.1e} (relative) of Conv1d's -->")
        flops, extra = forward_flops(model, args.chunk)
        print(
            f"<!-- {size}: one 1x1's skips over all of z's steps: +{extra / flops:.1%} FLOPs, "
            f"{3 * args.batch * extra / 1e9:.2f} GFLOP a step on top of {3 * args.batch * flops / 1e9:.1f} -->"
        )
        for precision in args.precision:
            torch.compiler.reset()
            layouts = {
                name: layout._replace(forward=torch.compile(layout.forward)) if args.compile else layout
                for name, layout in LAYOUTS.items()
            }
            seconds = time_layouts(layouts, model, x, targets, precision, args.steps, args.rounds, device)
            label = "fp32" if precision == "32" else precision
            for layout, step_time in seconds.items():
                two = seconds.get(layout.removesuffix(ONE_1X1)) if layout.endswith(ONE_1X1) else None
                print(
                    f"| {name} | {size} | {label} | {layout} | {1000 * step_time:.1f} | "
                    f"{args.batch * args.chunk / step_time:,.0f} | "
                    f"{seconds['(B, C, T) Conv1d'] / step_time:.2f}× | "
                    f"{'–' if two is None else f'{two / step_time:.2f}×'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
