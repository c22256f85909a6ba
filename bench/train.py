"""Training throughput of the model sizes: samples/s, step time, peak memory and MFU.

    python bench/train.py                                   # small/medium/large, fp32 and bf16, eager
    python bench/train.py --sizes large --precision bf16 --compile 0 1 --steps 30

A "sample" is one target (one scored audio sample); each example also carries a receptive field of
context. MFU = model FLOPs per sample (3 x forward: forward + backward) x samples/s / the device's own
measured dense matmul rate (bf16 on GPU, fp32 on CPU). The step is the real one: forward, NLL,
backward, AdamW, as the LightningModule does it, without Lightning's per-step bookkeeping.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch
import torch.nn.functional as F

from wavenet import WaveNet

SIZES = {
    "small": dict(layers=20, stacks=2, residual_channels=64, dilation_channels=64, skip_channels=128, kernel_size=2),
    "medium": dict(layers=30, stacks=3, residual_channels=128, dilation_channels=128, skip_channels=128, kernel_size=3),
    "large": dict(layers=30, stacks=3, residual_channels=512, dilation_channels=512, skip_channels=512, kernel_size=2),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s on this device: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def bench(size: str, batch: int, chunk: int, precision: str, compile_: bool, steps: int, device: torch.device):
    torch.manual_seed(0)
    model = WaveNet(**SIZES[size]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_ else model
    rf = model.receptive_field
    inputs = torch.randint(0, 256, (batch, rf + chunk - 1), device=device)
    targets = torch.randint(0, 256, (batch, chunk), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            logits = forward(inputs, causal_pad=False)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # includes compilation
    synchronize(device)
    first_step = time.perf_counter() - start
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    step_time = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark
    samples_per_s = batch * chunk / step_time
    flops_per_sample = 3 * model.flops_per_step()
    return samples_per_s, step_time, peak_gib, flops_per_sample * samples_per_s, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=10240, help="scored samples per example")
    parser.add_argument("--precision", nargs="+", default=["32", "bf16"], choices=["32", "bf16"])
    parser.add_argument("--compile", nargs="+", type=int, default=[0], choices=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device: {name}; measured matmul peak {peak / 1e12:.1f} TFLOP/s; batch {args.batch} x {args.chunk}")
    print("| size | precision | compiled | samples/s | step ms | first step s | peak GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for precision in args.precision:
            for compile_ in args.compile:
                samples_per_s, step_time, peak_gib, flops, first = bench(
                    size, args.batch, args.chunk, precision, bool(compile_), args.steps, device
                )
                print(
                    f"| {size} | {precision} | {'yes' if compile_ else 'no'} | {samples_per_s:,.0f} | "
                    f"{1000 * step_time:.1f} | {first:.1f} | {peak_gib:.2f} | {flops / 1e12:.2f} | "
                    f"{100 * flops / peak:.1f} % |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
