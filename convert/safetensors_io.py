"""Reading safetensors headers and writing safetensors files one tensor at a time.

Why not ``safetensors.torch.save_file``: it needs every tensor of a file in memory at once, and it
re-serialises bytes that conversion does not change. A safetensors file is an 8-byte header
length, a JSON header (name -> dtype, shape, byte range) and the raw tensor bytes back to back, so
a converted shard can be written by emitting the new header and then streaming each tensor's
bytes: unchanged tensors are copied file-to-file in the kernel (``os.copy_file_range``), so they
stay byte-identical and never pass through Python; only tensors whose dtype changes are read,
one at a time. Peak memory is the largest tensor, not the shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from sparsek.runtime.errors import UserError

# safetensors dtype codes <-> torch dtypes (floating ones may be converted by --dtype).
CODE_TO_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_CODE = {v: k for k, v in CODE_TO_DTYPE.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a source file: where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: tuple[StoredTensor, ...]  # in file order
    metadata: dict[str, str] | None

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header (raises UserError for unreadable or corrupt files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None
    metadata = header.pop("__metadata__", None)
    tensors, end = [], 0
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            code = str(info["dtype"])
            if begin != end or stop < begin:
                raise ValueError(f"tensor {name!r} has non-contiguous data offsets")
            numel = 1
            for d in shape:
                numel *= d
            if code in ITEM_SIZE and numel * ITEM_SIZE[code] != stop - begin:
                raise ValueError(f"tensor {name!r}: byte size does not match its shape and dtype")
            tensors.append(StoredTensor(name, code, shape, 8 + n + begin, stop - begin))
            end = stop
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None
    if 8 + n + end != size:
        raise UserError(f"{path} is truncated or corrupt (data ends at {8 + n + end} bytes, file has {size})")
    return SafetensorsHeader(path, tuple(tensors), metadata)


# --- writing --------------------------------------------------------------------------------------

Progress = Callable[[int], None]
_CAST_CHUNK = 16 << 20  # bytes read and cast at a time by convert_range


@dataclass
class OutTensor:
    """One tensor to write: its header entry and a function that writes exactly ``nbytes`` bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[BinaryIO, Progress], None]
    copied_from: tuple[Path, int] | None = None  # (file, offset) when the bytes are an unchanged copy


def copy_range(src: Path, start: int, nbytes: int) -> Callable[[BinaryIO, Progress], None]:
    """Writer that copies ``nbytes`` from ``src`` at ``start`` unchanged, in the kernel when possible."""

    def write(out: BinaryIO, progress: Progress) -> None:
        out.flush()
        with open(src, "rb") as f:
            done = 0
            use_kernel = hasattr(os, "copy_file_range")
            while done < nbytes:
                step = min(_CHUNK, nbytes - done)
                copied = 0
                if use_kernel:
                    try:
                        copied = os.copy_file_range(f.fileno(), out.fileno(), step, start + done)
                    except OSError:  # other filesystem / old kernel: plain reads below
                        use_kernel = False
                        out.seek(0, os.SEEK_END)
                if not use_kernel:
                    f.seek(start + done)
                    data = f.read(step)
                    out.write(data)
                    copied = len(data)
                if copied <= 0:
                    raise OSError(f"{src} ended early while copying")
                done += copied
                progress(copied)
        out.seek(0, os.SEEK_END)

    return write


def convert_range(src: Path, t: StoredTensor, dtype: torch.dtype) -> Callable[[BinaryIO, Progress], None]:
    """Writer that reads one stored tensor, casts it to ``dtype`` and writes its bytes.

    A cast is elementwise, so it runs over pieces of ``_CAST_CHUNK`` bytes: memory stays at a few
    pieces instead of the whole tensor in both dtypes (the embedding of a 1B model is >100 MB).
    """
    src_dtype = CODE_TO_DTYPE[t.dtype]
    itemsize = torch.empty((), dtype=src_dtype).element_size()

    def write(out: BinaryIO, progress: Progress) -> None:
        total = t.nbytes // itemsize
        per = max(1, _CAST_CHUNK // itemsize)
        buf = bytearray(min(total, per) * itemsize)
        with open(src, "rb") as f:
            f.seek(t.start)
            done = 0
            while done < total:
                count = min(per, total - done)
                nbytes = count * itemsize
                if f.readinto(memoryview(buf)[:nbytes]) != nbytes:
                    raise OSError(f"{src} ended early while reading {t.name}")
                piece = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(src_dtype).to(dtype)
                write_tensor_bytes(out, piece)
                progress(piece.numel() * piece.element_size())
                done += count

    return write


def write_tensor_bytes(out: BinaryIO, tensor: torch.Tensor) -> None:
    if tensor.numel():
        out.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def from_tensor(name: str, tensor: torch.Tensor) -> OutTensor:
    """An in-memory tensor as an OutTensor."""
    code = DTYPE_TO_CODE[tensor.dtype]
    nbytes = tensor.numel() * tensor.element_size()

    def write(out: BinaryIO, progress: Progress) -> None:
        write_tensor_bytes(out, tensor)
        progress(nbytes)

    return OutTensor(name, code, tuple(tensor.shape), nbytes, write)


def zeros_f32(name: str, shape: tuple[int, ...]) -> OutTensor:
    """A float32 tensor of zeros (the SparseK scorer's initial value, SPEC 1.1)."""
    numel = 1
    for d in shape:
        numel *= d
    return from_tensor(name, torch.zeros(numel, dtype=torch.float32).view(shape))


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None, progress: Progress) -> int:
    """Write ``tensors`` in order as one safetensors file; returns the file size."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for run in _coalesce(tensors):
            before = out.tell()
            run.write(out, progress)
            if out.tell() - before != run.nbytes:
                raise OSError(f"wrote {out.tell() - before} bytes for {run.name}, expected {run.nbytes}")
    return 8 + len(raw) + offset


def _coalesce(tensors: list[OutTensor]) -> list[OutTensor]:
    """Merge back-to-back unchanged copies from one file into one kernel copy (fewer syscalls)."""
    merged: list[OutTensor] = []
    for t in tensors:
        prev = merged[-1] if merged else None
        if (
            prev is not None and t.copied_from is not None and prev.copied_from is not None
            and prev.copied_from[0] == t.copied_from[0] and prev.copied_from[1] + prev.nbytes == t.copied_from[1]
        ):
            path, start = prev.copied_from
            nbytes = prev.nbytes + t.nbytes
            merged[-1] = OutTensor(f"{prev.name}..{t.name}", "", (), nbytes, copy_range(path, start, nbytes), (path, start))
        else:
            merged.append(t)
    return merged
