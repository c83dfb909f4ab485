"""Read a CTranslate2 ``model.bin`` (a flat list of named tensors) into torch, without ctranslate2.

Layout (binary version 6, little-endian): u32 version, str spec name, u32 revision,
u32 variable count; per variable: str name, u8 rank, u32 dims[rank], u8 dtype id,
u32 byte count, raw data; then u32 alias count and (alias, target) string pairs.
Strings are u16 length + bytes ending in NUL.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from server.runners.base import RunnerError

# CTranslate2's DataType enum.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Reader:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.off, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.off + n > len(self.buf):
            raise RunnerError(f"{self.path}: truncated CTranslate2 model (wanted {n} bytes at offset {self.off})")
        out = self.buf[self.off : self.off + n]
        self.off += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        return raw.rstrip(b"\0").decode("utf-8")


def read_ct2(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Returns (spec name, {variable name: tensor}); aliases resolve to the same tensor."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    r = _Reader(data, path)
    version = r.u32()
    if version < 5 or version > 6:
        raise RunnerError(f"{path}: not a supported CTranslate2 model (binary version {version})")
    spec = r.string()
    r.u32()  # spec revision
    count = r.u32()
    if count > 100_000:
        raise RunnerError(f"{path}: corrupt CTranslate2 header ({count} variables)")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = r.string()
        shape = tuple(r.u32() for _ in range(r.u8()))
        dtype_id = r.u8()
        nbytes = r.u32()
        raw = r.take(nbytes)
        if dtype_id not in _DTYPES:
            raise RunnerError(f"{path}: variable {name} has unsupported dtype id {dtype_id}")
        arr = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
        if arr.size != int(np.prod(shape)):
            raise RunnerError(f"{path}: variable {name} has {arr.size} values for shape {shape}")
        tensors[name] = torch.from_numpy(arr.reshape(shape).copy())
    if r.off < len(data):
        for _ in range(r.u32()):
            alias, target = r.string(), r.string()
            if target in tensors:
                tensors[alias] = tensors[target]
    return spec, tensors
