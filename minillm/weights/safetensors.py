"""A small reader and writer of the safetensors file format (Hugging Face's checkpoint format).

The format (https://github.com/huggingface/safetensors, "Format" section) is:

    8 bytes    N, the header length: an unsigned 64-bit little-endian integer
    N bytes    the header: UTF-8 JSON, an object
                 {"__metadata__": {str: str, ...},                 (optional)
                  name: {"dtype": "F32", "shape": [d0, d1, ...],
                         "data_offsets": [begin, end]}, ...}
               padded at the end with spaces (0x20) to a multiple of 8 bytes
    the rest   the data buffer: each tensor's elements, row-major, little-endian,
               in bytes [begin, end) counted from the start of the buffer

and a valid file has no gaps: sorted by offset, the tensors tile the buffer
exactly, each one ``prod(shape) * itemsize`` bytes long.

Why a reader here instead of the ``safetensors`` package: reading the format is
the twenty lines of ``_parse_header`` and ``load_file``, and keeping it in the
repository keeps minillm's runtime dependencies to numpy, regex and tqdm (the
package would also need a compiled Rust extension on every platform). The one
dtype NumPy lacks, bfloat16, is the top half of a float32, so it is read as
uint16 and widened by a 16-bit shift (exact).

    tensors = load_file("model.safetensors")            # {name: np.ndarray}
    save_file({"w": np.ones((2, 3), np.float32)}, "out.safetensors", metadata={"format": "pt"})

Not handled: writing bfloat16 (NumPy has no such dtype to write from), and the
exotic dtypes (F8_*, U16/U32/U64, complex) of the full specification.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .. import backend
from ..tensor import Tensor
from ..checks import is_integer

# safetensors dtype name -> little-endian NumPy dtype of the stored bytes
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),        # stored bits; widened to float32 on reading
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# NumPy dtype (native order) -> safetensors name, for writing
_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
MAX_HEADER_BYTES = 100_000_000   # the reference implementation's limit: refuse absurd headers
METADATA_KEY = "__metadata__"


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (the message names the file and the problem)."""


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact: bf16 is float32's upper half).

    >>> bfloat16_to_float32(np.array([0x3F80, 0xC000], dtype=np.uint16)).tolist()
    [1.0, -2.0]
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------ reading


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """``(tensor_entries, metadata, data_start)`` of a safetensors file, fully validated.

    ``tensor_entries`` maps each name to ``{"dtype", "shape", "data_offsets"}``;
    ``data_start`` is the file offset of the data buffer (8 + N).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: only {file_size} bytes, too short for a safetensors file (8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {header_len:,} bytes is over the {MAX_HEADER_BYTES:,} limit")
        if 8 + header_len > file_size:
            raise SafetensorsError(
                f"{path}: header length {header_len:,} runs past the end of the file ({file_size:,} bytes)"
            )
        raw = f.read(header_len)
    entries, metadata = _parse_header(raw, path, buffer_size=file_size - 8 - header_len)
    return entries, metadata, 8 + header_len


def _parse_header(raw: bytes, path, buffer_size: int) -> tuple[dict, dict]:
    """Decode and check the JSON header against a data buffer of ``buffer_size`` bytes."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: {METADATA_KEY} must map strings to strings, got {metadata!r}")

    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                                   f"(supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r} (want [begin, end])")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes "
                f"but data_offsets {offsets} hold {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))

    # the tensors must tile the buffer: no gaps, no overlaps, nothing after the last one
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {problem}")
        position = end
    if position != buffer_size:
        raise SafetensorsError(
            f"{path}: the tensors cover {position:,} bytes but the data buffer has {buffer_size:,} "
            f"({'truncated file' if position > buffer_size else 'trailing bytes'})"
        )
    return header, metadata


def _is_count(value) -> bool:
    return is_integer(value) and value >= 0


def load_file(path: str | os.PathLike, names=None) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` for the tensors of a safetensors file (all, or only ``names``).

    The file is memory-mapped and each requested tensor copied out once into an
    ordinary native-order array (bfloat16 becomes float32), so the result does
    not keep the file open.
    """
    entries, _, data_start = read_header(path)
    if names is not None:
        missing = [n for n in names if n not in entries]
        if missing:
            raise KeyError(f"{path}: no tensor(s) named {', '.join(map(repr, missing))}")
        entries = {n: entries[n] for n in names}
    tensors: dict[str, np.ndarray] = {}
    if not entries:
        return tensors
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            stored = _DTYPES[entry["dtype"]]
            raw = mapped[data_start + begin:data_start + end]
            values = np.frombuffer(raw, dtype=stored).reshape(entry["shape"])
            if entry["dtype"] == "BF16":
                tensors[name] = bfloat16_to_float32(values)                # a new array
            else:
                tensors[name] = values.astype(stored.newbyteorder("="), copy=True)  # own memory, native order
    finally:
        del mapped
    return tensors


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` dict of a file ({} when it has none)."""
    return read_header(path)[1]


# ------------------------------------------------------------------ writing


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: array}`` (NumPy or CuPy arrays, or Tensors) as a safetensors file.

    Layout, as the reference writer does it: tensors sorted by item size (largest
    first, so each lands aligned to its own size) and then by name, the header
    padded with spaces to a multiple of 8 bytes. The file is written beside its
    destination and renamed into place, so a crash never leaves half a file.
    """
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"save_file: metadata must map strings to strings, got {metadata!r}")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise ValueError(f"save_file: tensor names must be strings other than {METADATA_KEY!r}, got {name!r}")
        array = backend.to_numpy(value.data if isinstance(value, Tensor) else value)
        dtype = array.dtype.newbyteorder("=")
        if dtype not in _NAMES:
            raise TypeError(f"save_file: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store "
                            f"here (supported: {', '.join(str(d) for d in _NAMES)})")
        arrays[name] = np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")   # keeps 0-d shapes

    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict = {METADATA_KEY: metadata} if metadata else {}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {"dtype": _NAMES[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)                 # pad to 8 bytes with spaces

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in order:
            f.write(arrays[name].data)                              # the raw little-endian bytes
    os.replace(partial, path)
