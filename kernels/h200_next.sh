#!/usr/bin/env bash
# The H200 sweeps, one device call each (< 600 s; short tables printed last, full logs under
# $OUT). What every earlier part measured is in kernels/BENCHMARKS.md with its command and tree;
# parts that ran and did their work were dropped (d-o and s: the tree of a1f8948 has them; t and
# j: c316a2c's).
# On this machine first `bash kernels/gpu_wheels.sh`; then the device call, with carry [".whl"]
# (and ".gpu_in" where a part reads a table the one before wrote, copied there):
#   bash kernels/h200_next.sh c   # a call with < 300 s of device time left: the GPU tests of
#                                 # the eighteenth session's code, then tinygemm, int4,
#                                 # int4-l2pf24-attn end to end as far as time allows
#   bash kernels/h200_next.sh u   # next: the read floors at M = 1 and 16 (what any kernel reading
#                                 # the weight's bytes cannot beat), Config.planes tested and
#                                 # timed against the shipped decode, the INT4 tc retune at M = 16
#                                 # and 128 with the planes and decode-once candidates
#   bash kernels/h200_next.sh g   # < 280 s, after x or alone: the Gluon producer / consumer tc
#                                 # probe (kernels/probe_gluon_tc.py) checked against the INT4
#                                 # reference, then timed against the shipped tc kernel at
#                                 # M = 16, 64, 128 on the four shapes
#   bash kernels/h200_next.sh x   # then: the L2 prefetch of o_proj's and gate/up's weights after each
#                                 # q/k/v (fused.L2_PREFETCH_MIB) and the split-key decode
#                                 # attention (attention.DECODE_KERNEL), tested, then end to end
#                                 # against the same rows without them
#   bash kernels/h200_next.sh v   # the dequant path (M >= 256) in row chunks small
#                                 # enough for L2 (C.DEQUANT_CHUNK_MIB), tested and timed
#                                 # against the whole-weight decode; the best chunk size goes
#                                 # into configs/nvidia_h200.json "paths" "dequant_chunk_mib";
#                                 # the decode pass's tile (CONFIGS["dequant_words"]) swept
#   bash kernels/h200_next.sh w   # last: the profile that shows each remaining miss's limit
#                                 # (ncu of the M = 1 kernel against the read floor and cuBLAS's
#                                 # gemv on the same shape, the tc kernel at M = 16, the decode
#                                 # pass at M = 256, 2:4 + INT4 at M = 1)
# The standard retune after a kernel change, three calls (sixteenth session, 02:37-02:51 UTC):
#   bash kernels/h200_next.sh p   # the whole GPU suite, M = 1 retune, M = 1 kernels on it
#   TABLE=.gpu_in/tuned_m1.json bash kernels/h200_next.sh q   # e2e on it (PDL rows) and on the
#                                 # shipped table, tc M = 16..128, tc retune on TABLE
#   TABLE=.gpu_in/tuned_async.json bash kernels/h200_next.sh r   # tc kernels on it, M = 256..8192
#                                 # with 2:4, 2:4 at M = 1, 16, 128
# A switch flips only on its measured win (kernels/NOTES.md says which did and why).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-}
case $PART in c|g|p|q|r|u|v|w|x) ;; *) echo "h200_next.sh: part must be one of c, g, p, q, r, u, v, w, x, got '$PART'" >&2; exit 2;; esac
OUT=${OUT:?set OUT to a directory}
PY=${PY:-python3}
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/next_$PART.log"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >"$OUT/gpu.txt" 2>&1 || true
git log -1 --format=%h >"$OUT/commit.txt" 2>/dev/null || true
E2E="kernels/bench_e2e.py --quantize-lm-head --repeats 3"

case $PART in
c)
    # the least a short call (< 300 s) can check: the eighteenth session's GPU tests (L2
    # prefetch, decode attention, chunked dequant), then as many decisive end-to-end rows as fit
    W=$OUT/c && mkdir -p $W
    timeout 150 $PY -m pytest -v -n 8 tests/gpu/test_gpu_kernels.py \
        -k "l2_prefetch or decode_attention or row_chunks" >"$W/tests.txt" 2>&1
    stamp "GPU tests of the prefetch, decode attention, chunked dequant rc=$?"
    left=$(( ${C_END:-280} - ($(date +%s) - T0) ))
    [ $left -gt 40 ] && timeout $left $PY $E2E --formats tinygemm,int4,int4-l2pf24-attn \
        --log "$W/c.jsonl" >"$W/e2e.txt" 2>&1
    stamp "end to end (${left} s allowed) rc=$?"
    tail -2 "$W/tests.txt"; grep -E "FAILED|ERROR" "$W/tests.txt" | head -5
    grep -E "^row|^\|" "$W/e2e.txt"
    ;;
g)
    # twentieth session: Triton's automatic warp specialization cannot split the tc kernel
    # (kernels/probe_autows.py); the explicit split in Gluon compiles for sm_90. Right, and
    # faster than the shipped tc kernel? (kernels/NOTES.md, "Twentieth session")
    W=$OUT/g && mkdir -p $W
    timeout 120 $PY -u kernels/probe_gluon_tc.py --check >"$W/check.txt" 2>&1
    rc=$?; stamp "Gluon tc probe against the reference rc=$rc"
    # timed only when right: a wrong kernel's time says nothing
    [ $rc -eq 0 ] && timeout ${G_TIME_S:-150} $PY -u kernels/probe_gluon_tc.py --time --reps 20 \
        >"$W/time.txt" 2>&1
    stamp "Gluon tc probe timed rc=$?"
    tail -3 "$W/check.txt"; grep -E "WRONG|Error" "$W/check.txt" | head -5
    grep -E "^\|" "$W/time.txt" 2>/dev/null; tail -3 "$W/time.txt" 2>/dev/null
    ;;
p)
    # sixteenth session, call 1 of 3 (each < 520 s, so three starts fit 30 minutes): the whole
    # GPU suite (the first GPU run of the fourteenth and fifteenth sessions' code: one-launch
    # split-K, PDL, K-order tc), then part k's M = 1 retune and its kernel table
    W=/tmp/next_p && mkdir -p $W
    # -v: a line per test as it ends, so a run cut by its timeout still names its failures
    timeout 250 $PY -m pytest -v -n 12 -rs tests/gpu >"$OUT/gpu_suite.txt" 2>&1
    stamp "GPU suite rc=$?"
    timeout 170 $PY kernels/autotune.py --path decode --formats int4,int4-asym,nvfp4,mxfp4,int8 \
        --buckets 1 --budget-s 140 --reps 10 --base compress/kernels/configs/nvidia_h200.json \
        --log "$W/tune.jsonl" --out "$OUT/tuned_m1.json" >"$W/tune.txt" 2>&1
    stamp "M = 1 retune rc=$?"
    left=$(( 505 - ($(date +%s) - T0) ))
    V=bf16,tinygemm,int4-g128,int4-g128-asym,nvfp4,mxfp4,int8-channel
    COMPRESS_KERNEL_CONFIGS=$OUT/tuned_m1.json timeout $left $PY kernels/bench_kernels.py --ms 1 \
        --reps 30 --variants $V --log "$W/p.jsonl" >"$W/m1_tuned.txt" 2>&1
    stamp "M = 1 kernels on the retuned table (${left} s allowed) rc=$?"
    tail -3 "$OUT/gpu_suite.txt"; grep -E "FAILED|ERROR" "$OUT/gpu_suite.txt" | head
    grep -E "^(decode|wrote)" "$W/tune.txt"; grep -E "^\|" "$W/m1_tuned.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/p_all.txt"
    cp "$W"/*.jsonl "$OUT/"
    ;;
q)
    # call 2: end to end on TABLE (call 1's tuned_m1.json, copied into the tree) with the PDL
    # rows, the shipped table next to it; the tc kernel at M = 16..128 on the shipped table with
    # K order forced; the tc retune with the asynchronous candidates on TABLE
    W=/tmp/next_q && mkdir -p $W
    TABLE=${TABLE:-compress/kernels/configs/nvidia_h200.json}
    COMPRESS_KERNEL_CONFIGS=$TABLE timeout 130 $PY $E2E \
        --formats tinygemm,int4,int4-pdl,nvfp4,nvfp4-pdl --log "$W/q.jsonl" >"$W/e2e_tuned.txt" 2>&1
    stamp "e2e on TABLE, PDL rows rc=$?"
    timeout 75 $PY $E2E --formats int4,nvfp4 --log "$W/q.jsonl" >"$W/e2e_shipped.txt" 2>&1
    stamp "e2e on the shipped table rc=$?"
    V=bf16,tinygemm,int4-g128,int4-g128@k-order,nvfp4
    timeout 80 $PY kernels/bench_kernels.py --ms 16,64,128 --reps 20 --variants $V \
        --log "$W/q.jsonl" >"$W/tc_shipped.txt" 2>&1
    stamp "M = 16..128 on the shipped table, K order forced for INT4 rc=$?"
    left=$(( 500 - ($(date +%s) - T0) ))
    timeout $left $PY kernels/autotune.py --path tc --formats int4,nvfp4 --buckets 16,64,128 \
        --budget-s $(( left - 30 )) --reps 10 --base "$TABLE" --log "$W/tune.jsonl" \
        --out "$OUT/tuned_async.json" >"$W/tune.txt" 2>&1
    stamp "tc retune with the asynchronous candidates (${left} s allowed) rc=$?"
    grep -E "^\|" "$W/e2e_tuned.txt" "$W/e2e_shipped.txt"; grep -E "^\|" "$W/tc_shipped.txt"
    grep -E "^(tc|wrote)" "$W/tune.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/q_all.txt"
    cp "$W"/*.jsonl "$OUT/"
    ;;
r)
    # call 3: the tc kernels on TABLE (call 2's tuned_async.json), the issue's M = 16..8192
    # table with 2:4, the 2:4 M = 1 probe in the time left
    W=/tmp/next_r && mkdir -p $W
    TABLE=${TABLE:-compress/kernels/configs/nvidia_h200.json}
    V=bf16,tinygemm,int4-g128,int4-g128-asym,int8-channel,nvfp4,mxfp4
    COMPRESS_KERNEL_CONFIGS=$TABLE timeout 110 $PY kernels/bench_kernels.py --ms 16,64,128 \
        --reps 20 --variants $V --log "$W/r.jsonl" >"$W/tc_table.txt" 2>&1
    stamp "M = 16..128 on TABLE rc=$?"
    COMPRESS_KERNEL_CONFIGS=$TABLE timeout 260 $PY kernels/bench_kernels.py \
        --ms 256,512,2048,8192 --reps 10 \
        --variants bf16,tinygemm,int4-g128,nvfp4,2:4-bf16,2:4-int4-g128,torch-2:4-bf16 \
        --log "$W/r.jsonl" >"$W/ms.txt" 2>&1
    stamp "M = 256..8192 with 2:4 rc=$?"
    left=$(( 490 - ($(date +%s) - T0) ))
    [ $left -gt 40 ] && COMPRESS_KERNEL_CONFIGS=$TABLE timeout $left $PY kernels/bench_kernels.py \
        --ms 1,16,128 --reps 20 --variants bf16,2:4-bf16,2:4-int4-g128,torch-2:4-bf16 \
        --log "$W/r.jsonl" >"$W/s24.txt" 2>&1
    stamp "2:4 at M = 1, 16, 128 (${left} s allowed) rc=$?"
    grep -E "^\|" "$W/tc_table.txt" "$W/ms.txt" "$W/s24.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/r_all.txt"
    cp "$W"/*.jsonl "$OUT/"
    ;;
u)
    # seventeenth session, after t (the GPU suite passed with PDL on: now the default) and j
    # (ncu of the tc kernel at M = 128: 1.9 warps a scheduler, 30% of issue slots busy)
    W=/tmp/next_u && mkdir -p $W
    timeout 100 $PY kernels/bench_kernels.py --ms 1,16 --reps 30 \
        --variants bf16,tinygemm,int4-g128,nvfp4,read-int4,read-bf16 --log "$W/u.jsonl" \
        >"$W/floor.txt" 2>&1
    stamp "read floors at M = 1, 16 rc=$?"
    # Config.planes (eight code-slot dots, the weights never in shared memory): its GPU tests,
    # then an A/B on the shipped table where its tiles apply (swapped, block_k >= 128)
    # by test name: "planes" alone would match every test whose id prints a Config
    timeout 100 $PY -m pytest -v -n 8 tests/gpu/test_gpu_kernels.py \
        -k "test_tc_planes_decode or test_tc_packed_decode" \
        >"$W/planes_tests.txt" 2>&1
    stamp "planes GPU tests rc=$?"
    timeout 90 $PY kernels/bench_kernels.py --ms 16,128 --reps 20 \
        --variants bf16,int4-g128,int4-g128@planes,int4-g128-asym,int4-g128-asym@planes \
        --log "$W/u.jsonl" >"$W/planes.txt" 2>&1
    stamp "planes A/B rc=$?"
    left=$(( ${TUNE_END:-430} - ($(date +%s) - T0) ))
    # INT4 only: the new candidates (Config.planes at 16, 64, 128; decode-once tiles at 128)
    # come first in each bucket's list
    # skipped where TUNE_END leaves a minute or less (a call that runs another part after it)
    [ $left -gt 60 ] && timeout $left $PY kernels/autotune.py --path tc --formats int4 --buckets 16,128 \
        --budget-s $(( left - 25 )) --reps 10 --base compress/kernels/configs/nvidia_h200.json \
        --log "$W/tune.jsonl" --out "$OUT/tuned_tc.json" >"$W/tune.txt" 2>&1
    stamp "tc retune at M = 16, 128: planes, decode-once tiles (${left} s allowed) rc=$?"
    grep -E "^\|" "$W/floor.txt"; tail -2 "$W/planes_tests.txt"
    grep -E "FAILED|ERROR" "$W/planes_tests.txt" | head -5; grep -E "^\|" "$W/planes.txt"
    grep -E "^(tc|wrote)" "$W/tune.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/u_all.txt"
    cp "$W"/*.jsonl "$OUT/"
    ;;
v)
    # eighteenth session: M = 256..2048 decode the whole weight (N K 2 bytes written to DRAM and
    # read back by cuBLAS), 0.50-0.90x bf16. In row chunks of a few MiB, one buffer reused, a
    # chunk can be read back from L2 (60 MB); the cost is N-chunked matmuls (fewer tiles each).
    # M = 128 too: the tc kernel's 0.64-0.87x there is the bar a decode-to-L2 + cuBLAS
    # would have to beat (the "@chunk" variants force the dequant path at every M)
    W=/tmp/next_v && mkdir -p $W
    timeout 150 $PY -m pytest -v -n 8 tests/gpu/test_gpu_kernels.py -k "row_chunks" \
        >"$W/chunk_tests.txt" 2>&1
    stamp "chunked dequant GPU tests rc=$?"
    V=bf16,int4-g128,int4-g128@chunk0,int4-g128@chunk4,int4-g128@chunk8,int4-g128@chunk16
    V=$V,int4-g128@chunk32,nvfp4@chunk0,nvfp4@chunk8,nvfp4@chunk16
    V=$V,2:4-int4-g128@chunk0,2:4-int4-g128@chunk8,2:4-int4-g128@chunk16
    # V_MS, V_END (the second by which the tile sweep ends): less for a call shared with a part
    timeout 330 $PY kernels/bench_kernels.py --ms ${V_MS:-128,256,512,2048} --reps 10 --variants $V \
        --log "$W/v.jsonl" >"$W/chunks.txt" 2>&1
    stamp "dequant in row chunks, A/B rc=$?"
    # the decode pass's own tile (C.CONFIGS["dequant_words"], never tuned), whole weights
    V=bf16,int4-g128@dq32x256w4,int4-g128@dq64x256w4,int4-g128@dq16x512w4
    V=$V,int4-g128@dq32x512w8,int4-g128@dq64x128w4,int4-g128@dq128x256w8
    V=$V,nvfp4@dq32x256w4,nvfp4@dq64x256w4,nvfp4@dq32x512w8
    left=$(( ${V_END:-560} - ($(date +%s) - T0) ))
    [ $left -gt 40 ] && timeout $left $PY kernels/bench_kernels.py --ms 256,2048 --reps 10 \
        --variants $V --log "$W/v.jsonl" >"$W/dq_tiles.txt" 2>&1
    stamp "tc_dequantize tiles (${left} s allowed) rc=$?"
    tail -2 "$W/chunk_tests.txt"; grep -E "FAILED|ERROR" "$W/chunk_tests.txt" | head -5
    grep -E "^\|" "$W/chunks.txt" "$W/dq_tiles.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/v_all.txt"
    cp "$W"/*.jsonl "$OUT/"
    ;;
x)
    # eighteenth session: between a layer's q/k/v matmul and o_proj, RoPE, the cache update and
    # the attention leave DRAM nearly idle; one launch after q/k/v asks L2 for o_proj's weights
    # (8.9 MB in INT4) and the head of gate/up's (compress/kernels/prefetch.py). And the
    # attention itself: SDPA runs 8 programs for Llama-3-8B's packed heads, the split-key
    # kernel (compress/kernels/decode_attention.py) about one an SM
    W=$OUT/x && mkdir -p $W   # under $OUT: a call cut by its limit still returns the logs
    timeout 120 $PY -m pytest -v -n 4 tests/gpu/test_gpu_kernels.py \
        -k "l2_prefetch or decode_attention" >"$W/l2pf_tests.txt" 2>&1
    stamp "L2 prefetch and decode attention GPU tests rc=$?"
    # without, then with the prefetch at 9 (o_proj alone), 24 and 40 MiB; the split-key decode
    # attention (runtime/attention.py DECODE_KERNEL) alone and with the prefetch; NVFP4 both
    # the decisive rows first (a cut run keeps them)
    R=tinygemm,int4,int4-l2pf24,int4-attn,int4-l2pf24-attn,int4-l2pf9,int4-l2pf40,nvfp4
    R=$R,nvfp4-l2pf24-attn
    timeout 330 $PY $E2E --formats $R --log "$W/x.jsonl" >"$W/e2e_l2pf.txt" 2>&1
    stamp "end to end with the L2 prefetch and the decode attention rc=$?"
    left=$(( ${X_END:-560} - ($(date +%s) - T0) ))   # X_END=0: no profiles (a short call)
    # where a step's time goes with and without them (eager steps, torch.profiler)
    [ $left -gt 60 ] && timeout $left $PY $E2E --formats int4,int4-l2pf24-attn --repeats 1 \
        --profile "$OUT/l2pf_profile.txt" --log "$W/x.jsonl" >"$W/e2e_profile.txt" 2>&1
    stamp "profiles (${left} s allowed) rc=$?"
    tail -2 "$W/l2pf_tests.txt"; grep -E "FAILED|ERROR" "$W/l2pf_tests.txt" | head -5
    grep -E "^\|" "$W/e2e_l2pf.txt"
    ;;
w)
    # the issue asks, for a goal missed after tuning, the profile that shows the limit: one ncu
    # report a miss, each the first launch of its kernel in a bench_kernels run (its reference
    # check at the first M; the read floor and cuBLAS have none, so their first timed call)
    W=/tmp/next_w && mkdir -p $W
    SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy"
    SECTIONS="$SECTIONS --section LaunchStats --section SchedulerStats --section WarpStateStats"
    profile() {   # name, kernel regex, bench_kernels arguments
        local name=$1 kernel=$2; shift 2
        # W_END: the second of the call by which the last report must be done (a call that ran
        # another part first passes less)
        if [ $(( ${W_END:-560} - ($(date +%s) - T0) )) -lt 100 ]; then stamp "ncu $name: no time left"; return; fi
        timeout 100 ncu --clock-control none --kernel-name "regex:$kernel" --launch-count 1 \
            $SECTIONS --export "$W/$name" $PY kernels/bench_kernels.py --reps 2 \
            --log "$W/w.jsonl" "$@" >"$W/$name.run.txt" 2>&1
        stamp "ncu $name rc=$?"
        ncu --import "$W/$name.ncu-rep" --page details >"$W/$name.txt" 2>&1
    }
    O="o 4096x4096"; GU="gate/up 14336x4096"
    profile m1_int4 _gemv_kernel --ms 1 --shapes "$O" --variants int4-g128
    profile m1_read _read_kernel --ms 1 --shapes "$O" --variants read-int4
    profile m1_bf16 "gemv|gemm|nvjet|sm90" --ms 1 --shapes "$O" --variants bf16
    profile m1_s24 _sparse24_gemv_kernel --ms 1 --shapes "$O" --variants 2:4-int4-g128
    profile m16_tc _tc_matmul_kernel --ms 16 --shapes "$O" --variants int4-g128
    profile m256_dq _tc_dequant_kernel --ms 256 --shapes "$GU" --variants int4-g128
    for f in m1_int4 m1_read m1_bf16 m1_s24 m16_tc m256_dq; do
        echo "== $f"; grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Warp Cycles Per Issued|Eligible Warps" \
            "$W/$f.txt" | head -14
    done | tee "$OUT/w_summary.txt"
    for f in "$W"/*.txt; do echo "==== $f"; cat "$f"; done >"$OUT/w_all.txt"
    tar -C "$W" -czf "$OUT/w_reports.tgz" $(cd "$W" && ls *.ncu-rep) 2>/dev/null
    ;;
esac
