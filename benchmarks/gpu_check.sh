#!/usr/bin/env bash
# altlm's CUDA path on one GPU machine, offline, in under 8 minutes (docs/gpu.md):
#   bash benchmarks/gpu_check.sh              # results under $OUT/gpu_check (or benchmarks/results/gpu/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run    # print what it would run, run nothing
# Options: --only STEP[,STEP]  run only these steps; --allow-cpu  run without a GPU (to test the script itself).
#
# Needs: python with torch (CUDA), transformers 5.x, peft, accelerate (and what they pull: numpy, pyyaml, tqdm,
# safetensors, tokenizers, huggingface_hub). It installs nothing and reaches no network: altlm runs from src/
# (PYTHONPATH), the model is SmolLM2-135M's architecture with random weights built from the committed spec
# (benchmarks/gpu/smollm2-135m-arch: config + tokenizer), the prompts are benchmarks/gpu/prompts.txt, the scorer is
# benchmarks/gpu/proxy_scorer.py (the offline toxicity scorers need h5py / scikit-learn). Optional: matplotlib
# (the runs' report.md plots), vllm + pytest (the real-engine test and a sampler=vllm smoke run).
# Steps (each under its own time limit, all under one 470 s deadline):
#   env        versions, GPU, compute capability, which optional packages import
#   prepare    build the random-weight models (full size and the smoke recipe's tiny shape) in a work folder
#   smoke      altlm train --config smoke on the tiny model (2 iterations, full fine-tuning, fp32)
#   toxicity   one toxicity-offline iteration: SmolLM2-135M shape, LoRA, bf16 autocast, the recipe's sizes
#   throughput benchmarks/throughput.py --quick on the full-size model (its numbers are CPU-side: it times the CPU)
#   vllm       tests/test_vllm_sampler.py's real-engine test, then the smoke recipe with sampler=vllm (if vllm imports)
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
ALLOW_CPU=0
ONLY="env,prepare,smoke,toxicity,throughput,vllm"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        --only) shift; ONLY="${1:-}" ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (use --dry-run, --only STEPS, --allow-cpu)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-$(command -v python3 || command -v python)}
RESULTS=${OUT:-$ROOT/benchmarks/results/gpu}/gpu_check
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/altlm-gpu-check}  # models (540 MB): kept out of the results folder
MODELS=$WORK/models
BIG=$MODELS/smollm2-135m-random
TINY=$MODELS/tiny-smollm2-random
PROMPTS=$ROOT/benchmarks/gpu/prompts.txt
SCORE="scorer=callable reward_callable=proxy_scorer:score prompts=$PROMPTS"
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks/gpu${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ALTLM_CACHE=$WORK/cache
START=$(date +%s)
DEADLINE=$((START + 470))

wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME LIMIT_S COMMAND...: run under `timeout`, log to RESULTS/NAME.log, one line per step in steps.tsv
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$DRY" = 1 ]; then
        echo "[$name] (≤ ${limit}s) $*"
        return 0
    fi
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\tno time left in the 470 s budget\n' "$name" >> "$RESULTS/steps.tsv"
        echo "== $name: skipped (no time left)"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (≤ ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$*" >> "$RESULTS/steps.tsv"
    tail -n 3 "$RESULTS/$name.log" | sed "s/^/   $name| /"
    echo "   $name: exit $rc in $(($(date +%s) - t0)) s"
    return 0
}

if [ "$DRY" = 0 ]; then
    if [ -z "$PY" ]; then
        echo "gpu_check.sh: no python3 on PATH (set PYTHON=)" >&2
        exit 2
    fi
    mkdir -p "$RESULTS" "$WORK"
    : > "$RESULTS/steps.tsv"
    # The hard requirements, checked before anything runs: one line saying what is missing.
    if ! "$PY" - "$ALLOW_CPU" > "$RESULTS/requirements.log" 2>&1 <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "accelerate", "yaml", "tqdm", "safetensors", "numpy")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("gpu_check.sh needs these Python packages, not importable here: " + ", ".join(missing))
import torch, transformers
if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit(f"gpu_check.sh needs transformers 5.x (altlm's API); this python has {transformers.__version__}")
if not torch.cuda.is_available() and sys.argv[1] != "1":
    sys.exit("gpu_check.sh needs a CUDA GPU visible to torch (torch.cuda.is_available() is False); "
             "--allow-cpu to test the script")
EOF
    then
        cat "$RESULTS/requirements.log" >&2
        exit 2
    fi
fi

if wanted env; then
    step env 60 "$PY" "$ROOT/benchmarks/gpu/env_info.py" "$RESULTS/env.json"
    [ "$DRY" = 0 ] && command -v nvidia-smi > /dev/null && nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
fi

wanted prepare && step prepare 150 "$PY" "$ROOT/benchmarks/gpu/prepare_model.py" build "$MODELS"

# report.md needs matplotlib; without it the runs skip the report (the metrics and summary.json are written anyway)
REPORT="report=true"
if [ "$DRY" = 0 ] && ! "$PY" -c 'import matplotlib' > /dev/null 2>&1; then REPORT="report=false"; fi

wanted smoke && step smoke 150 "$PY" -m altlm train --config smoke "model=$TINY" $SCORE $REPORT \
    "output_dir=$RESULTS/runs/smoke"

wanted toxicity && step toxicity 240 "$PY" -m altlm train --config toxicity-offline "model=$BIG" $SCORE $REPORT \
    iterations=1 "output_dir=$RESULTS/runs/toxicity-1iter"

wanted throughput && step throughput 120 "$PY" "$ROOT/benchmarks/throughput.py" --quick --model "$BIG" \
    --out "$RESULTS/throughput.json"

if wanted vllm; then
    if [ "$DRY" = 1 ] || "$PY" -c 'import vllm, pytest' > /dev/null 2>&1; then
        step vllm-test 200 env "ALTLM_GPU_MODEL=$BIG" "ALTLM_GPU_RESULTS=$RESULTS" \
            "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_vllm_sampler.py" \
            -k test_vllm_samples_like_the_hf_sampler_and_agrees_after_sync
        step vllm-smoke 150 "$PY" -m altlm train --config smoke "model=$TINY" $SCORE $REPORT sampler=vllm \
            "output_dir=$RESULTS/runs/smoke-vllm"
    else
        printf 'vllm\tskipped\t0\tvllm (or pytest) does not import with %s\n' "$PY" >> "$RESULTS/steps.tsv"
        echo "== vllm: skipped (vllm or pytest not importable)"
    fi
fi

if [ "$DRY" = 0 ]; then
    # weights and snapshots are not results (and are too big to bring back): listed, then removed
    find "$RESULTS/runs" -type f -size +20M -printf '%s\t%p\n' 2> /dev/null > "$RESULTS/removed_big_files.tsv"
    find "$RESULTS/runs" -type f -size +20M -delete 2> /dev/null
    echo "== done in $(($(date +%s) - START)) s; results in $RESULTS (steps.tsv: step, exit code, seconds, command)"
    cat "$RESULTS/steps.tsv"
fi
