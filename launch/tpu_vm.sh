#!/usr/bin/env bash
# MobileNetV2 on a multi-host Cloud TPU slice (v4-32, v5e-16, ...): the same
# command on every worker of the TPU VM.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh \
#       --config=configs/imagenet.py --workdir=/mnt/shared/mnv2
#
# The arguments go to `python -m mnv2_flax.main` on every worker. With
# --jax_distributed_auto, jax.distributed.initialize() learns the slice (the
# worker count, this worker's id, worker 0's address) from the TPU metadata
# server.
#
# Once per TPU VM: the repository in ~/$REPO on every worker, installed, e.g.
#   gcloud compute tpus tpu-vm scp --recurse . "$TPU":mnv2_flax --worker=all --zone="$ZONE"
#   gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" \
#       --command='pip install -e "./mnv2_flax[tpu]"'
# WORKDIR must be a local path that every worker mounts (Filestore, gcsfuse):
# all workers write the checkpoints.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REPO="${REPO:-mnv2_flax}"  # Relative to the home directory on each worker.

# printf %q quotes every argument for the workers' shell.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd $(printf '%q' "$REPO") && PYTHONUNBUFFERED=1 python3 -m mnv2_flax.main --jax_distributed_auto $(printf '%q ' "$@")"
