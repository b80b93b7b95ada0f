"""A run on this node: the launcher (launch), torchrun under it (torchrun), and each rank (worker)."""
