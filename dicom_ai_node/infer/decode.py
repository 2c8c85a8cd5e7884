"""Decoding the frames of a series, in parallel where that pays (see load_series in volume.py).

Compressed pixel data (JPEG 2000, JPEG-LS, JPEG, RLE) decodes at a few tens of 512 x 512 frames per
second per core, in C code that keeps the GIL (pylibjpeg-openjpeg calls its decoder without releasing
it), so threads do not help: such frames are decoded in a pool of processes, in chunks, by at most
min(idle cores, 8) of them. Uncompressed frames are read at hundreds per second, more than a pool could
ship back: they are decoded here.

Same results and errors as decoding one frame after the other: frames come back in order, and the first
frame (in order) that fails raises its own error. Processes are spawned, not forked: the worker that
loads a series has threads (and database connections) that a forked copy must not inherit; a script that
loads compressed series must therefore keep its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import numpy as np

from dicom_ai_node.infer.transfer import release_pages

log = logging.getLogger(__name__)

Item = TypeVar("Item")

MAX_DECODE_WORKERS = 8
# Below this many compressed frames, starting the processes (importing numpy and pydicom) costs more
# than decoding in this one.
MIN_PARALLEL_FRAMES = 64
# Frames per task: large enough that shipping arguments and results back is a small part of the work,
# small enough that the workers finish together.
_CHUNK = 8
# Frames written into a shared file between two releases of their pages from this process.
_RELEASE_EVERY = 16


def decode_workers(frames: int, compressed: bool) -> int:
    """How many processes decode `frames` frames: 1 (this one) for uncompressed or short series, and when
    fewer than two cores are idle (1-minute load average); else up to min(idle cores, 8), never more than
    there are chunks. On cores that are busy anyway, a pool only adds its start-up (0.86-1.07x measured on
    two busy cores, docs/performance.md)."""
    if not compressed or frames < MIN_PARALLEL_FRAMES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = int(cpus - os.getloadavg()[0])
    workers = min(idle, MAX_DECODE_WORKERS, -(-frames // _CHUNK))
    return workers if workers >= 2 else 1


def decode_frames(
    decode: Callable[[Item], np.ndarray], items: Sequence[Item], workers: int
) -> Iterator[np.ndarray]:
    """`decode(item)` for every item, in order; with `workers` > 1 in that many spawned processes
    (`decode` and the items must pickle: a module-level function and plain data)."""
    if workers <= 1:
        for item in items:
            yield decode(item)
        return
    chunks = [list(items[i : i + _CHUNK]) for i in range(0, len(items), _CHUNK)]
    done = 0
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        # map yields in order and re-raises the first failing chunk's error when it is reached; the chunk
        # raises at its first failing frame, so the error is the one a sequential decode raises.
        for frames in pool.map(_decode_chunk, [decode] * len(chunks), chunks):
            for frame in frames:
                yield frame
                done += 1
    except BrokenProcessPool as exc:
        # A decoding process died (killed, out of memory): decode the rest here rather than fail a series
        # whose frames may be fine.
        log.warning(
            "parallel decode failed (%s): decoding the other %d frames in process", exc, len(items) - done
        )
        for item in items[done:]:
            yield decode(item)
    finally:
        # After an error, chunks not started yet are dropped rather than decoded for nothing.
        pool.shutdown(wait=True, cancel_futures=True)


def decode_into(
    array: np.ndarray, decode: Callable[[Item], np.ndarray], items: Sequence[Item], workers: int
) -> None:
    """`array[k] = decode(items[k])` for every item (see decode_frames). When `array` maps a file shared
    with the inference process (transfer.shared_array), the frames written are dropped from this process
    every few frames; they stay in the file: decoding a 600-slice CT then holds a few MB here, not 629."""
    frame_bytes = array[0].nbytes if len(array) else 0
    released = 0
    for k, frame in enumerate(decode_frames(decode, items, workers)):
        array[k] = frame
        if (k + 1) % _RELEASE_EVERY == 0 or k + 1 == len(items):
            release_pages(array, released * frame_bytes, (k + 1) * frame_bytes)
            released = k + 1


def _decode_chunk(decode: Callable[[Item], np.ndarray], chunk: list[Item]) -> list[np.ndarray]:
    return [decode(item) for item in chunk]
