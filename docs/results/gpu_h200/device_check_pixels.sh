#!/bin/bash
# Device check (H200), pixels: EGL rendering on the GPU, speed.py --obs pixels on cuda, a short pixel run.
set -o pipefail
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
mkdir -p /tmp/site && tar -C /tmp/site -xJf .devpack/site.tar.xz || exit 3
export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
[ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ] && export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
python3 -W ignore -c "
import time, envs
e = envs.make_env('walker', 'pixels'); o = e.reset()[0]; t = time.time()
for _ in range(200): o = e.step(e.action_space.sample() if hasattr(e, 'action_space') else None)[0]
print('render ok', o['image'].shape, o['image'].dtype, int(o['image'].mean()), f'{200 / (time.time() - t):.0f} env steps/s (1 env)')
" 2>&1 | tail -3
echo "=== speed.py pixels"; date +%s
timeout 160 python3 -W ignore benchmarks/speed.py --device cuda --task walker --sizes cpu xs s --obs pixels --threads 1 --reps 5 --cost-per-preset 2>&1 | tee $OUT/speed_cuda_pixels.txt
echo "=== train.py pixels"; date +%s
timeout 130 python3 -W ignore train.py --task walker --integration shallow --obs pixels --device cuda --steps 6500 --eval-every 0 --log-every 500 --save-every 100000 --no-progress --threads 1 --logdir /tmp/walker_px 2>&1 | tee $OUT/train_pixels.txt
echo "rc $?"; date +%s
cp /tmp/walker_px/metrics.jsonl $OUT/metrics_pixels.jsonl 2>/dev/null
