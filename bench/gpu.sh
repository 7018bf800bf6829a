#!/usr/bin/env bash
# The one prepared device check (issue 11, D): on a lent GPU, within 9 minutes of device time,
#   1. the `paper` preset's training-step time (bench/gpu_step.py: bf16 autocast, the adversarial
#      branch on), then
#   2. the cross-validated efficacy grid of efficacy/crossval.py on the six BraTS cases (the paper's
#      U-Net widths; the arms that train nothing, 3 seeds, a 6-minute cap),
# each writing its JSON (and the grid its Markdown) under $OUT.
#
#   bench/gpu.sh            # on the device (the `device` tool's run: OUT is set there)
#   bench/gpu.sh --dry      # on a CPU: the same steps at toy sizes (tests/test_gpu_script.py runs it)
#
# The device has torch but not monai, nibabel or scikit-image (the post-processed 3D metrics; with
# lazy_loader): carry them as wheels in .whl (the device README's recipe); the BraTS cases must travel
# too (DATA=path inside the checkout, git-ignored, deleted after).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; fi
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$OUT/env.txt"

if [ "$DRY" = 1 ]; then
  timeout 300 "$PY" bench/gpu_step.py --preset tiny --steps 4 --warmup 1 --precision fp32 --out "$OUT/gpu_step.json"
  timeout 600 "$PY" bench/efficacy/cv.py --arms real real_aug insert --seeds 1 --folds 3 --unet tiny \
    --max-steps 4 --eval-every 2 --n 16 --optimizer adam --name gpu_cv --work "$OUT/work" --out "$OUT"
else
  timeout 150 "$PY" bench/gpu_step.py --preset paper --steps 30 --warmup 5 --precision bf16 --out "$OUT/gpu_step.json"
  timeout 360 "$PY" bench/efficacy/cv.py --arms real real_aug real_fixed_epochs insert insert_online --seeds 3 \
    --unet paper --optimizer adam --name gpu_cv --work "$OUT/work" --out "$OUT" || echo "the grid stopped at its cap: partial rows" >&2
  "$PY" bench/efficacy/cv.py --arms real real_aug real_fixed_epochs insert insert_online --seeds 3 \
    --unet paper --optimizer adam --name gpu_cv --work "$OUT/work" --out "$OUT" --report-only
fi
rm -rf "$OUT/work/cache"
ls -la "$OUT"
