#!/usr/bin/env bash
# On a lent GPU machine (Python 3.12, torch 2.11 cu130, timm preinstalled, no network): install the carried wheels,
# run the GPU-marked tests and the benches, write everything under $OUT, print a short table last. ~8 min of device.
#
# Wheels: benchmarks/fetch_gpu_wheels.sh packs them here into .whl/carry/NN (<= 54 MiB each). Carry one bundle per
# call in back-to-back calls (ignored paths stay on a warm machine), e.g. carry [".whl/carry/01"] with command `true`,
# ..., then carry [".whl/carry/00"] with `bash benchmarks/gpu_check.sh`. Pieces are joined and checked against
# SHA256SUMS; a wheel with missing pieces is skipped (and so are the benches that need it: DALI -> data and e2e).
#
# Env: BUDGET_S (default 480) stops starting new sections when less than a section's need is left;
#      STEP_ARGS overrides the iBOT step sweep (default: ViT-L and ViT-B, ZeRO-1/2/3); SKIP_INSTALL=1 skips pip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
START=$(date +%s); BUDGET_S=${BUDGET_S:-480}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }
PY=${PY:-python3}

# ---- wheels: join pieces, verify, install offline
WH=/tmp/gpu_wheels; mkdir -p "$WH"
"$PY" - "$WH" <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log"
import hashlib, re, sys
from collections import defaultdict
from pathlib import Path
wh = Path(sys.argv[1]); sums = {}; parts = defaultdict(dict)
for folder in sorted(Path(".whl/carry").glob("*")):
    for line in (folder / "SHA256SUMS").read_text().split("\n") if (folder / "SHA256SUMS").exists() else []:
        if line.strip():
            digest, name = line.split(); sums[name] = digest
    for f in folder.iterdir():
        m = re.match(r"(.+)\.part(\d\d)of(\d\d)$", f.name)
        if m:
            parts[m[1]][int(m[2])] = (f, int(m[3]))
        elif f.name != "SHA256SUMS":
            parts[f.name][0] = (f, 1)
for name, pieces in sorted(parts.items()):
    total = next(iter(pieces.values()))[1]
    if len(pieces) != total:
        print(f"wheel {name}: {len(pieces)}/{total} pieces carried: skipped"); continue
    data = b"".join(pieces[k][0].read_bytes() for k in range(total))
    if name in sums and hashlib.sha256(data).hexdigest() != sums[name]:
        print(f"wheel {name}: checksum mismatch: skipped"); continue
    (wh / name).write_bytes(data)
print(f"wheels ready: {len(list(wh.iterdir()))}")
PY
export DS_BUILD_OPS=0
if [[ -z "${SKIP_INSTALL:-}" ]] && ls "$WH"/deepspeed-*.tar.gz >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links "$WH" --no-deps "$WH"/*.whl 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
  "$PY" -m pip install -q --no-index --find-links "$WH" --no-build-isolation --no-deps "$WH"/deepspeed-*.tar.gz \
    2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
fi
[[ -n "${SKIP_INSTALL:-}" ]] || "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
HAVE_DALI=0; "$PY" -c "import nvidia.dali, cucim" 2>/dev/null && HAVE_DALI=1
log "installed; DALI+cuCIM importable: $HAVE_DALI"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.log"

# ---- sections (each bounded by timeout and the remaining budget)
section() {  # name, seconds it needs, command...
  local name=$1 need=$2; shift 2
  if (( $(left) < need )); then log "$name: skipped (budget: $(left)s left, needs $need)"; return; fi
  log "$name: start"
  timeout "$(( $(left) - 5 ))" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  log "$name: rc=$rc"; tail -25 "$OUT/$name.log"
}
STEP_ARGS=${STEP_ARGS:---config benchmarks/step_gpu.yaml --model vit_large vit_base --zero 1 2 3}
# iBOT batch 64 / MAE 256 for both sizes keeps one sweep; the reference numbers used 128/512 for ViT-B.
# shellcheck disable=SC2086
section step_ibot 200 "$PY" -m foundation bench step $STEP_ARGS --objective ibot --batch 64 \
  --out "$OUT/bench_step_ibot.json"
section step_mae 120 "$PY" -m foundation bench step --config benchmarks/step_gpu.yaml --model vit_large vit_base \
  --objective mae --zero 1 2 3 --batch 256 --out "$OUT/bench_step_mae.json"
section step_compile 90 "$PY" -m foundation bench step --config benchmarks/step_gpu.yaml --model vit_large \
  --objective ibot --zero 1 --batch 64 --compile --out "$OUT/bench_step_compile.json"
section pytest_gpu 90 "$PY" -m pytest -q -m gpu -x --timeout 300 tests
if (( HAVE_DALI )); then
  section bench_data 60 "$PY" -m foundation bench data --device gpu --out "$OUT/bench_data.json"
  section bench_e2e 90 "$PY" -m foundation bench e2e --config benchmarks/e2e_gpu.yaml --out "$OUT/bench_e2e.json"
else
  log "bench data / e2e: skipped (DALI or cuCIM not installed: carry the DALI bundles)"
fi

# ---- the short table, last
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n== summary (ours/ref: our DeepSpeed step over the plain-PyTorch step, same run) ==")
for f in sorted(out.glob("bench_step*.json")):
    r = json.loads(f.read_text()); print(f"{f.name}: GEMM {r['gemm']['tflops']:.0f} TFLOP/s on {r['environment']['gpu']}")
    for x in r["results"]:
        if "error" in x: print(f"  {x['name']:<34} ERROR {x['error'][:80]}"); continue
        print(f"  {x['name']:<34} ours {x['ours_images_per_s']:8.1f} ref {x['ref_images_per_s']:8.1f} img/s "
              f"ratio {x['ratio']:.2f}  MFU ours {x['ours_mfu']:.2f} ref {x['ref_mfu']:.2f}  "
              f"{x['ours_peak_gb']:.1f}/{x['ref_peak_gb']:.1f} GB")
for f in sorted(out.glob("bench_e2e*.json")):
    x = json.loads(f.read_text())["results"][0]
    print(f"e2e {x['name']}: {x['images_per_s']:.1f} img/s, data wait {x['data_wait_share']:.1%}")
for f in sorted(out.glob("bench_data*.json")):
    print(f"data: {json.dumps(json.loads(f.read_text()))[:300]}")
PY
