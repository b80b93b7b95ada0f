"""Jobs: CLI, manifest, plan, launch, worker loop, outputs. Only this package touches files."""

__version__ = "0.1.0"
