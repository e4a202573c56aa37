"""Starting `mnv2_flax.main` on one machine or many.

One machine with any number of GPUs (or a single-host TPU VM) needs no
launcher: one process sees every local device and the train step is sharded
over all of them.

  python -m mnv2_flax.main --config=configs/imagenet.py --workdir=DIR

(global_batch_size and eval_batch_size must divide by the device count;
CUDA_VISIBLE_DEVICES picks the GPUs.) Several hosts run one process each, or
one per GPU, that find each other through jax.distributed:

  local.py      N processes on this machine: the multi-host code path on CPU.
  slurm.sbatch  A SLURM cluster, one task per GPU.
  tpu_vm.sh     A multi-host Cloud TPU slice, one process per TPU VM worker.
  sweep.py      A sweep file's points x seeds: local workers or SLURM job arrays,
                resumable; report.py turns its WORKDIR into tables and plots.

Every process of a job must see the same WORKDIR, a local path on a shared
filesystem: all of them write the checkpoints, process 0 writes results.json.
"""
