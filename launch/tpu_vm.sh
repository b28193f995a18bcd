#!/usr/bin/env bash
# Runs an experiment on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/imagenet_wrn50.py gs://bucket/wrn50 [--config.x=y ...]
#
# Every worker runs the same main.py --multihost; jax.distributed.initialize() finds the other
# workers by itself on Cloud TPU (see edgepopup_jax/training/sharding.py). The workdir must be shared by all
# workers (a gs:// bucket), and ImageNet must be prepared for tfds in a bucket the workers read
# (--config.data.data_dir=gs://bucket/tensorflow_datasets). Re-running the same command resumes.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
BRANCH=${BRANCH:-main}
[ -n "$REPO_URL" ] || { echo "set REPO_URL to a git URL the TPU workers can clone"; exit 2; }

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  if [ ! -d edgepopup_jax ]; then git clone --branch $BRANCH $REPO_URL edgepopup_jax; fi
  cd edgepopup_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[train,tpu]'
  nohup .venv/bin/python main.py --multihost --config=$CONFIG --workdir=$WORKDIR $* > train.log 2>&1 &
  echo started on \$(hostname)"
echo "Follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f edgepopup_jax/train.log'"
echo "TensorBoard:  tensorboard --logdir $WORKDIR"
