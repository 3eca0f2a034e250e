#!/usr/bin/env bash
# The GPU measurement campaign, in one script, for the GPU machine (run by the lead, not by CI).
#
#   Invocation (from the repository root, onnxruntime-gpu importable, results under $OUT):
#       PYTHONPATH=/path/to/onnxruntime-gpu/site-packages:$PYTHONPATH OUT=/some/dir bash bench/gpu.sh
#   CPU dry run of the same steps (quick, small caps; what CI-less checks use):
#       DEVICE=cpu OUT=/tmp/gpu_dry bash bench/gpu.sh
#
#   Writes into $OUT:
#       measure_cuda.md                      noise CV, A/A ratio, cost per graph, cache hit rate (CUDA EP, IO binding)
#       h200_cuda_ort<version>.json          per-kernel table of the zoo models' kernels: commit it as
#                                            costmodels/h200_cuda_ort<version>.json (CostModel loads it with OpTable.load)
#       costmodel_calibration_cuda.md        Spearman of the cost model (analytic h200 profile, table, corrected)
#       calibration_cuda.json                every calibration sample
#       latency.sqlite                       the cache the calibration filled (measurements + per-kernel tables)
#   Zoo exports go to the usual user cache (XRLFLOW_CACHE_DIR), not to $OUT.
#   Environment: DEVICE (cuda|cpu, default cuda), PYTHON (default .venv/bin/python if present, else python3),
#   PER_MODEL (graphs per model, default 70), MODELS (zoo specs, default "bert-base:small inception-v3:small
#   squeezenet:small bert-base"), MAX_SECONDS (timing cap per graph, default 2).
set -euo pipefail

cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
DEVICE="${DEVICE:-cuda}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PER_MODEL="${PER_MODEL:-70}"
MODELS="${MODELS:-bert-base:small inception-v3:small squeezenet:small bert-base}"
MAX_SECONDS="${MAX_SECONDS:-2}"
PROFILE=h200
if [[ "$DEVICE" == cpu ]]; then PROFILE=cpu; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ORT_VERSION=$("$PYTHON" -c 'import onnxruntime as o; print(o.__version__)')
PROVIDERS=$("$PYTHON" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))')
echo "onnxruntime $ORT_VERSION, providers $PROVIDERS, device $DEVICE"
if [[ "$DEVICE" == cuda && "$PROVIDERS" != *CUDAExecutionProvider* ]]; then
    echo "error: onnxruntime has no CUDAExecutionProvider (put onnxruntime-gpu on PYTHONPATH)" >&2
    exit 2
fi
if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true
fi

echo "== 1/3 noise, cost per graph, cache hit rate"
"$PYTHON" bench/measure_noise.py --device "$DEVICE" --max-seconds "$MAX_SECONDS" --out "$OUT/measure_$DEVICE.md"

echo "== 2/3 + 3/3 per-kernel table of the models' kernels and the calibration against end-to-end latency"
# shellcheck disable=SC2086
"$PYTHON" bench/calibrate_costmodel.py --device "$DEVICE" --profile "$PROFILE" --models $MODELS \
    --per-model "$PER_MODEL" --max-seconds "$MAX_SECONDS" --cache-path "$OUT/latency.sqlite" \
    --export-table "$OUT/${PROFILE}_${DEVICE}_ort${ORT_VERSION}.json" \
    --out "$OUT/costmodel_calibration_$DEVICE.md" --json "$OUT/calibration_$DEVICE.json"

echo "done: results in $OUT"
ls -l "$OUT"
