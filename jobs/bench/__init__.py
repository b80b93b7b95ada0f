"""`gen bench`: gen against a plain diffusers loop, and what CFG parallelism and gating buy."""
