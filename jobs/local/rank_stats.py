"""What one rank did in a run: its counts, walls and peaks (OUT/.gen/runs/SCOPE/ranks/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RankStats:
    """What one rank did in this run (OUT/.gen/ranks/rank-NNNNN.json)."""

    rank: int
    """Index of this process in the run (over every role's ranks of a split job)."""
    dp_rank: int
    cfg_rank: int
    device: str
    threads: int
    role: str = "monolithic"
    """"monolithic" (the whole pipeline), or the "encoder", "denoiser" or "decoder" role."""
    load_s: float = 0.0
    compile_s: float = 0.0
    """Seconds spent in torch.compile (``--compile``; during the first forwards, inside the
    generation time), to report apart."""
    write_s: float = 0.0
    """Seconds of media encoding and part writes (on the writer thread when overlapped)."""
    write_wait_s: float = 0.0
    """Seconds the rank's own thread spent on those writes (waiting for the writer, or writing
    without overlap): the part of write_s that the generation did wait for."""
    cfg_exchanges: int = 0
    """Collectives within the CFG group (0 without CFG parallelism)."""
    cfg_exchange_s: float = 0.0
    """Seconds in them, waiting for the group's slowest rank included."""
    samples_ok: int = 0
    samples_error: int = 0
    samples_skipped: int = 0
    first_denoise_wall: float | None = None
    first_image_wall: float | None = None
    last_decode_wall: float | None = None
    peak_rss_bytes: int = 0
    peak_device_bytes: int = 0
