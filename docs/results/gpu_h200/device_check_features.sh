#!/bin/bash
# Device check (H200): the CUDA smoke test, speed.py on cuda, and a short run of the README's GPU command.
set -o pipefail
mkdir -p /tmp/site && tar -C /tmp/site -xJf .devpack/site.tar.xz || exit 3
export PYTHONPATH=/tmp/site MUJOCO_GL=disable PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, mujoco, dm_control, tyro, submitit; import contexts; contexts.carl(); print('torch', torch.__version__, torch.cuda.get_device_name(), 'mujoco', mujoco.__version__)" || exit 4
echo "=== pytest cuda smoke"; date +%s
timeout 150 python3 -m pytest -q -p no:cacheprovider test_dali.py -k cuda_smoke -rs 2>&1 | tail -15
echo "=== speed.py"; date +%s
timeout 150 python3 benchmarks/speed.py --device cuda --task walker --sizes cpu xs s --obs features --threads 1 --reps 5 --cost-per-preset 2>&1 | tee $OUT/speed_cuda.txt
echo "=== train.py size s"; date +%s
timeout 170 python3 train.py --task walker --integration shallow --size s --device cuda --steps 6500 --eval-every 0 --log-every 1000 --save-every 100000 --no-progress --threads 1 --logdir /tmp/walker_s 2>&1 | tee $OUT/train_s.txt
echo "rc $?"; date +%s
cp /tmp/walker_s/*.jsonl $OUT/ 2>/dev/null; ls -la /tmp/walker_s
