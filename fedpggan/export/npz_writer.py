"""A MedMNIST-layout ``.npz`` written member by member, chunk by chunk, byte-reproducibly.

``np.savez`` needs every array in memory and stamps the current time into the zip, so two
identical exports would differ. Here each ``.npy`` member is streamed through
``zipfile`` with a fixed timestamp and attributes: memory stays at one chunk and the same
arrays always give the same file bytes.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from types import TracebackType

import numpy as np

FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date a zip can hold


class NpzWriter:
    """``with NpzWriter(path) as npz:`` then ``npz.begin(name, shape, dtype)``, ``npz.write(chunk)``
    until the member is full, and ``npz.end()``; or ``npz.add(name, array)`` for a small array."""

    def __init__(self, path: str | Path) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.member: io.BufferedIOBase | None = None
        self.remaining = 0

    def begin(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        self.remaining = math.prod(shape) * np.dtype(dtype).itemsize
        info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.create_system = 3               # unix, whatever platform writes it
        info.external_attr = 0o644 << 16
        size = header.tell() + self.remaining
        self.member = self.zip.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT)
        self.member.write(header.getvalue())

    def write(self, chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(chunk)
        if data.nbytes > self.remaining:
            raise ValueError(f"npz member overflow: {data.nbytes} bytes written, {self.remaining} left")
        self.member.write(data.data)
        self.remaining -= data.nbytes

    def end(self) -> None:
        if self.remaining:
            raise ValueError(f"npz member incomplete: {self.remaining} bytes missing")
        self.member.close()
        self.member = None

    def add(self, name: str, array: np.ndarray) -> None:
        self.begin(name, array.shape, array.dtype)
        self.write(array)
        self.end()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.member is not None:
            self.member.close()
        self.zip.close()
