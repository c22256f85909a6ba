#!/usr/bin/env bash
# The GPU half of the checks and benchmarks, as one command per part, for a machine without internet:
#
#     bash bench/gpu.sh essentials         # the figures the issues' targets name, in one call of < 9 min
#     bash bench/gpu.sh tests generate     # pytest -m gpu, then bench/generate.py (about 5 min on an H100)
#     bash bench/gpu.sh train compile      # bench/train.py with the loader beside it, then compiled against eager
#     bash bench/gpu.sh layout data        # bench/layout.py (channels layout), bench/data.py
#     bash bench/gpu.sh cpu                # the CPU generation kernel on the host's 16 cores (2 in CI)
#
# Wheels the machine lacks (hydra-core, omegaconf, antlr4, soundfile, wandb, litdata) are installed from .whl/
# when it exists: make it here with `bash ../shared/tools/gpu-wheels.sh litdata` and send it along. Each
# part's output goes to $OUT/<part>.txt (the device tool's folder) or bench-out/<part>.txt, and to the screen.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null && [ "$*" != cpu ]; then
  echo "bench/gpu.sh: no NVIDIA GPU here (no nvidia-smi); only its cpu part runs without one" >&2
  exit 2
fi
out=${OUT:-bench-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
fi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$out/device.txt"

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests generate)
status=0
for part in "${parts[@]}"; do
  case $part in
    essentials)
      # A session is lent 15 min of device time, machine start included: one call must bring back the correctness
      # of the GPU paths and each target's figure. Each step has its own time limit, so that one that runs long
      # costs only its own line; what ran is in $out/essentials.txt whatever happens after.
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py)
      # Targets: medium b1 >= 16,000 samples/s, b256 >= 1,000,000 in all; large b1 >= 4,000.
      timeout 120 python3 bench/generate.py --sizes medium --batches 1 256 --precision 32 bf16 --repeats 1 \
        --paths eager cuda_graph fused
      timeout 60 python3 bench/generate.py --sizes large --batches 1 --precision 32 bf16 --repeats 1 \
        --paths eager cuda_graph
      # Targets, bf16 at 8 x 10,240: large >= 1.35 M samples/s, medium >= 4 M, the loader well above training;
      # then compiled, which becomes the GPU default only if it wins and compiles in < 2 min for large.
      timeout 90 python3 bench/train.py --sizes medium large --precision bf16 --steps 10 --loader
      timeout 120 python3 bench/train.py --sizes large medium --precision bf16 --compile 1 --steps 10 ;;
    tests)  # only the files with GPU tests: the others import packages the GPU image may lack
      python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py) ;;
    generate)
      # Not fused for large: each program would stream its 47.5 M weights per step, seconds per sample.
      python3 bench/generate.py --sizes small medium --batches 1 16 256 --precision 32 bf16 --repeats 2 &&
        python3 bench/generate.py --sizes large --batches 1 16 256 --precision 32 bf16 --repeats 2 \
          --paths eager cuda_graph naive ;;
    train)  # eager, with the data loader timed on the same windows in the same run
      python3 bench/train.py --sizes small medium large --precision 32 bf16 --steps 20 --loader ;;
    compile)  # the measurement that decides model.compile's default on a GPU (< 2 min to compile large)
      python3 bench/train.py --sizes small medium large --precision bf16 --compile 0 1 --steps 20 ;;
    layout)
      python3 bench/layout.py ;;
    data)
      python3 bench/data.py ;;
    cpu)  # at batch 1 the kernel splits channels in blocks of 16: up to 4 threads for small, 8 for medium
      for threads in 1 2 4 8 16; do
        python3 bench/generate.py --device cpu --sizes small medium --batches 1 16 --paths fused --threads "$threads" \
          --samples 4096 --repeats 2 || break
      done ;;
    *)
      echo "unknown part: $part (essentials, tests, generate, train, compile, layout, data, cpu)" >&2; exit 2 ;;
  esac 2>&1 | tee "$out/$part.txt"
  status=$((status | ${PIPESTATUS[0]}))
done
exit $status
