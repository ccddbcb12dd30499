#!/usr/bin/env bash
# The GPU session, one step per device command (each under 9 minutes), run from the repository root.
#
#   bash bench/gpu_session.sh prepare   here (CPU, .venv): the SmolLM2 tokenizer into .gpu/tokenizer, the
#                                        folder to carry to the GPU machine
#   bash bench/gpu_session.sh A         GPU machine, vLLM bundle installed (/tmp/vllm-env), carrying
#                                        .gpu/tokenizer: the project's entry points into /tmp/site, then the
#                                        GPU tests (tests/gpu: the optimizer's CUDA paths and three served
#                                        architectures at once); logs, junit XML and results.jsonl in $OUT
#   bash bench/gpu_session.sh B         same machine: the Qwen3.5-27B shape through bench/gpu_vllm.py (random
#                                        weights, vLLM --load-format dummy): start, decode, train, checkpoint
#   bash bench/gpu_session.sh C         same machine: the optimizer on MoE experts at the Qwen3-30B-A3B shape
#                                        (4 layers; bench/moe_optim.py): state and step time vs fused AdamW
#   bash bench/gpu_session.sh G         same machine, carrying .gpu/tokenizer: the guard's
#                                        snapshot/restore and POST /rollback at the 1.7B and 8B shapes
#   bash bench/gpu_session.sh N         same machine, carrying .gpu/tokenizer: the null-space projection's bases
#                                        at the 1.7B and 8B shapes (bench/null_space_build.py: passes, seconds,
#                                        memory, a step with and without it)
#   bash bench/gpu_session.sh L         same machine, carrying .gpu/tokenizer, MODEL=a model directory there: the
#                                        continual benchmark served (bench/continual.py) over several calls: the
#                                        first starts `onlinemodel serve` in a session of its own, which outlives
#                                        the call while the machine stays warm; each call teaches facts for at most
#                                        STOP_AFTER s (default 380) and exits 3 until the run is done; run it again
#                                        at once (within the machine's 30 s) to carry on; SERVE_ARGS: more flags.
#                                        Alone on the machine: beside five runs of S (2026-12-04) its first call
#                                        ended no job in 590 s
#   bash bench/gpu_session.sh S         same machine, MODEL=a model directory there, RUNS="recipe:seed ...": in-process
#                                        continual sweeps side by side (bench/continual_sweep.py --track, FACTS facts,
#                                        default 32; DTYPE: the weights' dtype, default bfloat16; TRACK=0: the
#                                        controls asked at the end only), started in sessions of their own that
#                                        outlive the call; without
#                                        the vLLM bundle, pydantic comes from the wheels `prepare` put in .gpu/whl
#   bash bench/gpu_session.sh T         same machine, carrying .gpu (tokenizer, wheels): one training step at the
#                                        defaults and each of its parts (bench/train_step_defaults.py), 1.7B and
#                                        8B shapes; no vLLM needed
#   bash bench/gpu_session.sh W [SECONDS]  after S: wait (default 240 s), count each run's jobs, pack what the runs
#                                        wrote (results and per-job progress) into $OUT/sweeps.tgz; call it again
#                                        at once while runs go on: the machine goes back 30 s after a call ends,
#                                        runs and all (2026-12-03: four finished runs lost in their final asking),
#                                        so wait long enough in the last call for the runs' end (about 60 s after
#                                        the 32nd job)
#   bash bench/gpu_session.sh tests     the GPU tests alone, with $PYTHON (what `make test-gpu` runs)
#
# Environment: OUT (results; default ./gpu-out), PYTHON (default python3), GPU_TESTS (step A's and `tests`'
# paths, default tests/gpu. The whole of tests/gpu takes longer than one device call: on 2026-12-02 it passed
# in three, GPU_TESTS=tests/gpu/serving/test_serving_qwen3{,5,5_moe}.py (548 s, the MoE's restart cut),
# the MoE module's teach test alone (475 s) and tests/gpu/optim tests/gpu/trainer (95 s)), ONLINEMODEL_TOKENIZER_DIR
# (default .gpu/tokenizer if present), UTIL, PHASES and BUDGETS (step B's --gpu-memory-utilization, default
# 0.55, --phases, default decode,train,checkpoint, and --budgets, default `default`: one server start; `default,off`
# adds the unpaced comparison and a second start). Run B last: a server it leaves after a timeout stays.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-out}
TOKEN=gpu-session-token

gpu_tests() {
    # One worker per served architecture (a test_serving_*.py module each) plus one for the rest.
    # GPU_TESTS: the paths to run (default all of tests/gpu); one step can stay under a device call's
    # limit by running part of them, e.g. GPU_TESTS=tests/gpu/serving/test_serving_qwen35_moe.py.
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -q -m gpu -n 4 --dist loadfile -p no:cacheprovider "$@" ${GPU_TESTS:-tests/gpu}
}

gpu_env() {
    [ -f /tmp/vllm-env ] || { echo "no /tmp/vllm-env: install the vLLM bundle first (shared/tools/gpu-vllm)"; exit 1; }
    # shellcheck disable=SC1091
    . /tmp/vllm-env
    export PYTHONPATH=$PWD/runtime:$PWD/protocol:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}
    if [ -z "${ONLINEMODEL_TOKENIZER_DIR:-}" ] && [ -d .gpu/tokenizer ]; then
        export ONLINEMODEL_TOKENIZER_DIR=$PWD/.gpu/tokenizer
    fi
    [ -n "${ONLINEMODEL_TOKENIZER_DIR:-}" ] || { echo "no tokenizer: carry .gpu/tokenizer (step prepare)"; exit 1; }
    export ONLINEMODEL_API_TOKEN=$TOKEN
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/gpu.csv" || true
}

case "${1:-}" in
prepare)
    mkdir -p .gpu/tokenizer
    dir=$(.venv/bin/python -m onlinemodel_runtime.devtools.model_prep)
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
        [ -f "$dir/$f" ] && cp "$dir/$f" .gpu/tokenizer/
    done
    ls -la .gpu/tokenizer
    # For step S on the machine's own python (torch and transformers, no pydantic): its wheels, for Python 3.12.
    .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d .gpu/whl pydantic
    ;;
A)
    gpu_env
    start=$(date +%s)
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . > "$OUT/pip.log" 2>&1
    rm -rf /tmp/omg "$OUT/results.jsonl" "$OUT/server-pids"
    status=0
    ONLINEMODEL_GPU_RESULTS=$OUT timeout 500 bash "$0" tests --basetemp=/tmp/omg --junitxml="$OUT/gpu-tests.xml" \
        > "$OUT/gpu-tests.log" 2>&1 || status=$?
    # Servers a killed run left behind (each in its own session): their process groups, by id.
    if [ -f "$OUT/server-pids" ]; then
        while read -r pid; do kill -9 -- "-$pid" 2>/dev/null || true; done < "$OUT/server-pids"
        rm -f "$OUT/server-pids"
    fi
    mkdir -p "$OUT/server-logs"
    find /tmp/omg -name 'server-*.log' -exec sh -c 'cp "$1" "$2/$(basename "$(dirname "$1")")-$(basename "$1")"' \
        _ {} "$OUT/server-logs" \; 2>/dev/null || true
    rm -rf /tmp/omg
    echo "step A: exit $status in $(($(date +%s) - start)) s" | tee -a "$OUT/gpu-tests.log"
    tail -25 "$OUT/gpu-tests.log"
    exit $status
    ;;
B)
    gpu_env
    start=$(date +%s)
    status=0
    timeout 520 "$PYTHON" bench/gpu_vllm.py --shape qwen3.5-27B --tokenizer "$ONLINEMODEL_TOKENIZER_DIR" \
        --phases "${PHASES:-decode,train,checkpoint}" --budgets "${BUDGETS:-default}" \
        --gpu-memory-utilization "${UTIL:-0.55}" --label "27B, gpu_session B" \
        --out "$OUT/gpu-vllm-qwen3.5-27B.json" > "$OUT/gpu-vllm-qwen3.5-27B.out" 2>&1 || status=$?
    rm -rf /tmp/onlinemodel-gpu-vllm-*  # the random model's config and any checkpoint left by a failure
    echo "step B: exit $status in $(($(date +%s) - start)) s" | tee -a "$OUT/gpu-vllm-qwen3.5-27B.out"
    tail -25 "$OUT/gpu-vllm-qwen3.5-27B.out"
    exit $status
    ;;
C)
    gpu_env
    status=0
    timeout 520 "$PYTHON" bench/moe_optim.py --part state --device cuda --hidden 2048 --inter 768 --experts 128 \
        --top-k 8 --layers 4 --steps 10 --json "$OUT/moe-optim-30B-A3B.json" > "$OUT/moe-optim-30B-A3B.out" 2>&1 \
        || status=$?
    tail -8 "$OUT/moe-optim-30B-A3B.out"
    exit $status
    ;;
G)
    # The guard's snapshot and restore, and POST /rollback's restore, at the 1.7B and 8B shapes: the trainer's
    # own code on random weights (bench/guard_rollback.py); vLLM is not used, but the bundle's site (/tmp/site,
    # installed by step A's set-up) brings pydantic, which the trainer's modules import.
    if [ -f /tmp/vllm-env ]; then . /tmp/vllm-env; fi
    export PYTHONPATH=$PWD/runtime:$PWD/protocol${PYTHONPATH:+:$PYTHONPATH}
    tokenizer=${ONLINEMODEL_TOKENIZER_DIR:-$PWD/.gpu/tokenizer}
    mkdir -p "$OUT"
    status=0
    for shape in 1.7B 8B; do
        limit=$([ "$shape" = 8B ] && echo 380 || echo 200)
        timeout "$limit" "$PYTHON" bench/guard_rollback.py --shape "$shape" --tokenizer "$tokenizer" --device cuda \
            --out "$OUT/guard-rollback-$shape.json" > "$OUT/guard-rollback-$shape.out" 2>&1 || status=$?
        tail -3 "$OUT/guard-rollback-$shape.out"
    done
    exit $status
    ;;
N)
    gpu_env
    status=0
    timeout 540 "$PYTHON" bench/null_space_build.py --shape 1.7B 8B --tokenizer "$ONLINEMODEL_TOKENIZER_DIR" \
        --device cuda --step --threads 8 --out "$OUT/null-space-build.json" > "$OUT/null-space-build.out" 2>&1 \
        || status=$?
    tail -4 "$OUT/null-space-build.out"
    exit $status
    ;;
L)
    gpu_env
    model=${MODEL:?MODEL: the model directory on the GPU machine}
    url=http://127.0.0.1:8011
    progress=/tmp/continual-progress.json
    up() { curl -sf -H "Authorization: Bearer $TOKEN" "$url/v1/models" > /dev/null; }
    if ! up; then
        # A run carried on against a new server would mix two models' answers: start over instead.
        [ ! -f "$progress" ] || { echo "the server of $progress is gone: rm it to start over"; exit 1; }
        # shellcheck disable=SC2086
        setsid nohup "$PYTHON" -m onlinemodel_runtime.cli serve --model "$model" --host 127.0.0.1 --port 8011 \
            --max-model-len 1024 --enforce-eager ${SERVE_ARGS:-} > /tmp/continual-server.log 2>&1 < /dev/null &
        for _ in $(seq 300); do up && break; sleep 1; done
        up || { tail -30 /tmp/continual-server.log; exit 1; }
    fi
    status=0
    timeout 560 "$PYTHON" bench/continual.py --url "$url" --facts 32 --progress "$progress" \
        --stop-after "${STOP_AFTER:-380}" --label "defaults, served, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
        --json "$OUT/continual-served.json" > "$OUT/continual-served.out" 2>&1 || status=$?
    cp /tmp/continual-server.log "$OUT/" 2>/dev/null || true
    tail -8 "$OUT/continual-served.out"
    exit $status
    ;;
S)
    model=${MODEL:?MODEL: the model directory on the GPU machine}
    if [ -f /tmp/vllm-env ]; then
        . /tmp/vllm-env
    else
        mkdir -p /tmp/site-whl && for w in .gpu/whl/*.whl; do "$PYTHON" -m zipfile -e "$w" /tmp/site-whl; done
        export PYTHONPATH=/tmp/site-whl${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD/runtime:$PWD/protocol${PYTHONPATH:+:$PYTHONPATH}
    mkdir -p /tmp/sweeps
    for run in ${RUNS:?RUNS: recipe:seed pairs}; do
        r=${run%:*} s=${run##*:}
        # The untouched model's replies from an earlier session on the same card, if carried: they are the same
        # for every recipe and seed (bench/continual_sweep.py checks the questions), and asking them costs a minute.
        mkdir -p "/tmp/sweeps/$r-$s"
        if [ -f .gpu/untouched-cuda-batch16.json ]; then cp .gpu/untouched-cuda-batch16.json "/tmp/sweeps/$r-$s/"; fi
        setsid nohup "$PYTHON" bench/continual_sweep.py --device cuda --model "$model" --recipes "$r" --seeds "$s" \
            --facts "${FACTS:-32}" --out "/tmp/sweeps/$r-$s" --batch 16 --threads 2 --dtype "${DTYPE:-bfloat16}" \
            $([ "${TRACK:-1}" = 0 ] || echo --track) > "/tmp/sweeps/$r-$s.log" 2>&1 < /dev/null &
    done
    sleep 20
    tail -n 2 /tmp/sweeps/*.log
    ;;
T)
    mkdir -p /tmp/site-whl "$OUT" && for w in .gpu/whl/*.whl; do "$PYTHON" -m zipfile -e "$w" /tmp/site-whl; done
    export PYTHONPATH=/tmp/site-whl:$PWD/runtime:$PWD/protocol${PYTHONPATH:+:$PYTHONPATH}
    status=0
    timeout "${LIMIT:-420}" "$PYTHON" bench/train_step_defaults.py --shape 1.7B 8B --tokenizer .gpu/tokenizer \
        --device cuda --threads 8 --out "$OUT/train-step-defaults.json" > "$OUT/train-step-defaults.out" 2>&1 \
        || status=$?
    grep -v Warn "$OUT/train-step-defaults.out" | tail -20
    exit $status
    ;;
W)
    sleep "${2:-240}"
    mkdir -p "$OUT"
    cd /tmp/sweeps && for f in *.log; do echo "$f: $(grep -c 'recalled=' "$f") jobs"; done
    tar czf "$OUT/sweeps.tgz" --exclude='untouched-*' .
    ;;
tests)
    shift
    gpu_tests "$@"
    ;;
*)
    sed -n '2,/^set -euo/{/^#/p}' "$0"
    exit 2
    ;;
esac
