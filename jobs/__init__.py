"""Jobs: what a job is and how it is cut (this package's top-level modules), its output directory
(jobs.output), and the ways it runs: on this node (jobs.local), as SLURM array tasks
(jobs.slurm), or measured (jobs.bench). The only package that touches files; see README's
"Where things are" for the map and tests/unit/test_imports.py for the direction of imports."""

import os

__version__ = "0.1.0"

# torch imports every installed device extension (torch_npu...) inside `import torch` unless
# this is 0, and a broken one (torch_npu without the CANN toolkit) then makes `import torch`
# itself fail. gen's platform detection (parallel.platform) imports torch_npu on its own, only
# where CUDA is absent, and falls back with the reason; the ranks inherit the setting.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
