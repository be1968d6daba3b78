#!/usr/bin/env bash
# One pass on a CUDA machine: the test suite (its CUDA cases included), then every benchmark
# except the CPU scaling table. Uses the machine's own torch; curvhooks from this checkout.
# Logs and the *-cuda.md tables go to LOGS (default: ./cuda-logs).
# Run from the repository root: bash benchmarks/cuda_check.sh [LOGS]
set -uo pipefail
LOGS=${1:-cuda-logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$LOGS/tests.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfs 2>&1 | tail -60 | tee -a "$LOGS/tests.log"
# seconds per benchmark: together with the tests within one 10-minute device call
for benchmark in dense:150 per_sample:100 second_order:130; do
    timeout "${benchmark#*:}" python3 -m "benchmarks.${benchmark%:*}" --repeats 3 2>&1 \
        | tee -a "$LOGS/benchmarks.log"
done
cp docs/benchmarks/*-cuda.md "$LOGS"/
