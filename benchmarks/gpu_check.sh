#!/usr/bin/env bash
# The GPU checks of issues 3 and 7, on a lent GPU machine (Python 3.12, torch 2.11 cu130, timm, no network), in parts
# that each fit one `run` call while the DALI libraries travel in pieces (benchmarks/gpu_payload.sh builds .gpu/):
#
#   call 1  carry [".gpu/ess", ".gpu/dali/00"]   bash benchmarks/gpu_check.sh step    # bench step sweep (~4 min)
#                                                 (or `profile`: the ViT-L steps profiled, ViT-B timed, ~3.5 min)
#   call 2  carry [".gpu/data", ".gpu/dali/01"]  bash benchmarks/gpu_check.sh extra   # compiled blocks (~2 min)
#   call 3  carry [".gpu/dali/02"]               bash benchmarks/gpu_check.sh stash   # (only if there are 4 parts)
#   call N  carry [".gpu/dali/NN"]               bash benchmarks/gpu_check.sh data    # DALI: GPU tests, bench data, e2e
#   or, with everything carried at once (a machine with the packages): bash benchmarks/gpu_check.sh all
#   With 15 device minutes, the order that worked on 2026-11-26: `stash` with 00, 01 (+ .gpu/data), 02; then
#   `data` with .gpu/ess + 03 (BUDGET_S=125: ~2 min); then `step` (SWEEP=core BUDGET_S=195: ~2.5 min); give back.
#   Second session: `profile` with ess + 00 (175 s), two short `stash`+bench calls with 01 (+ data) and 02, `data`
#   with 03 (137 s), give back; a second lease later for `profile` with ess alone (203 s + start).
#   Fourth session (H200): `zero3` with ess alone, twice (290 s and 306 s; the machine started in ~30 s each).
#   Suggested next: `zero3` with ess alone (~5.5 min: train.zero3_in_place_fetch measured; if it holds, make it the
#   default), then the four DALI calls ending in `data` (pytest -m gpu now compiles blocks: give it BUDGET_S=300).
#   `step`, `profile` and `data` now time compiled blocks on our side (train.compile_blocks: auto); add
#   STEP_EXTRA=train.compile_blocks=false for eager ones.
#
# Calls must follow each other within the machine's warm period (30 s): each stashes what it carried under
# /tmp/gpu_stage (outside the repository) and installs what it can. Results: $OUT/<part>.log (everything),
# bench_*.json, <part>_logs.tgz (each section's full log); a short table is printed last.
#   `profile` (PROFILE_ZERO=1|3): MAE and iBOT ViT-L with --profile (kernel time by kind, device idle), then ViT-B.
# Env: BUDGET_S (seconds for this part's sections), STEP_EXTRA (overrides appended to every bench step),
#      SWEEP=core (a short step sweep), SKIP_PYTEST=1 (data part: benches only).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${OUT:-out}; mkdir -p "$OUT"
STAGE=/tmp/gpu_stage; mkdir -p "$STAGE/parts" "$STAGE/logs"
START=$(date +%s)
case $PART in step) BUDGET_S=${BUDGET_S:-250};; profile) BUDGET_S=${BUDGET_S:-250};; zero3) BUDGET_S=${BUDGET_S:-390};; extra) BUDGET_S=${BUDGET_S:-130};; data) BUDGET_S=${BUDGET_S:-260};;
              all) BUDGET_S=${BUDGET_S:-700};; *) BUDGET_S=${BUDGET_S:-30};; esac
LOG="$OUT/$PART.log"
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
log() { echo "[$PART $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 FOUNDATION_TEST_DATA=$STAGE/data
export PYTHONPATH=$PWD:/tmp/gpusite${PYTHONPATH:+:$PYTHONPATH}

# ---- stash what this call carried (carried paths are replaced by the next call's)
for f in .gpu/dali/*/site-dali.*; do [[ -e $f && ! -e $STAGE/parts/${f##*/} ]] && cp "$f" "$STAGE/parts/"; done
[[ -d .gpu/ess && ! -d $STAGE/ess ]] && cp -r .gpu/ess "$STAGE/ess"
[[ -d .gpu/data && ! -d $STAGE/data ]] && cp -r .gpu/data "$STAGE/data"
log "stashed: $(ls "$STAGE/parts" | tr '\n' ' ')"

install_ess() {
  [[ -e $STAGE/ess.done ]] && return 0
  [[ -d $STAGE/ess ]] || { log "essentials not carried (.gpu/ess)"; return 1; }
  tar -C /tmp -xJf "$STAGE"/ess/site-ess.tar.xz || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$STAGE"/ess/deepspeed-*.tar.gz 2>&1 | tail -3
  "$PY" -c "import deepspeed, omegaconf, hjson, pydantic" && touch "$STAGE/ess.done"
  log "essentials installed: $([[ -e $STAGE/ess.done ]] && echo yes || echo NO)"
}
install_dali() {
  [[ -e $STAGE/dali.done ]] && return 0
  (cd "$STAGE/parts" && cat site-dali.tar.xz.part* >site-dali.tar.xz && sha256sum -c site-dali.sha256) \
    >>"$LOG" 2>&1 || { log "DALI pieces missing or damaged: $(ls "$STAGE/parts" | tr '\n' ' ')"; return 1; }
  tar -C /tmp -xJf "$STAGE/parts/site-dali.tar.xz" && rm -f "$STAGE/parts/site-dali.tar.xz"
  "$PY" -c "import nvidia.dali, cucim, openslide, nvidia.nvimgcodec" >>"$LOG" 2>&1 && touch "$STAGE/dali.done"
  log "DALI + cuCIM installed: $([[ -e $STAGE/dali.done ]] && echo yes || echo NO)"
}

section() {  # name, seconds it needs, command...: bounded by the part's budget, full log kept, tail shown
  local name=$1 need=$2; shift 2
  if (( $(left) < need )); then log "$name: skipped (budget: $(left)s left, needs $need)"; return; fi
  log "$name: start"
  timeout -k 5 "$(( $(left) - 3 ))" "$@" >"$STAGE/logs/$name.log" 2>&1; local rc=$?
  log "$name: rc=$rc"; tail -15 "$STAGE/logs/$name.log"
  tar -C "$STAGE/logs" -czf "$OUT/${PART}_logs.tgz" .
}
step() {  # name, need, bench step arguments...
  local name=$1 need=$2; shift 2
  # shellcheck disable=SC2086
  section "$name" "$need" "$PY" -m foundation bench step --config benchmarks/step_gpu.yaml "$@" \
    --out "$OUT/bench_$name.json" ${STEP_EXTRA:-}
}

summary() {
  "$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n== summary (ours/ref: our DeepSpeed step over the plain-PyTorch step, same run, same GPU) ==")
for f in sorted(out.glob("bench_step*.json")):
    r = json.loads(f.read_text())
    print(f"{f.name}: GEMM {r['gemm']['tflops']:.0f} TFLOP/s on {r['environment'].get('gpu')}")
    for x in r["results"]:
        if "error" in x:
            print(f"  {x['name']:<30} ERROR {x['error'][:90]}"); continue
        print(f"  {x['name']:<30} ours {x['ours_images_per_s']:7.1f} ref {x['ref_images_per_s']:7.1f} img/s "
              f"ratio {x['ratio']:.2f} MFU {x['ours_mfu']:.2f}/{x['ref_mfu']:.2f} "
              f"GB {x['ours_peak_gb']:.1f}/{x['ref_peak_gb']:.1f} loss0 {x['ours_loss_step0']:.4f}/{x['ref_loss_step0']:.4f}")
        for side in ("ours", "ref"):
            if f"{side}_profile" in x:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in x[f"{side}_profile"]["device_ms_per_step_by_kind"].items())
                print(f"    {side}: {x[f'{side}_step_s'] * 1000:.1f} ms/step, kernels {x[f'{side}_device_ms']:.1f} ms "
                      f"(idle {x[f'{side}_idle_share']:.0%}): {kinds}")
for f in sorted(out.glob("bench_e2e*.json")):
    for x in json.loads(f.read_text())["results"]:
        print(f"e2e {x.get('name')}: {x.get('images_per_s', 0):.1f} img/s, data wait {x.get('data_wait_share', 0):.1%}")
for f in sorted(out.glob("bench_data*.json")):
    r = json.loads(f.read_text())
    o, b = r.get("ours", {}), r.get("baseline", {})
    print(f"data {f.name}: ours {json.dumps(o)[:220]}\n  baseline {json.dumps(b)[:160]}\n  ratio {r.get('ratio')}")
PY
}

log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
case $PART in step|profile|zero3|extra|stash|data|all) ;;
  *) echo "unknown part $PART: step | profile | zero3 | extra | stash | data | all" >&2; exit 2;; esac
if [[ $PART == step || $PART == all ]]; then
  install_ess || exit 1
  if [[ ${SWEEP:-full} == core ]]; then  # the goals' corners: ViT-L iBOT and MAE at ZeRO-1 and 3, ViT-B iBOT ZeRO-1
    step step_ibot_vitl 60 --model vit_large --objective ibot --batch 64 --zero 1 3
    step step_mae_vitl 40 --model vit_large --objective mae --batch 256 --zero 1 3
    step step_ibot_vitb 30 --model vit_base --objective ibot --batch 128 --zero 1
  else
    step step_ibot_vitl 70 --model vit_large --objective ibot --batch 64 --zero 1 2 3
    step step_ibot_vitb 60 --model vit_base --objective ibot --batch 128 --zero 1 2 3
    step step_mae_vitl 45 --model vit_large --objective mae --batch 256 --zero 1 2 3
    step step_mae_vitb 40 --model vit_base --objective mae --batch 512 --zero 1 3
  fi
fi
if [[ $PART == profile ]]; then  # where the step's time goes: kernel time by kind and device idle share, both sides
  install_ess || exit 1
  step profile_mae_vitl 50 --model vit_large --objective mae --batch 256 --zero ${PROFILE_ZERO:-1} --profile 2
  step profile_ibot_vitl 60 --model vit_large --objective ibot --batch 64 --zero ${PROFILE_ZERO:-1} --profile 2
  step step_ibot_vitb 40 --model vit_base --objective ibot --batch 128 --zero 1
  step step_mae_vitb 30 --model vit_base --objective mae --batch 512 --zero 1
fi
if [[ $PART == zero3 ]]; then  # ZeRO-3 with the in-place fetch (profiled), its baseline, compiled ViT-B at ZeRO-1
  install_ess || exit 1
  INPLACE=train.zero3_in_place_fetch=true
  STEP_EXTRA=$INPLACE step profile_mae_vitl_z3_inplace 60 --model vit_large --objective mae --batch 256 --zero 3 --profile 2
  STEP_EXTRA=$INPLACE step profile_ibot_vitl_z3_inplace 80 --model vit_large --objective ibot --batch 64 --zero 3 --profile 2
  STEP_EXTRA=$INPLACE step step_ibot_vitb_z3_inplace 30 --model vit_base --objective ibot --batch 128 --zero 3
  STEP_EXTRA=$INPLACE step step_mae_vitb_z3_inplace 25 --model vit_base --objective mae --batch 512 --zero 3
  step step_mae_vitl_z3 35 --model vit_large --objective mae --batch 256 --zero 3  # DeepSpeed's fetch, same session
  step step_ibot_vitb_z1 60 --model vit_base --objective ibot --batch 128 --zero 1  # compiled blocks (auto)
  step step_mae_vitb_z1 45 --model vit_base --objective mae --batch 512 --zero 1
fi
if [[ $PART == extra || $PART == all ]]; then
  install_ess || exit 1
  step step_compile_ibot 80 --model vit_large --objective ibot --batch 64 --zero 1 --compile
  step step_compile_mae 45 --model vit_large --objective mae --batch 256 --zero 1 --compile
fi
if [[ $PART == data || $PART == all ]]; then
  install_ess || exit 1
  install_dali || exit 1
  # every gpu-marked test; without CUDA they would all skip and pytest would still exit 0: refuse that first
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" >>"$LOG" 2>&1 \
    || { log "CUDA not visible to torch: GPU tests not run"; exit 1; }
  [[ -n ${SKIP_PYTEST:-} ]] || section pytest_gpu_data 60 "$PY" -m pytest -q -m gpu --timeout 300 \
    -p no:cacheprovider tests/test_pipeline_gpu.py tests/test_stain_dali.py tests/test_train_gpu.py \
    tests/test_bench_step.py
  # reader_workers: auto (8 reader processes on a 16-core one-GPU machine), then reading in the training process
  section bench_data 60 "$PY" -m foundation bench data --device gpu --workers 8 --batch-size 128 --batches 40 \
    --warmup 8 --rounds 1 --out "$OUT/bench_data.json"
  section bench_data_inprocess 60 "$PY" -m foundation bench data --device gpu --workers 8 --batch-size 128 \
    --batches 10 --rounds 1 --out "$OUT/bench_data_inprocess.json" data.pipeline.reader_workers=0
  section bench_e2e 50 "$PY" -m foundation bench e2e --config benchmarks/e2e_gpu.yaml --out "$OUT/bench_e2e.json"
  # issue 3's criterion: the data-wait share of a ViT-B/16 MAE run (the real recipe, batch 256, 224 px crops)
  section bench_e2e_vitb_mae 60 "$PY" -m foundation bench e2e --config vit_b_mae --steps 20 \
    --out "$OUT/bench_e2e_vitb_mae.json"
fi
summary
