#!/bin/bash
# the README's MNIST command with labels=file, run until it completes; the person is person.py
set -e
cd /work/dev
export PYTHONPATH=/work/dev
O=/work/main/outputs/hand_mnist/run
for i in 1 2 3; do
  date
  /work/main/.venv/bin/python -m jobs.select experiment=mnist_adv60 method=rbc seed=0 data.root=/work/shared/data output_dir=$O labels=file 2>&1 | grep -v "WARNING\|INFO \(worker\|streaming\|dataset\)"
  if [ -f $O/metrics.json ]; then break; fi
  /work/main/.venv/bin/python /work/main/outputs/hand_mnist/person.py $O
done
date
