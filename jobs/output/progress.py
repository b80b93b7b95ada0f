"""Progress bar in the launcher: sums the per-rank progress files the ranks keep up to date.

The launcher sees every rank (rank 0 alone knows only its own share), works the same for one
in-process rank and for torchrun ranks, and costs the ranks one tiny file write per micro-batch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tqdm import tqdm


class ProgressMonitor:
    """A tqdm bar (images, images/s, ETA) fed by OUT/.gen/progress/rank-*.json.

    Args:
        progress_dir: the directory of progress files (emptied by the launcher before the run).
        total: images this run is expected to finish.
        interval_s: polling period in seconds.
    """

    def __init__(self, progress_dir: Path, total: int, interval_s: float = 0.5) -> None:
        self.dir = progress_dir
        self.total = total
        self.bar: tqdm | None = None  # created when the first rank has loaded its model
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gen-progress", daemon=True)
        self._shown = 0

    def _read(self) -> int | None:
        files = list(self.dir.glob("rank-*.json"))
        if not files:
            return None
        done = 0
        for p in files:
            try:
                done += json.loads(p.read_text())["samples"]
            except (OSError, ValueError, KeyError):
                continue  # being replaced right now; next poll
        return done

    def _refresh(self) -> None:
        done = self._read()
        if done is None:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, unit="img", desc="generate", dynamic_ncols=True,
                            smoothing=0.1)  # fmt: skip
        done = min(done, self.total)
        if done > self._shown:
            self.bar.update(done - self._shown)
            self._shown = done

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._refresh()

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        if self.bar is not None:
            self.bar.close()
