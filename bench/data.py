"""Data throughput: preparation (hours of audio per minute) and loading (samples/s by DataLoader workers).

    python bench/data.py                                   # 2 h of VCTK-like 48 kHz FLAC, in a temp folder
    python bench/data.py --hours 2 --rate 22050 --format wav --prepare-workers 1 4 16 --workers 1 2 4 8
    python bench/data.py --corpus /data/VCTK-Corpus-0.92 --layout vctk --prepare-workers 16

Preparation decodes, mixes to mono, resamples to 16 kHz and mu-law encodes a corpus into shards, once
per number of processes (each into a fresh cache). Loading then draws training batches from the shards,
locally (memory-mapped) and streamed with litdata from a local folder standing in for a bucket. A
"sample" is one scored target, as in bench/train.py, with the windows of `large` (receptive field 3,070
samples) and its batch there (8 x 10,240): the loader must deliver at least 10x the training samples/s
of the model it feeds (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from wavenet.data import AudioFolderDataModule, PrepareSettings, StreamingDataModule, prepare_corpus, publish
from wavenet.data.prepare import Manifest, available_cpus

LARGE_RECEPTIVE_FIELD = 3070


def write_corpus(directory: Path, hours: float, seconds: float, rate: int, file_format: str) -> int:
    """Writes `hours` of mono speech-like audio (a gliding tone in noise, with pauses); returns the count."""
    count = max(2, round(hours * 3600 / seconds))
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * rate)) / rate
    for index in range(count):
        tone = 0.3 * np.sin(2 * np.pi * (150 + 100 * rng.random()) * (1 + 0.2 * t) * t)
        envelope = (np.sin(2 * np.pi * rng.uniform(1, 3) * t) > -0.5).astype(np.float64)
        audio = envelope * tone + 0.01 * rng.standard_normal(len(t))
        folder = directory / f"p{index % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"{index:05d}.{file_format}"), audio.astype(np.float32), rate)
    return count


def bench_prepare(corpus: Path, layout: str, workers: int, cache: Path) -> tuple[Manifest, float]:
    start = time.perf_counter()
    folder = prepare_corpus(
        corpus, layout, ["wav", "flac"], PrepareSettings(16000, 256, None), cache, workers
    )
    return Manifest.load(folder), time.perf_counter() - start


def bench_loader(module: AudioFolderDataModule | StreamingDataModule, workers: int, batches: int) -> float:
    """Scored samples per second of the module's training loader, after its first batches."""
    module.num_workers = workers
    loader = iter(module.train_dataloader())
    for _ in range(max(4, 2 * workers)):  # workers started and their prefetch filled
        next(loader)
    start = time.perf_counter()
    for inputs, _ in itertools.islice(loader, batches):
        pass
    elapsed = time.perf_counter() - start
    return batches * inputs.shape[0] * module.chunk_length / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, help="a real corpus instead of a synthesised one")
    parser.add_argument("--layout", default="folder", choices=["folder", "vctk", "ljspeech"])
    parser.add_argument("--hours", type=float, default=2.0, help="of synthesised audio")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="per synthesised file (VCTK: ~3 s, LJSpeech: ~6.6 s)"
    )
    parser.add_argument("--rate", type=int, default=48000, help="of the synthesised files")
    parser.add_argument("--format", default="flac", choices=["flac", "wav"])
    parser.add_argument("--prepare-workers", type=int, nargs="+", default=sorted({1, available_cpus()}))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="DataLoader workers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=10240, help="scored samples per example")
    parser.add_argument("--batches", type=int, default=200, help="timed per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="wavenet-bench-data-") as temp:
        temp = Path(temp)
        corpus = args.corpus
        if corpus is None:
            corpus = temp / "corpus"
            count = write_corpus(corpus, args.hours, args.seconds, args.rate, args.format)
            print(
                f"corpus: {count} mono {args.format} files of {args.seconds:g} s at {args.rate} Hz "
                f"({args.hours:g} h)"
            )
            os.sync()  # written back now, not while the first preparation is being timed
        print(f"{available_cpus()} CPUs available\n")

        # Wall time includes starting the processes (a second or two: each imports torch).
        print("| preparation processes | audio h | wall s | audio h per minute | per process |")
        print("|---|---|---|---|---|")
        for workers in args.prepare_workers:
            manifest, elapsed = bench_prepare(corpus, args.layout, workers, temp / f"cache-{workers}")
            hours = sum(file.frames for file in manifest.files) / manifest.sample_rate / 3600
            rate = hours / (elapsed / 60)
            print(
                f"| {workers} | {hours:.2f} | {elapsed:.1f} | {rate:.1f} | {rate / workers:.1f} |", flush=True
            )

        settings = dict(receptive_field=LARGE_RECEPTIVE_FIELD, chunk_length=args.chunk, batch_size=args.batch)
        local = AudioFolderDataModule(
            corpus,
            layout=args.layout,
            extensions=["wav", "flac"],
            cache_dir=temp / f"cache-{workers}",
            **settings,
        )
        local.setup("fit")
        publish(manifest.directory, str(temp / "bucket"), cache_dir=temp / "publish-cache")
        streamed = StreamingDataModule(str(temp / "bucket"), cache_dir=temp / "stream-cache", **settings)
        streamed.setup("fit")

        print(f"\nwindows of {LARGE_RECEPTIVE_FIELD + args.chunk} samples, batches of {args.batch}")
        print("| source | DataLoader workers | samples/s | batches/s |")
        print("|---|---|---|---|")
        for name, module in [("local shards (mmap)", local), ("litdata stream (local folder)", streamed)]:
            for workers in args.workers:
                rate = bench_loader(module, workers, args.batches)
                print(
                    f"| {name} | {workers} | {rate:,.0f} | {rate / args.batch / args.chunk:,.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
