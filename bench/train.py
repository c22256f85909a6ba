"""Training throughput of the model sizes: samples/s, step time, peak memory and MFU.

    python bench/train.py                                   # small/medium/large, fp32 and bf16, eager
    python bench/train.py --sizes large --precision bf16 --compile 0 1 --steps 30
    python bench/train.py --sizes small --checkpoint 0 1    # activation checkpointing: memory against time
    python bench/train.py --sizes large --loader            # and the data loader's rate for the same windows

A "sample" is one target (one scored audio sample); each example also carries a receptive field of
context. MFU = model FLOPs per sample (3 x forward: forward + backward) x samples/s / the device's own
measured dense matmul rate (bf16 on GPU, fp32 on CPU). The step is the real one: forward, NLL,
backward, AdamW, as the LightningModule does it, without Lightning's per-step bookkeeping.
"checkpointed" recomputes each residual layer in backward (`model.checkpoint_activations`).

`--loader` also draws training batches of the same windows (the size's receptive field + chunk, same
batch) from a real DataLoader over prepared shards of a synthesised corpus, in this run, as
bench/data.py does, and prints its samples/s beside training's and their ratio: data must never starve
the device (the loader should be well above 1x; BENCHMARKS.md).

"activations MiB" is what one forward and loss keep for backward, counted through autograd's saved-tensor
hooks (compiled code saves through them too): the memory checkpointing saves, on any device. "peak GiB" is
the allocator's peak on a GPU, and on a CPU the process's high-water mark, which only grows from row to row.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import resource
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from sizes import SIZES
from wavenet import WaveNet



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


def bench_data_module() -> ModuleType:
    """bench/data.py, loaded by path: bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoaderBench:
    """The training DataLoader's scored samples/s over prepared shards of a synthesised 16 kHz corpus.

    The corpus is written and prepared once, long enough that one epoch of windows outlasts the timed
    batches; each receptive field then opens its own data module on it, as training would.
    """

    def __init__(self, folder: Path, batch: int, chunk: int, workers: int, batches: int) -> None:
        self.bench_data = bench_data_module()
        self.folder, self.batch, self.chunk, self.workers, self.batches = folder, batch, chunk, workers, batches
        # Windows an epoch needs: the warm-up batches bench_loader draws and the timed ones, with room for
        # the validation files (a tenth) and the part of each file too close to its end to start a window.
        self.needed = max(4, 2 * workers) + batches
        samples = self.needed * batch * chunk
        self.seconds = 20.0
        hours = 2 * samples / 16000 / 3600
        self.bench_data.write_corpus(folder / "corpus", hours, self.seconds, 16000, "wav")
        self.rates: dict[int, float] = {}

    def samples_per_s(self, receptive_field: int) -> float:
        if receptive_field not in self.rates:
            from wavenet.data import AudioFolderDataModule

            if receptive_field + self.chunk > self.seconds * 16000:
                raise SystemExit(f"--chunk {self.chunk} makes windows longer than the {self.seconds:g} s files")
            data = AudioFolderDataModule(
                self.folder / "corpus",
                receptive_field=receptive_field,
                extensions=["wav"],
                chunk_length=self.chunk,
                batch_size=self.batch,
                num_workers=self.workers,
                cache_dir=self.folder / "cache",
                prepare_workers=1,
            )
            data.prepare_data()  # once: the cache does not depend on the window
            data.setup("fit")
            # bench_loader counts the batches it asked for, so an epoch must hold them all.
            assert len(data.train_dataloader()) >= self.needed, "the synthesised corpus is too short"
            self.rates[receptive_field] = self.bench_data.bench_loader(data, self.workers, self.batches)
        return self.rates[receptive_field]


def saved_for_backward(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast) -> int:
    """Bytes one forward and loss keep for backward, each storage once: the activation memory."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast:
            logits = model(inputs, causal_pad=False)
        F.cross_entropy(logits.float(), targets)
    return sum(storages.values())


def bench(
    size: str,
    batch: int,
    chunk: int,
    precision: str,
    compile_: bool,
    checkpoint: bool,
    steps: int,
    device: torch.device,
):
    torch.manual_seed(0)
    model = WaveNet(**SIZES[size], checkpoint_activations=checkpoint).to(device)
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
    activation_mib = saved_for_backward(forward, inputs, targets, autocast) / 2**20
    return samples_per_s, step_time, peak_gib, activation_mib, flops_per_sample * samples_per_s, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=10240, help="scored samples per example")
    parser.add_argument("--precision", nargs="+", default=["32", "bf16"], choices=["32", "bf16"])
    parser.add_argument("--compile", nargs="+", type=int, default=[0], choices=[0, 1])
    parser.add_argument(
        "--checkpoint", nargs="+", type=int, default=[0], choices=[0, 1], help="activation checkpointing"
    )
    parser.add_argument("--loader", action="store_true", help="also time the training DataLoader")
    parser.add_argument("--loader-workers", type=int, default=2, help="its workers (data.num_workers)")
    parser.add_argument("--loader-batches", type=int, default=200, help="batches it is timed over")
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
    with contextlib.ExitStack() as stack:
        loader = None
        if args.loader:
            logging.basicConfig(level=logging.WARNING)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wavenet-bench-train-")))
            loader = LoaderBench(folder, args.batch, args.chunk, args.loader_workers, args.loader_batches)
            print(f"loader: {args.loader_workers} DataLoader workers, timed over {args.loader_batches} batches")
        extra = " loader samples/s | loader ÷ training |" if loader else ""
        print(
            "| size | precision | compiled | checkpointed | samples/s | step ms | first step s | peak GiB | "
            f"activations MiB | TFLOP/s | MFU |{extra}"
        )
        print("|---" * (11 + 2 * bool(loader)) + "|")
        for size in args.sizes:
            for precision in args.precision:
                for compile_ in args.compile:
                    for checkpoint in args.checkpoint:
                        samples_per_s, step_time, peak_gib, activation_mib, flops, first = bench(
                            size,
                            args.batch,
                            args.chunk,
                            precision,
                            bool(compile_),
                            bool(checkpoint),
                            args.steps,
                            device,
                        )
                        row = (
                            f"| {size} | {precision} | {'yes' if compile_ else 'no'} | "
                            f"{'yes' if checkpoint else 'no'} | {samples_per_s:,.0f} | "
                            f"{1000 * step_time:.1f} | {first:.1f} | {peak_gib:.2f} | {activation_mib:,.0f} | "
                            f"{flops / 1e12:.2f} | "
                            f"{100 * flops / peak:.1f} % |"
                        )
                        if loader:
                            rate = loader.samples_per_s(WaveNet(**SIZES[size]).receptive_field)
                            row += f" {rate:,.0f} | {rate / samples_per_s:,.1f}× |"
                        print(row, flush=True)

if __name__ == "__main__":
    main()
