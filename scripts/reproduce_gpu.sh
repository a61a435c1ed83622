#!/usr/bin/env bash
# Reproduce the GPU results of docs/benchmarks.md, one named step per call.
#
#   bash scripts/reproduce_gpu.sh STEP
#
# Runs from a source checkout with kvquant installed (pip install -e ".[dev]"; the kernel tests and benchmarks need a
# CUDA GPU and triton). Results go to $RES/STEP (default results/gpu/STEP) with the step's log; with $OUT set, the
# log goes there and the results folder is also packed into $OUT/STEP.tgz.
#
# Environment: MODEL (default random:7b; gen7b, cap, dprof, cprof), QWEN (a local path or alias, default
# qwen2.5-coder-1.5b; qcal, qppl, qgen), TO (seconds, a step's own time limit), DT (datatypes), BATCH, PL (prompt
# lengths), TESTS (verify), VARIANTS (kprof), BATCHES, CTX, KDT, FRACS (decode: batches
# "1 8 32", contexts, datatypes, outlier fractions), BP (dprof: batch:prompt pairs),
# TASKS, DEPTHS, N, QDT and QARGS (qlong: tasks, needle depths, samples per cell, model dtype, more flags, e.g.
# "--residual-length 128 --tag r128"), CHUNK (atcap: prefill chunk), CAL and CALARGS (qcal: the calibration's folder
# under $RES_ROOT, default qcal, and more flags, e.g. "--rotation hadamard"; qppl and qlong read CAL too), PPLARGS
# and TAG (qppl: more flags and a suffix of the results file),
# SYNCW and TRACE (cprof: set to warn at every line that syncs with the device / to write a gzipped Chrome trace).
#
# Steps:
#   env       GPU, driver and package versions
#   verify    the kernel and cache tests on the GPU (tests/kernels tests/sparse and the cache's kernel, graph and
#             atomic-step tests)
#   backends  greedy generate with the torch vs triton cache backends (same tokens? decode tokens/s)
#   decode    bench kernels: the decode-attention table (graph-replayed device time, eager beside it)
#   prefill   bench kernels: prefill quantization and decode append (eager and static)
#   kprof     scripts/profile_decode.py: per-kernel device time of the decode attention at 32K and its launch variants
#   pprof     bench profile: where a whole prefill append spends its time (MHA and GQA, keys and values, 32K)
#   dprof     bench profile --kind decode: host vs GPU time of decode steps, fp16 vs nuq3
#   cprof     bench profile --kind chunk: where a chunked prefill's step goes (past read, attention, append), 4 x 32K
#             in 4K chunks, fp16 vs nuq3
#   gen7b     bench generate on the random-weight Llama-2-7B shape (memory, throughput, energy)
#   gen7bg    the same with every decode step replayed from a CUDA graph (fp16 in StaticCache)
#   atcap     bench generate --at-capacity: each datatype at its largest batch in an 80 GB budget (graph decode)
#   qgen      bench generate on a real model (Qwen2.5-Coder-1.5B by default, Wikitext-2 prompts)
#   cap       bench capacity on the random-weight 7B shape (run it on an otherwise idle GPU)
#   coldstart the first generate of a fresh process vs the same call warm, calibrated and not (random:1b by default)
#   qcal      kvquant calibrate on the real model (fisher, 8 x 2048 tokens, bit allocation at 3 bits), into
#             $RES_ROOT/qcal
#   qppl      eval ppl on the real model with the qcal calibration (8 windows of 2048 tokens)
#   qlong     eval longctx on the real model with the qcal calibration: passkey and RULER at 4K-32K, kvquant beside
#             KIVI-style quanto and kvpress eviction at equal bytes (resumable: rerun the step until it ends)
set -uo pipefail
STEP=${1:?usage: reproduce_gpu.sh STEP}
cd "$(dirname "$0")/.."
RES_ROOT=${RES:-$PWD/results/gpu}
RES=$RES_ROOT/$STEP
LOGDIR=${OUT:-$RES}
mkdir -p "$RES" "$LOGDIR"
LOG=$LOGDIR/$STEP.log
export PYTHONUNBUFFERED=1
KV="python3 -m kvquant"
MODEL=${MODEL:-random:7b}
QWEN=${QWEN:-qwen2.5-coder-1.5b}

run() {
  case $STEP in
    env)
      nvidia-smi
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" ;;
    verify)
      timeout "${TO:-540}" python3 -m pytest -q -x -p no:cacheprovider \
        ${TESTS:-tests/kernels tests/sparse tests/cache/test_kernel_attention.py tests/cache/test_graphs.py tests/cache/test_atomic_steps.py} ;;
    backends)
      timeout "${TO:-540}" python3 -m kvquant.bench.backends --dtypes float32,float16 --new-tokens 64 \
        --out "$RES/backends.json" ;;
    decode)
      for dt in ${KDT:-nuq3}; do for f in ${FRACS:-0.01 0}; do
        timeout "${TO:-540}" python3 -m kvquant.bench.kernels --skip-prefill --rope --residual-length 0 \
          --datatype "$dt" --outlier-fraction $f --contexts ${CTX:-4096 32768} --batches ${BATCHES:-1 8} \
          --hf-baselines '' --no-dequant --out "$RES/kernels_decode_${dt}_f$f.json"
      done; done ;;
    prefill)
      timeout "${TO:-540}" python3 -m kvquant.bench.kernels --skip-decode --out "$RES/kernels_prefill.json" ;;
    pprof)
      for h in 32 8; do for k in keys values; do
        timeout "${TO:-120}" $KV bench profile --kind $k --heads $h --tokens "${PL:-32K}" --out "$RES/profile_${k}_h$h.json"
      done; done ;;
    kprof)
      timeout "${TO:-540}" python scripts/profile_decode.py --out "$RES/decode_profile.json" \
        --variants ${VARIANTS:-w=1,bt=16 w=2,bt=16 w=1,bt=32 w=2,bt=32 w=4,bt=32 w=2,bt=64 w=4,bt=64 w=8,bt=64} ;;
    dprof)
      for bp in ${BP:-1:4K 8:16K}; do
        timeout "${TO:-240}" $KV bench profile --kind decode --model "$MODEL" --datatype "${DT:-fp16,nuq3}" \
          --batch "${bp%%:*}" --tokens "${bp##*:}" --steps 8 --top 25 --out "$RES/profile_decode_b${bp%%:*}_s${bp##*:}.json"
      done ;;
    cprof)
      timeout "${TO:-540}" $KV bench profile --kind chunk --model "$MODEL" --datatype fp16,nuq3 --batch 4 \
        --tokens 32K --chunk 4096 --steps 1 --top 25 ${SYNCW:+--sync-warnings} ${TRACE:+--trace "$RES/trace"} --out "$RES/profile_chunk.json" ;;
    gen7b)
      timeout "${TO:-540}" $KV bench generate --model "$MODEL" --datatypes "${DT:-fp16,nuq4,nuq3,nuq2}" \
        --batch "${BATCH:-1,8}" --prompt-len "${PL:-1K,4K,16K,32K}" --gen 64 --warmup 1 --no-progress --out "$RES" ;;
    gen7bg)
      timeout "${TO:-540}" $KV bench generate --model "$MODEL" --datatypes "${DT:-fp16,nuq4,nuq3,nuq2}" \
        --batch "${BATCH:-1,8}" --prompt-len "${PL:-4K,16K}" --gen 64 --warmup 1 --graph --no-progress --out "$RES" ;;
    atcap)
      timeout "${TO:-540}" $KV bench generate --model "$MODEL" --datatypes "${DT:-fp16,nuq3}" --at-capacity \
        --memory-budget-gb "${BUDGET:-80}" --reserve-gb "${RESERVE:-12}" --prompt-len "${PL:-32K}" --gen 64 \
        --warmup 1 --graph ${CHUNK:+--prefill-chunk "$CHUNK"} --no-progress --out "$RES" ;;
    qgen)
      timeout "${TO:-540}" $KV bench generate --model "$QWEN" --datatypes "${DT:-fp16,nuq4,nuq3,nuq2}" \
        --batch "${BATCH:-1,8}" --prompt-len "${PL:-1K,8K}" --gen 64 --warmup 1 --no-progress --out "$RES" ;;
    cap)
      timeout "${TO:-540}" $KV bench capacity --model "$MODEL" --datatypes fp16,nuq4,nuq3,nuq2 \
        --contexts 4K,32K,128K --max-probes 5 --out "$RES" ;;
    coldstart)
      PYTHONPATH=$PWD timeout "${TO:-420}" python3 scripts/first_generate.py --model "${MODEL/random:7b/random:1b}" \
        --out "$RES/first_generate.json" ;;
    qcal)
      timeout "${TO:-900}" $KV calibrate --model "$QWEN" --device cuda --dtype float32 --n-seqs 8 --seq-len 2048 \
        --sensitivity fisher --bit-budget 3 ${CALARGS:-} --no-progress --out "$RES_ROOT/${CAL:-qcal}/cal" ;;
    qppl)
      timeout "${TO:-1800}" $KV eval ppl --model "$QWEN" --device cuda --dtype float32 \
        --calibration "$RES_ROOT/${CAL:-qcal}/cal" \
        --ctx 2048 --chunk 64 --max-windows 8 \
        --datatypes "${DT:-fp16,nuq4,nuq3,int4,int3,nuq2,int2,k4v2,k3v2,nuq-alloc,quanto4k,quanto2k}" \
        ${PPLARGS:-} --no-progress --out "$RES/ppl_qwen${TAG:-}.json" ;;
    qlong)
      timeout "${TO:-540}" $KV eval longctx --model "$QWEN" --device cuda --dtype "${QDT:-bfloat16}" \
        --calibration "$RES_ROOT/${CAL:-qcal}/cal" --tasks "${TASKS:-passkey,ruler}" --lengths "${PL:-4K..32K}" \
        --depths "${DEPTHS:-0,25,50,75,100}" --n "${N:-8}" --batch "${BATCH:-4}" \
        --caches "${DT:-fp16,nuq4,nuq3,nuq2,quanto4k,quanto2k,snapkv@nuq3,snapkv@nuq2,expected_attention@nuq3}" \
        ${QARGS:-} --no-progress --out "$RES/longctx_qwen.jsonl" ;;
    *) echo "unknown step $STEP (see the list at the top of $0)"; return 2 ;;
  esac
}

run 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
[ -n "${OUT:-}" ] && [ -n "$(ls -A "$RES")" ] && tar czf "$OUT/$STEP.tgz" -C "$RES" .
echo "step $STEP: exit $rc"
exit "$rc"
