"""How much of a build's input has been read, so its progress lines can give an ETA.

Inputs count by their size on disk. Within a text, JSON or Arrow file, the part read is how
far the reader has got into it: the file offset the kernel reports (/proc, Linux only).
Parquet is read by row groups after its footer, so there it is the rows read out of the rows
the footer lists. A Hub dataset's size is not known before it has been streamed through, so
a build reading one says "ETA unknown".
"""

import os

import pyarrow.parquet as pq

from data_prep.corpus import builder_for, is_hub_input


def read_offset(path: str) -> int | None:
    """How far this process has read into `path`: the largest offset of its open files on
    `path`; None if it has none open or /proc is missing."""
    target = os.path.realpath(path)
    offsets = []
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    offsets.append(int(info.readline().split()[1]))  # "pos:\t<offset>"
        except (OSError, ValueError, IndexError):
            continue  # closed meanwhile
    return max(offsets, default=None)


class ReadProgress:
    """Updated by corpus.iter_documents as it reads; `fraction()` is the part of all inputs read."""

    def __init__(self, inputs: list[str]):
        self.inputs = inputs
        hub = any(is_hub_input(p) for p in inputs)
        self.sizes = None if hub else [os.path.getsize(p) for p in inputs]
        self.current = 0  # index of the input being read
        self.rows = 0  # records read from it so far
        self.parquet_rows = None  # rows in it, if it is Parquet
        self.within = 0.0  # part of it read; only grows (a reader never goes back)

    def start(self, index: int) -> None:
        self.current, self.rows, self.within = index, 0, 0.0
        path = self.inputs[index]
        self.parquet_rows = None
        if not is_hub_input(path) and builder_for(path) == "parquet":
            self.parquet_rows = pq.ParquetFile(path).metadata.num_rows

    def fraction(self) -> float | None:
        if self.sizes is None or sum(self.sizes) == 0:
            return None
        size = self.sizes[self.current]
        if self.parquet_rows is not None:
            self.within = self.rows / self.parquet_rows if self.parquet_rows else 1.0
        elif os.path.isdir("/proc/self/fdinfo"):
            offset = read_offset(self.inputs[self.current])
            if offset is not None and size:
                self.within = max(self.within, min(offset / size, 1.0))
        else:
            return None
        return (sum(self.sizes[: self.current]) + self.within * size) / sum(self.sizes)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def eta_text(fraction: float | None, first_fraction: float | None, elapsed: float) -> str:
    """'37% read, ETA 0:12:05' from the part read now and when timing started; 'ETA unknown' without one."""
    if fraction is None or first_fraction is None or fraction <= first_fraction:
        return "ETA unknown"
    remaining = elapsed * (1 - fraction) / (fraction - first_fraction)
    return f"{fraction:.0%} read, ETA {format_seconds(remaining)}"
