#!/usr/bin/env bash
# Every GPU check and figure of the GPU fast path, in one command, figures appended to
# docs/benchmarks.md:
#
#   bench/run_gpu.sh                  # all steps: tests doctor runner loadgen
#   bench/run_gpu.sh tests runner     # some steps (each fits in a 10-minute slot)
#   QUICK=1 DEVICE=cpu OUT=/tmp/smoke.md bench/run_gpu.sh   # smoke run of the same steps on a CPU
#
# Environment: PY (default .venv/bin/python; on a machine without network use the machine's
# python3 with PYTHONPATH carrying the wheels, see bench/README.md), DEVICE (cuda), OUT (the
# markdown report FILE the figures are appended to, docs/benchmarks.md; its directory must
# exist), SV_DIR (where full-size random-weight SenseVoiceSmall is written once),
# PROCS (load-generator processes, 8), RAMP (loadgen session counts).
#
# SenseVoice figures use full-size RANDOM weights (the compute is the real model's, the text is
# meaningless; the tables say so). Whisper figures use the embedded real weights.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-docs/benchmarks.md}
SV_DIR=${SV_DIR:-/tmp/SenseVoiceSmall-random}
PROCS=${PROCS:-8}
STEPS=${*:-tests doctor runner loadgen}

# The benchmarks append markdown to OUT after all their measurements: check it now, not then.
if [ -d "$OUT" ]; then
    echo "run_gpu.sh: OUT=$OUT is a directory; set OUT to the markdown report file, e.g. OUT=${OUT%/}/benchmarks.md" >&2
    exit 2
fi
if [ ! -d "$(dirname -- "$OUT")" ]; then
    echo "run_gpu.sh: OUT=$OUT: its directory $(dirname -- "$OUT") does not exist; create it or set OUT to a file in an existing directory" >&2
    exit 2
fi

if [ "$DEVICE" = cpu ]; then
    VARIANTS=eager-fp32,graphs-fp32          # half precision is refused on CPU
    DEVICE_SETS="--set runner.device=cpu --set runner.dtype=float32"
else
    VARIANTS=eager-fp32,graphs-fp32,graphs-fp16,graphs-bf16
    DEVICE_SETS=""
fi
if [ -n "${QUICK:-}" ]; then
    SV_SCALE=tiny BATCHES=1,2 WBATCHES=1,2 WDECODINGS=final REPEATS=1 RAMP=${RAMP:-2} DURATION=6 FUNASR=""
else
    SV_SCALE=full BATCHES=1,4,16,32 WBATCHES=1,8,32 WDECODINGS=final,partial REPEATS=5 RAMP=${RAMP:-100,200,400,800} DURATION=20
    FUNASR=--funasr-baseline
fi

if [ ! -f "$SV_DIR/model.pt" ]; then
    SV_DIR="$SV_DIR" SV_SCALE="$SV_SCALE" "$PY" -c "import os, pathlib
from server.runners.random_weights import write_sensevoice_dir
write_sensevoice_dir(pathlib.Path(os.environ['SV_DIR']), scale=os.environ['SV_SCALE'])"
fi

for step in $STEPS; do
    echo "=== $step ($DEVICE)" >&2
    case $step in
    tests)
        # Skips (with the reason) where CUDA is absent; -rs prints the reasons.
        "$PY" -m pytest -q -rs tests/test_gpu.py
        ;;
    doctor)
        # shellcheck disable=SC2086
        "$PY" -m server doctor --config configs/sensevoice-gpu.yaml --model "$SV_DIR" $DEVICE_SETS --seconds 10
        ;;
    runner)
        "$PY" bench/runner_bench.py --runner sensevoice --sensevoice-random "$SV_SCALE" --device "$DEVICE" \
            --variants "$VARIANTS" --batches "$BATCHES" --seconds 5 --repeats "$REPEATS" $FUNASR --out "$OUT"
        "$PY" bench/runner_bench.py --runner whisper --device "$DEVICE" \
            --variants "$VARIANTS" --batches "$WBATCHES" --decodings "$WDECODINGS" --seconds 5 --repeats "$REPEATS" --out "$OUT"
        ;;
    loadgen)
        # The issue's target: p95 final latency <= 300 ms after end of speech, partials at
        # least every 600 ms; batching + graphs vs batching with eager calls vs one eager call
        # per request, same run, fresh server per step.
        "$PY" client_demo/loadgen.py --procs "$PROCS" --ramp "$RAMP" --duration "$DURATION" \
            --latency-target-ms 300 --partial-gap-target-ms 600 --stop-after-miss \
            --spawn-server "$PY -m server serve --config configs/sensevoice-gpu.yaml --model $SV_DIR $DEVICE_SETS" \
            --compare-gpu --out "$OUT" \
            --note "SenseVoiceSmall with $SV_SCALE-size RANDOM weights: real compute, meaningless text (ignore WER)"
        ;;
    *)
        echo "unknown step $step (tests doctor runner loadgen)" >&2
        exit 2
        ;;
    esac
done
