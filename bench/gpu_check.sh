#!/usr/bin/env bash
# The GPU check (issue 15 item 6), as run on a lent H200 through the device tool. It needs
# what cannot be built there (no Rust toolchain, no network), prepared here and carried:
#   bash tools/cuda-build.sh && strip -o gpu/vipo target/cuda/release/vipo && gzip -9 gpu/vipo
#   VIPO_TINY_DIR=$PWD/gpu/tiny cargo test --release --lib write_tiny_models -- --ignored
#   pip download diffusers + importlib_metadata wheels into .whl/  (torch and peft are there)
# then: run(command="bash bench/gpu_check.sh", carry=["gpu", ".whl"]).
# Stages, each under its own time limit so one failure leaves the rest measured:
#   1. the tiny SD3.5 and FLUX configs, GRPO in f32 and ViPO in bf16 (the on-policy parity
#      check runs in every update; its max |ratio − 1| is printed)
#   2. `vipo bench attention`: the attention op's insides against the composed attention
#      (bf16, FLUX.1-dev's batch 4 × 24 heads × 1 536 tokens × 128)
#   3. `vipo bench gen-step`: one GRPO/ViPO step of full-size FLUX.1-dev and SD3.5-M
#      transformers (+ VAE) on random bf16 weights at 512², and one update micro-batch's
#      forward + backward
#   4. bench/pytorch_gen.py: diffusers' same transformers, same micro-batch, forward +
#      backward and forward, in bf16 with PEFT LoRA and gradient checkpointing
# Device memory is sampled with nvidia-smi every 200 ms (candle's allocator keeps no peak).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
SUM=$OUT/summary.txt
LOG=$OUT/all.log
BIN=${VIPO_BIN:-gpu/vipo}
say() { echo "$*" | tee -a "$SUM"; }
# The stripped CUDA binary is ≈ 68 MB (candle's PTX kernels), over what a call carries:
# it travels gzipped.
[ -x "$BIN" ] || { gunzip -c "$BIN.gz" > "$BIN" && chmod +x "$BIN"; } || { say "no $BIN"; exit 1; }

# The CUDA 13 libraries the binary links (cuBLAS, cuRAND, NVRTC) live in the Python
# environment's NVIDIA wheels there.
PYSITE=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
LIBDIRS=$(find $PYSITE /usr/local/cuda* /usr/lib/x86_64-linux-gnu \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcublasLt.so.13' -o -name 'libcudart.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd: -)
export LD_LIBRARY_PATH=$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
say "libraries: $LIBDIRS"
ldd "$BIN" | grep -E "not found" | tee -a "$SUM"

stage() { # name seconds command...  (GPU_CHECK_ONLY="name …" runs just those)
  local name=$1 secs=$2
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "/tmp/mem_$name" 2>/dev/null &
  local mw=$! t0=$SECONDS
  echo "=== $name: $*" >> "$LOG"
  timeout "$secs" "$@" >> "$LOG" 2>&1
  local rc=$?
  kill $mw 2>/dev/null
  wait $mw 2>/dev/null
  local dt=$((SECONDS - t0)) peak base
  peak=$(sort -n "/tmp/mem_$name" | tail -1)
  base=$(head -1 "/tmp/mem_$name")
  say "--- $name: rc $rc, $dt s wall, device memory ${base:-?} → peak ${peak:-?} MiB"
  # the stage's own lines worth keeping
  sed -n "/^=== $name:/,\$p" "$LOG" | grep -E "gen-step|trace:|fwd|step \(|ratio|reward|peak|error|Error|panicked|\{\"model" | tail -8 | tee -a "$SUM"
}

RUNS=/tmp/vipo-runs
[ -n "${GPU_CHECK_SKIP_TINY:-}" ] || for m in sd35:sd3 flux:flux; do
  cfg=${m%%:*} sec=${m##*:}
  stage "tiny-$cfg-grpo-f32" 45 "$BIN" train --quiet --config "configs/tiny-$cfg.toml" --set "$sec.model=gpu/tiny/$cfg" --set train.algo=grpo --set out_dir=$RUNS --set run_name=$cfg-grpo
  stage "tiny-$cfg-vipo-bf16" 45 "$BIN" train --quiet --config "configs/tiny-$cfg.toml" --set "$sec.model=gpu/tiny/$cfg" --set train.algo=vipo --set "$sec.dtype=bf16" --set out_dir=$RUNS --set run_name=$cfg-vipo-bf16
done
for f in $RUNS/*/metrics.jsonl; do
  say "$f: $(grep -o '"ratio_dev_first":[^,}]*' "$f" | tr '\n' ' ')"
done

[ -n "${GPU_CHECK_TINY_ONLY:-}" ] && exit 0
# Full size, random weights: FLUX.1-dev (4 samples = one micro-batch per transition) and
# SD3.5-M (8 samples, CFG: 16 rows per micro-batch, KL 0.04 as its config).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH=/tmp/site
fi
# Each vipo figure first, then diffusers' for the same micro-batch. The parity bound is
# loosened to 1e-2 here so that a bf16 deviation is printed, not fatal.
export VIPO_TRACE=1
# The attention op (issue 37 item 2) against the composed attention, bf16 at FLUX's shape.
stage attention 40 "$BIN" bench attention --iters 3
stage gen-flux-vipo 190 "$BIN" bench gen-step --config configs/flux-dev.toml --iters 2 --steps 1 --set train.prompts_per_step=1 --set train.group_size=4 --set train.ratio_dev_bound=0.01
stage torch-flux 60 python3 bench/pytorch_gen.py --model flux --batch 4
stage gen-sd35-grpo 130 "$BIN" bench gen-step --config configs/sd35-medium.toml --iters 2 --steps 1 --set train.prompts_per_step=1 --set train.group_size=8 --set train.ratio_dev_bound=0.01
stage torch-sd35 75 python3 bench/pytorch_gen.py --model sd3 --batch 16
[ -n "${GPU_CHECK_SKIP_TINY:-}" ] || stage mmdit-small 30 "$BIN" bench mmdit --iters 3
say "== done $(date -u +%FT%TZ)"
