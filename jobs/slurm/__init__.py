"""SLURM: `gen batch --slurm` as array tasks submitted with submitit.

params (sbatch options, arrays) -> submit (plan, sbatch through submitit) -> task (what each
array task runs on its node: a local run of its shards, jobs.local) ; wait (--wait).
"""
