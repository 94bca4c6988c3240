#!/usr/bin/env bash
# Download here (with network) every wheel the lent GPU machine needs (Python 3.12, torch 2.11 cu130, timm preinstalled,
# no network there) into the ignored folder .whl/, and pack them into carry bundles of at most 54 MiB each:
#   .whl/carry/NN/        files (big wheels split into 54 MiB pieces named <wheel>.partNN) + SHA256SUMS of whole wheels
# One `run` call may carry 64 MiB, and ignored paths stay on a warm machine between calls, so carry .whl/carry/00,
# then .whl/carry/01, ... in back-to-back calls (each with a trivial command), and the last call runs
# benchmarks/gpu_check.sh, which joins and installs whatever arrived (see its header).
#
#   benchmarks/fetch_gpu_wheels.sh            # step-bench essentials + data stack (no DALI)
#   WITH_DALI=1 benchmarks/fetch_gpu_wheels.sh  # also DALI 2.4 and its CUDA 13 wheels (268 MB: download once)
#   DRY_RUN=1 benchmarks/fetch_gpu_wheels.sh    # resolve only (pip install --dry-run), download nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --only-binary=:all:)
# What the GPU machine lacks. Essentials first: enough for `foundation bench step` and the GPU tests of the trainer.
ESSENTIAL=(hjson msgpack ninja psutil py-cpuinfo "pydantic>=2" einops tqdm packaging omegaconf pyyaml safetensors
           pytest pytest-timeout)
DATA=(tifffile imagecodecs openslide-python openslide-bin pydicom pyarrow scikit-image scipy lazy-loader click
      scikit-learn tensorboard "cucim-cu13==26.10.0")
DALI=("nvidia-dali-cuda130==2.4.0" nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
      nvidia-nvtiff-cu13)

resolve() {  # $1: folder, rest: requirements; binaries for cp312 manylinux, without torch (preinstalled there)
  local dir=$1; shift
  if [[ -n "${DRY_RUN:-}" ]]; then
    "$PY" -m pip install --dry-run --ignore-installed --target /tmp/fetch-gpu-dry "${PLAT[@]}" "$@" \
      | grep -i "would install" || true
  else
    "$PY" -m pip download -d "$dir" "${PLAT[@]}" "$@"
  fi
}

[[ -n "${DRY_RUN:-}" ]] || mkdir -p "$DEST/essential" "$DEST/data" "$DEST/dali"
# deepspeed is source-only; its requirements (torch excluded) are in ESSENTIAL.
if [[ -z "${DRY_RUN:-}" ]]; then
  "$PY" -m pip download -d "$DEST/essential" --no-deps --no-binary :all: "deepspeed==0.19.8"
fi
resolve "$DEST/essential" "${ESSENTIAL[@]}"
# cucim-cu13 --no-deps (its cupy[ctk] extra pulls ~1.35 GB); its light requirements are listed in DATA.
if [[ -z "${DRY_RUN:-}" ]]; then
  "$PY" -m pip download -d "$DEST/data" "${PLAT[@]}" --no-deps "cucim-cu13==26.10.0" nvidia-nvimgcodec-cu13
  resolve "$DEST/data" "${DATA[@]:0:12}"
else
  resolve "$DEST/data" "${DATA[@]:0:12}"
fi
if [[ -n "${WITH_DALI:-}" ]]; then
  resolve "$DEST/dali" "${DALI[@]}"
fi
[[ -n "${DRY_RUN:-}" ]] && exit 0

# Drop what the GPU machine already has (torch and its CUDA wheels, numpy, pillow...) so bundles stay small.
find "$DEST" -maxdepth 2 \( -name 'torch-*' -o -name 'nvidia_cu*' -o -name 'nvidia_nccl*' -o -name 'triton-*' \
  -o -name 'numpy-*' -o -name 'pillow-*' -o -name 'sympy-*' -o -name 'networkx-*' -o -name 'jinja2-*' \
  -o -name 'fsspec-*' -o -name 'filelock-*' -o -name 'typing_extensions-*' -o -name 'mpmath-*' \
  -o -name 'markupsafe-*' \) -delete

"$PY" - "$DEST" <<'PY'
"""Pack .whl/{essential,data,dali} into .whl/carry/NN bundles of <= 54 MiB (big files split into .partNN)."""
import hashlib, shutil, sys
from pathlib import Path
dest = Path(sys.argv[1]); carry = dest / "carry"; limit = 54 * 1024**2
shutil.rmtree(carry, ignore_errors=True)
bundles, size = [[]], 0
for group in ("essential", "data", "dali"):
    for f in sorted((dest / group).glob("*")):
        data = f.read_bytes(); digest = hashlib.sha256(data).hexdigest()
        pieces = [data[i:i + limit] for i in range(0, len(data), limit)] or [b""]
        for k, piece in enumerate(pieces):
            if size + len(piece) > limit and bundles[-1]:
                bundles.append([]); size = 0
            name = f.name if len(pieces) == 1 else f"{f.name}.part{k:02d}of{len(pieces):02d}"
            bundles[-1].append((name, piece, f"{digest}  {f.name}")); size += len(piece)
for n, bundle in enumerate(bundles):
    folder = carry / f"{n:02d}"; folder.mkdir(parents=True)
    for name, piece, line in bundle:
        (folder / name).write_bytes(piece)
    (folder / "SHA256SUMS").write_text("\n".join(sorted({line for *_, line in bundle})) + "\n")
    print(folder, sum(len(p) for _, p, _ in bundle) // 1024**2, "MiB", len(bundle), "files")
PY
