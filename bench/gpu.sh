#!/usr/bin/env bash
# The GPU measurement campaign, in one script, for the GPU machine (run by the lead, not by CI).
#
#   Invocation (from the repository root, onnxruntime-gpu importable, results under $OUT):
#       PYTHONPATH=/path/to/onnxruntime-gpu/site-packages:$PYTHONPATH OUT=/some/dir bash bench/gpu.sh
#   Phase 2 (experiments and the policy's model card with a trained policy):
#       PHASE=evaluate POLICY=checkpoints/xrlflow-h200 OUT=/some/dir bash bench/gpu.sh
#   CPU dry run of the same steps (quick, small caps; what CI-less checks use):
#       DEVICE=cpu OUT=/tmp/gpu_dry bash bench/gpu.sh
#
#   Writes into $OUT:
#       measure_cuda.md                      noise CV, A/A ratio, cost per graph, cache hit rate (CUDA EP, IO binding)
#       h200_cuda_ort<version>.json          per-kernel table (kernels timed alone, as CUDA graphs). To ship it:
#                                            python bench/calibrate_costmodel.py --measured-json calibration_cuda.json
#                                              --load-table THIS --fit-in-graph --export-table xrlflow/data/h200_cudagraph_ort<version>.json ...
#                                            then python bench/fit_fallback_scale.py xrlflow/data/h200_cudagraph_ort<version>.json
#       costmodel_calibration_cuda.md        Spearman of the cost model (analytic h200 profile, table, corrected)
#       calibration_cuda.json                every calibration sample
#       latency.sqlite                       the cache the calibration filled (measurements + per-kernel tables)
#   Zoo exports go to the usual user cache (XRLFLOW_CACHE_DIR), not to $OUT.
#   Environment: DEVICE (cuda|cpu, default cuda), PYTHON (default .venv/bin/python if present, else python3),
#   PER_MODEL (graphs per model, default 70), MODELS (zoo specs, default "bert-base:small inception-v3:small
#   squeezenet:small bert-base"), MAX_SECONDS (timing cap per graph, default 2), NOISE_VARIANTS (measurement
#   designs compared in the noise step, see bench/measure_noise.py --variant; the first is used everywhere
#   else), NOISE_MODELS (more models for the noise table), CAL_SESSIONS (sessions per calibration graph; 2 or more
#   adds the session-vs-session ceiling), PIN_CPU (pin the calibration's worker: a CPU number or auto),
#   LOAD_TABLE (calibrate against this per-kernel table instead of measuring one).
set -euo pipefail

cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
DEVICE="${DEVICE:-cuda}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PER_MODEL="${PER_MODEL:-70}"
MODELS="${MODELS:-bert-base inception-v3 squeezenet}"
# Models whose kernels also go into the per-kernel table (a few rewritten graphs each), so a policy can be
# trained for this device on the whole zoo; set COVERAGE_MODELS="" to skip.
COVERAGE_MODELS="${COVERAGE_MODELS-bert-xrl vit-xrl mini-dalle transformer-transducer gpt2 vit-base resnet50 resnext50 nasnet-a}"
COVERAGE_PER_MODEL="${COVERAGE_PER_MODEL:-6}"
NOISE_MODEL="${NOISE_MODEL:-bert-base}"
NOISE_MODELS="${NOISE_MODELS-inception-v3}"
# the first design is MeasureConfig's default (a replayed CUDA graph on CUDA); the others are for comparison
NOISE_VARIANTS="${NOISE_VARIANTS-default plain:cuda_graph=0 plain-pinned-3sessions:cuda_graph=0,pin_cpu=auto,sessions=3}"
CAL_SESSIONS="${CAL_SESSIONS:-2}"
PIN_CPU="${PIN_CPU:-auto}"
MAX_SECONDS="${MAX_SECONDS:-2}"
PROFILE=h200
if [[ "$DEVICE" == cpu ]]; then PROFILE=cpu; fi
mkdir -p "$OUT"
# xrlflow must be installed (pip install -e . here; a wheel on PYTHONPATH on the GPU machine)

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

if [[ "${PHASE:-measure}" == evaluate ]]; then
    # Phase 2, after a policy was trained on the bundled table: the transformer experiments (with the ORT
    # transformers optimizer as a peer) and the CNN rows of the policy's model card, measured on this GPU.
    POLICY="${POLICY:?set POLICY to the checkpoint folder}"
    "$PYTHON" experiments/measured_speedup.py --device "$DEVICE" --policy "$POLICY" --search-latency cost \
        --max-seconds "$MAX_SECONDS" --out "$OUT"
    "$PYTHON" experiments/measured_speedup.py --device "$DEVICE" --policy "$POLICY" --search-latency cost \
        --max-seconds "$MAX_SECONDS" --out "$OUT" --no-ort-opt --name policy_card_cnn \
        --models squeezenet inception-v3 resnext50 resnet50 nasnet-a
    echo "done: results in $OUT"
    exit 0
fi

echo "== 1/3 noise, cost per graph, cache hit rate"
VARIANT_ARGS=()
for v in $NOISE_VARIANTS; do VARIANT_ARGS+=(--variant "$v"); done
# shellcheck disable=SC2086
[[ -n "${SKIP_NOISE:-}" ]] || "$PYTHON" bench/measure_noise.py --device "$DEVICE" --model "$NOISE_MODEL" --max-seconds "$MAX_SECONDS" \
    "${VARIANT_ARGS[@]}" --noise-models $NOISE_MODELS --aa-repeats "${AA_REPEATS:-3}" --unique "${UNIQUE:-10}" \
    --out "$OUT/measure_$DEVICE.md"

echo "== 2/3 + 3/3 per-kernel table of the models' kernels and the calibration against end-to-end latency"
TABLE_ARGS=(--export-table "$OUT/${PROFILE}_${DEVICE}_ort${ORT_VERSION}.json")
if [[ -n "${LOAD_TABLE:-}" ]]; then TABLE_ARGS=(--load-table "$LOAD_TABLE"); fi
# shellcheck disable=SC2086
"$PYTHON" bench/calibrate_costmodel.py --device "$DEVICE" --profile "$PROFILE" --models $MODELS \
    --per-model "$PER_MODEL" --max-seconds "$MAX_SECONDS" --cache-path "$OUT/latency.sqlite" \
    --sessions "$CAL_SESSIONS" --pin-cpu "$PIN_CPU" --cuda-graph "${CUDA_GRAPH:-on}" "${TABLE_ARGS[@]}" \
    --out "$OUT/costmodel_calibration_$DEVICE.md" --json "$OUT/calibration_$DEVICE.json"

if [[ -n "$COVERAGE_MODELS" ]]; then
    echo "== table coverage: kernels of the other zoo models"
    # shellcheck disable=SC2086
    "$PYTHON" bench/calibrate_costmodel.py --device "$DEVICE" --profile "$PROFILE" --models $COVERAGE_MODELS \
        --per-model "$COVERAGE_PER_MODEL" --max-seconds "$MAX_SECONDS" --cache-path "$OUT/latency.sqlite" \
        --table --export-table "$OUT/${PROFILE}_${DEVICE}_ort${ORT_VERSION}_coverage.json" \
        --out "$OUT/costmodel_coverage_$DEVICE.md" --json "$OUT/coverage_$DEVICE.json"
fi

echo "done: results in $OUT"
ls -l "$OUT"
