"""Ranks, devices and branch execution. The only package that imports torch.distributed."""
