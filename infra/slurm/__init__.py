"""Slurm: sbatch templates (``*.sbatch`` here), their rendering, and the mapping of
a task's Slurm environment to the variables torch.distributed reads."""
