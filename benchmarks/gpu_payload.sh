#!/usr/bin/env bash
# Build here (with network) what a lent GPU machine needs for benchmarks/gpu_check.sh. That machine has Python 3.12,
# torch 2.11 (cu130), timm and most of the scientific stack (numpy, scipy, scikit-image, scikit-learn, pyarrow,
# tensorboard, pytest...), and no network. One `run` call carries at most 64 MiB, so everything goes into the ignored
# folder .gpu/ in pieces:
#   .gpu/ess/       site-ess.tar.xz (hjson, omegaconf, pydantic) + the DeepSpeed sdist: enough for `bench step`
#   .gpu/data/      the real slides and the first tile of every source of stain_he_vs_ihc (GPU tests, data bench)
#   .gpu/dali/NN/   site-dali.tar.xz.partNN: DALI 2.4 + its CUDA 13 libraries, cuCIM, nvImageCodec, OpenSlide,
#                   pydicom, imagecodecs, tifffile, pre-installed for cp312 (no pip run there) and xz-compressed
# Then carry [".gpu/ess", ".gpu/dali/00"], [".gpu/data", ".gpu/dali/01"], ... in back-to-back calls, each running a
# part of gpu_check.sh (see its header). Wheels are cached in .whl/ (downloaded once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${FOUNDATION_TEST_DATA:-../shared/data}
PIECE=${PIECE:-50m}   # one part per call, beside the ~2 MB working tree and the 10 MB data folder
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
ESS=(hjson==3.1.0 omegaconf==2.4.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
     typing-inspection==0.4.5)
# DALI 2.4.0 pins nvidia-libnvcomp-cu13==5.3.0.16; cuCIM without its cupy[ctk] extra (cupy is on the machine).
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
      nvidia-nvtiff-cu13 nvidia-nvimgcodec-cu13==0.9.0.20 astunparse gast optree makefun "libcst~=1.8" nvtx
      cucim-cu13==26.10.0 openslide-python openslide-bin pydicom imagecodecs tifffile "${ESS[@]}")

mkdir -p .whl/ess .whl/dali
"$PY" -m pip download -q -d .whl/ess --no-deps --no-binary :all: deepspeed==0.19.8
"$PY" -m pip download -q -d .whl/ess --no-deps "${PLAT[@]}" "${ESS[@]}"
"$PY" -m pip download -q -d .whl/dali --no-deps "${PLAT[@]}" "${DALI[@]}"

site() {  # $1: folder, rest: wheels -> an installed cp312 site-packages tree, trimmed
  local dir=$1; shift
  rm -rf "$dir"
  "$PY" -m pip install -q --ignore-requires-python --target "$dir" --no-deps --no-compile "${PLAT[@]}" "$@"
  # extension modules for the other Pythons (DALI and nvImageCodec ship one per version), tests, tools
  find "$dir" -name '*.cpython-3*.so' ! -name '*cpython-312*' -delete
  find "$dir" -type d \( -name __pycache__ -o -path '*cucim*/tests' \) -prune -exec rm -rf {} +
  rm -rf "$dir"/nvidia/libnvcomp/bin
}

rm -rf .gpu && mkdir -p .gpu/ess .gpu/data .gpu/dali
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
site "$tmp/gpusite" .whl/ess/*.whl   # both archives unpack to /tmp/gpusite there (gpu_check.sh)
tar -C "$tmp" -cJf .gpu/ess/site-ess.tar.xz gpusite
cp .whl/ess/deepspeed-*.tar.gz .gpu/ess/
site "$tmp/gpusite" .whl/dali/*.whl
tar -C "$tmp" -cf - gpusite | xz -T0 -9 >"$tmp/site-dali.tar.xz"
(cd "$tmp" && sha256sum site-dali.tar.xz >site-dali.sha256)
split -b "$PIECE" -d -a 2 "$tmp/site-dali.tar.xz" "$tmp/site-dali.tar.xz.part"
for part in "$tmp"/site-dali.tar.xz.part*; do
  n=${part##*part}; mkdir -p ".gpu/dali/$n"; mv "$part" ".gpu/dali/$n/"; cp "$tmp/site-dali.sha256" ".gpu/dali/$n/"
done

# the real slides, and one tile per source (what tests/conftest.py's he_tiles/ihc_tiles read)
cp -r "$DATA/wsi" .gpu/data/
for stain in HE IHC; do
  mkdir -p ".gpu/data/tiles/stain_he_vs_ihc/$stain"
  "$PY" - "$DATA/tiles/stain_he_vs_ihc/$stain" ".gpu/data/tiles/stain_he_vs_ihc/$stain" <<'PY'
import re, shutil, sys
from pathlib import Path
firsts = {}
for path in sorted(Path(sys.argv[1]).glob("*.png")):
    firsts.setdefault(re.sub(r"_x\d+_y\d+\.png$", "", path.name), path)
for path in firsts.values():
    shutil.copy(path, sys.argv[2])
PY
done
du -sh .gpu/* .gpu/dali/*
