"""jobs.local.writer.PartWriter: writes run in order behind the caller, at most ``depth``
pending; a write's error comes out on the caller's thread; drain waits for all of them."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.local.writer import PartWriter


def test_writes_run_in_order_on_another_thread_and_drain_waits() -> None:
    done: list[tuple[int, str]] = []
    writer = PartWriter(depth=2)
    for i in range(5):
        writer.submit(lambda i=i: (time.sleep(0.02), done.append((i, threading.current_thread().name))))
    writer.drain()
    assert [i for i, _ in done] == [0, 1, 2, 3, 4]
    assert all(name.startswith("gen-writer") for _, name in done)
    writer.close()


def test_submit_waits_beyond_depth() -> None:
    release = threading.Event()
    started: list[int] = []
    writer = PartWriter(depth=2)
    writer.submit(lambda: (started.append(0), release.wait(5)))
    writer.submit(lambda: started.append(1))
    blocked = threading.Thread(target=writer.submit, args=(lambda: started.append(2),))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "a third pending write must wait for the oldest"
    release.set()
    blocked.join(5)
    writer.close()
    assert started == [0, 1, 2]


def test_a_write_error_is_raised_by_the_next_call() -> None:
    writer = PartWriter()

    def full() -> None:
        raise OSError(28, "No space left on device", "/out/part.parquet")

    writer.submit(full)
    with pytest.raises(OSError, match="No space left"):
        writer.drain()
    writer.submit(full)
    time.sleep(0.05)
    with pytest.raises(OSError):
        writer.submit(lambda: None)
    writer.close(failed=True)  # the rank is already failing: no second raise


def test_without_overlap_writes_run_at_once() -> None:
    here: list[str] = []
    writer = PartWriter(overlap=False)
    writer.submit(lambda: here.append(threading.current_thread().name))
    assert here == [threading.current_thread().name]
    writer.close()
    with pytest.raises(ValueError, match="depth"):
        PartWriter(depth=0)


@pytest.mark.parametrize("overlap", [True, False])
def test_write_and_wait_seconds(overlap: bool) -> None:
    """write_s counts the writes; wait_s only what the caller waited: all of it without overlap,
    little of it when the caller works meanwhile."""
    writer = PartWriter(overlap=overlap)
    for _ in range(3):
        writer.submit(lambda: time.sleep(0.1))
        time.sleep(0.15)  # the caller's own work (the next micro-batch)
    writer.close()
    assert 0.3 <= writer.write_s < 0.6
    if overlap:
        assert writer.wait_s < 0.1
    else:
        assert writer.wait_s >= writer.write_s
