"""Generation speed: samples/s of each generation path, per model size and batch size; prints a table.

    python bench/generate.py                                   # small, batch 1/16/256, every path
    python bench/generate.py --sizes small medium large --batches 1 16 --device cuda
    python bench/generate.py --sizes --widths 256 320 384 --batches 1 --paths eager fused   # between medium and large

Paths (`wavenet.generate(method=...)`; per-layer ring buffers, O(layers) work per sample):
    eager        the step op by op.
    cuda_graph   chunks of 64 steps, sampling included, replayed from a CUDA graph (GPU only).
    fused        one kernel runs the whole network for a chunk of steps: Triton on a GPU, native code (built
                 on first use) on the CPU (float32 arithmetic there, bf16 weights widened as they are read).
    naive        the baseline: a full forward over the last receptive field for every sample.
Paths that cannot run on the device are left out.

Rates are the steady state: samples of all streams per second, after the first progress report, so
building the state and the first steps (warm-up, allocator) are not counted. `x real time` is seconds of
16 kHz audio, summed over streams, per second. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import subprocess
import time
from collections.abc import Callable

import torch
from sizes import dimensions
from wavenet.generation import generate, resolve_method
from wavenet.models.wavenet import WaveNet
from wavenet.tasks.generate import PRECISIONS

SAMPLE_RATE = 16000


def build_model(size: str, device: torch.device) -> WaveNet:
    """The WaveNet of conf/model/<size>.yaml, or `large` at the width `w<channels>` names; random weights."""
    if size.startswith("w"):
        width = int(size[1:])
        shape = {**dimensions("large"), "residual_channels": width, "dilation_channels": width, "skip_channels": width}
        return WaveNet(**shape).to(device).eval()
    return WaveNet(**dimensions(size)).to(device).eval()


def incremental_rate(model: WaveNet, batch_size: int, num_samples: int, method: str) -> float:
    """Steady-state samples/s of `generate`, timed from its first progress report to its last."""
    reports: list[tuple[float, int]] = []
    done = 0

    def progress(steps: int) -> None:
        nonlocal done
        _synchronize(model)
        done += steps
        reports.append((time.perf_counter(), done))

    generate(
        model, num_samples, batch_size=batch_size, generator=_generator(model), progress=progress, method=method
    )
    if len(reports) < 2:
        raise SystemExit(f"--samples {num_samples} is too few for two progress reports at batch {batch_size}")
    (start, first), (end, last) = reports[0], reports[-1]
    return (last - first) * batch_size / (end - start)


@torch.inference_mode()
def naive_rate(model: WaveNet, batch_size: int, num_samples: int) -> float:
    """Samples/s of recomputing the whole receptive field for every sample (the first one not timed)."""
    field = model.receptive_field
    x = torch.full((batch_size, field + num_samples), model.silence_class, device=_device(model))
    generator = _generator(model)
    for t in range(num_samples):
        if t == 1:
            _synchronize(model)
            start = time.perf_counter()
        logits = model(x[:, t : t + field], causal_pad=False)[:, :, -1]  # (B, Q)
        x[:, t + field] = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)[:, 0]
    _synchronize(model)
    return (num_samples - 1) * batch_size / (time.perf_counter() - start)


PATHS: dict[str, Callable[[WaveNet, int, int], float]] = {
    **{method: functools.partial(incremental_rate, method=method) for method in ("eager", "cuda_graph", "fused")},
    "naive": naive_rate,
}


def runs_on(path: str, device: torch.device, dtype: torch.dtype) -> bool:
    if path == "naive":
        return True
    try:
        resolve_method(path, device, dtype)
    except ValueError:
        return False
    return True


def _device(model: WaveNet) -> torch.device:
    return model.embedding.weight.device


def _generator(model: WaveNet) -> torch.Generator:
    return torch.Generator(_device(model)).manual_seed(0)


def _synchronize(model: WaveNet) -> None:
    if _device(model).type == "cuda":
        torch.cuda.synchronize()


def _commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["small"], help="model configs in conf/model/")
    parser.add_argument(
        "--widths", nargs="*", type=int, default=[], help="also `large` at these widths (all channels), as w<width>"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<index>")
    parser.add_argument("--precision", nargs="+", default=["32"], choices=list(PRECISIONS), help="weights' dtype")
    parser.add_argument("--samples", type=int, default=2048, help="samples per stream, incremental paths")
    parser.add_argument("--naive-samples", type=int, default=4, help="samples per stream, naive path")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (other load only slows)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; {datetime.date.today()}; commit {_commit()}")
    print(f"| {'size':<7}| {'dtype':<5} | {'batch':>6} | {'path':<12}| {'samples/s':>11} | {'x real time':>11} |")
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 8}|{'-' * 13}|{'-' * 13}|{'-' * 13}|")
    for size in [*args.sizes, *(f"w{width}" for width in args.widths)]:
        for precision in args.precision:
            model = build_model(size, device).to(PRECISIONS[precision])
            for batch_size in args.batches:
                for path in (path for path in args.paths if runs_on(path, device, PRECISIONS[precision])):
                    samples = args.naive_samples if path == "naive" else args.samples
                    rate = max(PATHS[path](model, batch_size, samples) for _ in range(args.repeats))
                    print(
                        f"| {size:<7}| {precision:<5} | {batch_size:>6} | {path:<12}| {rate:>11,.0f} | "
                        f"{rate / SAMPLE_RATE:>11.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
