"""Jobs: what a job is and how it is cut (this package's top-level modules), its output directory
(jobs.output), and the ways it runs: on this node (jobs.local), as SLURM array tasks
(jobs.slurm), or measured (jobs.bench). The only package that touches files; see README's
"Where things are" for the map and tests/unit/test_imports.py for the direction of imports."""

__version__ = "0.1.0"
