#!/usr/bin/env bash
# The GPU runs behind the README's GPU tables, one named step per call.
#
#   bash scripts/gpu_suite.sh STEP
#
# Runs from a source checkout (no install: PYTHONPATH is the checkout). Results go to $RES/STEP (default
# results/gpu/STEP), the log to $OUT/STEP.log and, when $OUT is set, a tarball of the results to $OUT/STEP.tgz.
# Optional inputs, each only where it exists:
#   .whl/               wheels the GPU machine lacks (gguf, optimum-quanto, hqq, termcolor), installed into /tmp/site
#   .carry-data/data/   a copy of ../shared/data (Wikitext-2) when ../shared is not beside the checkout
#   .carry-qNN/piece    pieces of the Qwen2.5-Coder-1.5B GGUF (`qpiece` appends one; `qprep` checks and places it)
# Environment: TO (seconds, a step's own time limit), DT (datatypes), BATCH, PL (prompt lengths), TESTS,
# BP (dprof: batch:prompt pairs).
# Steps:
#   env      GPU, driver and package versions
#   verify   the kernel tests on the GPU, then decode_versions' end-to-end greedy generate (torch vs triton backend)
#   decode   bench kernels: decode attention table (--quick)
#   prefill  bench kernels: prefill quantization sweep (thresholds by sort vs topk, launch variants)
#   pprof    bench profile: where the whole prefill append spends its time (MHA and GQA, keys and values, 32K)
#   dprof    bench profile --kind decode: host vs device time of decode steps, random 7B, fp16 vs nuq3
#   gen7b    bench generate on the random-weight Llama-2-7B shape
#   cap      bench capacity on the random-weight 7B shape (run it on an otherwise idle GPU)
#   qpiece   append .carry-q$PIECE/piece to /tmp/qwen.gguf.part (PIECE=00..17)
#   qprep    check the assembled GGUF's md5, place it in kvquant's model cache, convert it once to safetensors
#   qgen     bench generate on Qwen2.5-Coder-1.5B (Wikitext-2 prompts)
#   qppl     eval ppl on Qwen2.5-Coder-1.5B (needs a calibration in $RES/../qcal, made by `qcal`)
#   qcal     kvquant calibrate on Qwen2.5-Coder-1.5B (fisher, 8 x 2048 tokens)
set -uo pipefail
STEP=${1:?usage: gpu_suite.sh STEP}
cd "$(dirname "$0")/.."
ROOT=$PWD
RES_ROOT=${RES:-$ROOT/results/gpu}
RES=$RES_ROOT/$STEP
LOGDIR=${OUT:-$RES}
mkdir -p "$RES" "$LOGDIR"
LOG=$LOGDIR/$STEP.log
export PYTHONUNBUFFERED=1
export KVQUANT_CACHE=${KVQUANT_CACHE:-/tmp/kvquant-cache}
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
[ -d .carry-data/data ] && export KVQUANT_SHARED=$ROOT/.carry-data
KV="python3 -m kvquant"
QWEN=qwen2.5-coder-1.5b
QGGUF=Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf

run() {
  case $STEP in
    env)
      nvidia-smi
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" ;;
    verify)
      timeout "${TO:-300}" python3 -m pytest -q -x -p no:cacheprovider \
        ${TESTS:-tests/test_quantize_append.py tests/test_kernel_cache.py tests/test_kernels.py tests/test_sparse.py}
      python3 -m kvquant.bench.decode_versions --e2e-dtypes float32,float16 --new-tokens 64 --skip-kernels \
        --out "$RES/decode_versions_e2e.json" ;;
    decode)
      timeout "${TO:-540}" python3 -m kvquant.bench.kernels --quick --skip-prefill --out "$RES/kernels_decode.json" ;;
    prefill)
      timeout "${TO:-540}" python3 -m kvquant.bench.kernels --skip-decode --prefill-sweep --out "$RES/kernels_prefill.json" ;;
    pprof)
      for h in 32 8; do for k in keys values; do
        timeout "${TO:-120}" $KV bench profile --kind $k --heads $h --tokens "${PL:-32K}" --out "$RES/profile_${k}_h$h.json"
      done; done ;;
    dprof)
      for bp in ${BP:-1:4K 8:16K}; do
        timeout "${TO:-240}" $KV bench profile --kind decode --model random:7b --datatype "${DT:-fp16,nuq3}" \
          --batch "${bp%%:*}" --tokens "${bp##*:}" --steps 8 --top 25 --out "$RES/decode_b${bp%%:*}_s${bp##*:}.json"
      done ;;
    gen7b)
      timeout "${TO:-540}" $KV bench generate --model random:7b --datatypes "${DT:-fp16,nuq4,nuq3,nuq2}" \
        --batch "${BATCH:-1,8}" --prompt-len "${PL:-1K,4K,16K,32K}" --gen 64 --warmup 1 --no-progress --out "$RES" ;;
    cap)
      timeout "${TO:-540}" $KV bench capacity --model random:7b --datatypes fp16,nuq4,nuq3,nuq2 \
        --contexts 4K,32K,128K --max-probes 5 --out "$RES" ;;
    qpiece)
      cat ".carry-q${PIECE:?PIECE=00..17}/piece" >> /tmp/qwen.gguf.part && ls -l /tmp/qwen.gguf.part ;;
    qprep)
      want=$(cat .carry-q17/md5 2>/dev/null || echo "${QMD5:?QMD5 or .carry-q17/md5}")
      got=$(md5sum /tmp/qwen.gguf.part | cut -d' ' -f1)
      [ "$got" = "$want" ] || { echo "GGUF md5 $got != $want"; return 1; }
      mkdir -p "$KVQUANT_CACHE/models/$QWEN" && mv /tmp/qwen.gguf.part "$KVQUANT_CACHE/models/$QWEN/$QGGUF"
      python3 -c "from kvquant.models.loading import load_model; m, t, s = load_model('$QWEN', fetch=False); print(s)" ;;
    qcal)
      timeout "${TO:-400}" $KV calibrate --model $QWEN --device cuda --dtype float32 --n-seqs 8 --seq-len 2048 \
        --sensitivity fisher --no-progress --out "$RES_ROOT/qcal/qwen" ;;
    qppl)
      timeout "${TO:-540}" $KV eval ppl --model $QWEN --device cuda --dtype float32 --calibration "$RES_ROOT/qcal/qwen" \
        --ctx 2048 --max-windows 8 --datatypes "${DT:-fp16,int3,nuq2,int2}" --out "$RES/ppl_qwen.json" ;;
    qgen)
      timeout "${TO:-540}" $KV bench generate --model $QWEN --datatypes "${DT:-fp16,nuq4,nuq3,nuq2}" \
        --batch "${BATCH:-1,8}" --prompt-len "${PL:-1K,8K}" --gen 64 --warmup 1 --no-progress --out "$RES" ;;
    *) echo "unknown step $STEP"; return 2 ;;
  esac
}

run 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
[ -n "${OUT:-}" ] && [ -n "$(ls -A "$RES")" ] && tar czf "$OUT/$STEP.tgz" -C "$RES" .
echo "step $STEP: exit $rc"
exit "$rc"
