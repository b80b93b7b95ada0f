"""What the environment says to a platform policy: visibility variables (which devices a
process sees) and per-job collective ports (HCCL_IF_BASE_PORT). Pure: no torch."""

from __future__ import annotations

HCCL_PORT_FIRST = 16384
"""Lowest HCCL_IF_BASE_PORT gen derives: below Linux's ephemeral range (32768-60999), where
the rendezvous ports torchrun picks live."""
HCCL_PORT_BLOCK = 32
"""Ports HCCL takes from its base (CANN docs: 16 in older releases, 32 since CANN 8.2)."""
HCCL_PORT_BLOCKS = 512
"""Blocks of HCCL_PORT_BLOCK ports in [16384, 32768)."""


def parse_visible_devices(var: str | None, value: str | None) -> tuple[str, ...] | None:
    """Parse and check a visibility variable.

    CUDA_VISIBLE_DEVICES: device indices or GPU-/MIG- UUIDs, comma-separated, no repeats.
    ASCEND_RT_VISIBLE_DEVICES: device ids (digits only), comma-separated, strictly ascending
    (torch_npu stops reading at the first other character and sees no device at all when
    the ids are out of order, so gen refuses such values rather than run on fewer devices).

    Args:
        var: the variable's name (None: nothing to parse).
        value: its value; None when unset; "" means no device.
    Returns:
        The entries, in order; None when unset.
    Raises:
        ValueError: a malformed value; the message names the variable and the value.
    """
    if var is None or value is None:
        return None
    text = value.strip()
    if not text:
        return ()
    items = [item.strip() for item in text.split(",")]
    if var == "ASCEND_RT_VISIBLE_DEVICES":
        ok = all(item.isdigit() for item in items)
        ok = ok and all(int(a) < int(b) for a, b in zip(items, items[1:]))
        allowed = "device ids (digits) separated by commas, in ascending order, e.g. 0,1,2,3"
    else:
        ok = all(item.isdigit() or item.startswith(("GPU-", "MIG-")) for item in items)
        ok = ok and len(set(items)) == len(items)
        allowed = "device indices or GPU-/MIG- UUIDs separated by commas, without repeats, e.g. 0,1"
    if not ok:
        raise ValueError(f"{var}={value!r} is invalid: {allowed}")
    return tuple(str(int(i)) if i.isdigit() else i for i in items)


def hccl_base_port(rdzv_port: int) -> int:
    """HCCL_IF_BASE_PORT of a job, derived from its rendezvous port.

    HCCL listens on HCCL_PORT_BLOCK ports from its base (default 60000 for every job, so two
    jobs on one node collide). Jobs running at once on a node have different rendezvous
    ports; each gets block ``rdzv_port % 512`` of [16384, 32768), so any 512 consecutive
    rendezvous ports get disjoint blocks. The kernel's free ports (torchrun's rendezvous) are
    ephemeral, >= 32768, outside every block; the few ports in [16384, 32768) whose own block
    would hold them (16384 is one) take the next block instead.

    Args:
        rdzv_port: the job's rendezvous (MASTER_PORT) port, in [1, 65535].
    Returns:
        A base port in [16384, 32736], a multiple of 32.
    Raises:
        ValueError: rdzv_port out of range.
    """
    if not 1 <= rdzv_port <= 65535:
        raise ValueError(f"rendezvous port {rdzv_port} is invalid: must be in [1, 65535]")
    block = rdzv_port % HCCL_PORT_BLOCKS
    base = HCCL_PORT_FIRST + HCCL_PORT_BLOCK * block
    if base <= rdzv_port < base + HCCL_PORT_BLOCK:
        base = HCCL_PORT_FIRST + HCCL_PORT_BLOCK * ((block + 1) % HCCL_PORT_BLOCKS)
    return base
