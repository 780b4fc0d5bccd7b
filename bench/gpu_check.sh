#!/usr/bin/env bash
# Every GPU figure of docs/gpu.md in one command, on one GPU (sized to take a few minutes):
#
#   bench/gpu_check.sh [--device cuda|cpu] [--out DIR]
#
#   1. pytest -m gpu                       the CUDA paths' tests (tests/test_gpu.py)
#   2. model speed                         minimind2 at seq 1024, bf16, compiled and eager, beside
#                                          transformers' LlamaForCausalLM of the same shape (bench_train.py)
#   3. document vs causal attention        seq 4096, FlexAttention (bench_attention.py)
#   4. mm train --gpus 1, ~2 minutes       minimind2-small on the demo corpus: tokens/s, MFU, peak memory,
#                                          the share of each step spent waiting for data
#   5. exact resume                        stop_after=20 then resume == straight, fp32, row for row
#
# --device cpu rehearses every step on the CPU at tiny sizes (a few minutes on 2 cores), so that a
# GPU's minutes go to measuring. Logs and figures land in DIR (default gpu_check/); summary.txt
# holds the figures; when $OUT is set, the summary, the speed and training figures and a tarball of the
# logs are copied there too (a folder that a remote runner brings back).
# Without network: run bench/gpu_wheels.sh first where there is one; the wheels in .whl/ are
# installed into scratch space (SITE, default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
DIR=gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) DIR="$2"; shift 2 ;;
    *) echo "usage: bench/gpu_check.sh [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ! "$PY" -c "import zarr" 2>/dev/null; then
  SITE="${SITE:-/tmp/site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
MM=("$PY" -m stages.cli)
SUMMARY="$DIR/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

if [ "$DEVICE" = cpu ]; then   # the rehearsal: every step, tiny sizes
  SPEED_ARGS=(--preset tiny --seq-len 128 --batch 2 --steps 2 --rounds 1 --device cpu --dtype fp32)
  ATTN_ARGS=(--preset tiny --seq-lens 512 --tokens 1024 --rounds 1 --steps 1 --device cpu)
  TRAIN_PRESET=tiny; TRAIN_SETS=(--set train.seq_len=128 --set train.micro_batch_size=4 --set train.max_steps=30)
  RESUME_SETS=(--set train.seq_len=64 --set train.micro_batch_size=4 --set train.max_steps=30)
  GPUS=(--device cpu); PYTEST_MARK="gpu"
else
  SPEED_ARGS=(--preset minimind2 --seq-len 1024 --batch 16 --steps 10 --rounds 3 --device cuda --dtype bf16
              --compile --eager-too)
  ATTN_ARGS=(--preset minimind2-small --seq-lens 4096 --tokens 65536 --rounds 3 --steps 3 --dtype bf16 --device cuda)
  TRAIN_PRESET=minimind2-small
  TRAIN_SETS=(--set train.seq_len=1024 --set train.micro_batch_size=32 --set train.max_steps=600
              --set train.compile=true --set train.dtype=bf16)
  RESUME_SETS=(--set train.seq_len=512 --set train.micro_batch_size=16 --set train.max_steps=40)
  GPUS=(--gpus 1); PYTEST_MARK="gpu"
fi

# ---------------------------------------------------------------- 0. the machine
{
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda,
'| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} > "$DIR/machine.txt" 2>&1
note "machine: $(head -1 "$DIR/machine.txt")"

# ---------------------------------------------------------------- 1. pytest -m gpu
"$PY" -m pytest -q -m "$PYTEST_MARK" tests/test_gpu.py -p no:cacheprovider > "$DIR/pytest_gpu.log" 2>&1
note "1. pytest -m gpu: $(tail -1 "$DIR/pytest_gpu.log")  [$(elapsed)]"

# ---------------------------------------------------------------- 2. model speed
"$PY" bench/bench_train.py "${SPEED_ARGS[@]}" --json "$DIR/speed.json" > "$DIR/speed.log" 2>&1
note "2. model speed: $("$PY" -c "
import json; r = json.load(open('$DIR/speed.json'))
print('; '.join(f\"{k} {v['tokens_per_s']:,.0f} tok/s MFU {v.get('mfu_datasheet', v['mfu']):.1%}\"
                for k, v in r.items() if isinstance(v, dict)), '| mm/transformers', r['speed_ratio_mm_over_transformers'],
      '|', r.get('datasheet_peak', 'vs measured matmul peak'))" 2>&1)  [$(elapsed)]"

# ---------------------------------------------------------------- 4a. the demo corpus (also for 3)
WORK="$DIR/work"
mkdir -p "$WORK"
{
  "${MM[@]}" sample "$WORK/sample.jsonl" &&
  "${MM[@]}" tokenizer "$WORK/sample.jsonl" --vocab-size 6400 --out "$WORK/tokenizer" &&
  "${MM[@]}" tokenize "$WORK/sample.jsonl" --tokenizer "$WORK/tokenizer" --out "$WORK/tokens.zarr" --workers 8 &&
  "${MM[@]}" config --preset "$TRAIN_PRESET" --tokenizer "$WORK/tokenizer" --out "$WORK/model.json"
} > "$DIR/data.log" 2>&1 || { note "data preparation failed: see data.log"; tail -5 "$DIR/data.log"; }

# ---------------------------------------------------------------- 3. document vs causal attention
"$PY" bench/bench_attention.py --corpus "$WORK/sample.jsonl" --tokenizer "$WORK/tokenizer" "${ATTN_ARGS[@]}" \
  --json "$DIR/attention.json" > "$DIR/attention.log" 2>&1
note "3. attention: $("$PY" -c "
import json; r = json.load(open('$DIR/attention.json'))
for T, e in r['by_seq_len'].items():
    s = e.get('steps', {})
    print(f'seq {T}: kernels {e[\"kernel_ms\"]} ms; steps', {m: s[m] for m in ('causal', 'document') if m in s},
          'document/causal', s.get('document_over_causal'))
" 2>&1)  [$(elapsed)]"

# ---------------------------------------------------------------- 4. mm train end to end
TRAIN=("${MM[@]}" train --data "$WORK/tokens.zarr" --tokenizer "$WORK/tokenizer" --model "$WORK/model.json")
"${TRAIN[@]}" "${GPUS[@]}" --resume none "${TRAIN_SETS[@]}" --set train.out_dir="$WORK/run" \
  --set train.eval_interval=200 --set train.save_interval=1000 --set train.log_interval=50 \
  > "$DIR/train.log" 2>&1
note "4. mm train: $("$PY" -c "
import json; m = json.load(open('$WORK/run/metrics.json'))
print({k: m.get(k) for k in ('steps', 'tokens_per_s', 'mfu', 'mfu_vs', 'peak_memory_mb', 'data_wait', 'val_loss')})
" 2>&1)  [$(elapsed)]"

# ---------------------------------------------------------------- 5. exact resume (fp32)
R=("${TRAIN[@]}" "${GPUS[@]}" "${RESUME_SETS[@]}" --set train.dtype=fp32 --set train.compile=false
   --set train.eval_interval=10 --set train.save_interval=1000)
"${R[@]}" --resume none --set train.out_dir="$WORK/straight" > "$DIR/resume.log" 2>&1
"${R[@]}" --resume none --set train.out_dir="$WORK/resumed" --set train.stop_after=20 >> "$DIR/resume.log" 2>&1
"${R[@]}" --set train.out_dir="$WORK/resumed" >> "$DIR/resume.log" 2>&1
note "5. resume: $("$PY" -c "
import sys
def rows(p):
    lines = open(p).read().splitlines(); h = lines[0].split('\t'); keep = [i for i, c in enumerate(h) if c != 'tokens_per_s']
    return [[l.split('\t')[i] for i in keep] for l in lines[1:] if l]
a, b = rows('$WORK/straight/train_log.tsv'), rows('$WORK/resumed/train_log.tsv')
print(f'{len(a)} rows straight, {len(b)} resumed:', 'identical' if a == b and a else 'DIFFERENT')
" 2>&1)  [$(elapsed)]"

for f in train_log.tsv val_log.tsv metrics.json; do cp "$WORK/run/$f" "$DIR/train_$f" 2>/dev/null; done
if [ -n "${OUT:-}" ]; then   # the GPU machine's return folder: at most 8 files come back
  cp "$SUMMARY" "$DIR/speed.json" "$DIR/train_metrics.json" "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$DIR" --exclude work . 2>/dev/null
fi
note "done in $(elapsed); everything in $DIR"
