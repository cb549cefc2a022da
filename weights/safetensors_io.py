"""A small safetensors reader/writer on NumPy, with an optional CRC-32 over header and data.

File layout (compatible with the `safetensors` library):

    u64 little-endian  n                  header length in bytes
    n bytes            JSON header        {"__metadata__": {str: str}, name: {"dtype", "shape",
                                            "data_offsets": [begin, end]}, ...}, space-padded
                                            so that 8 + n is a multiple of 8
    rest               data               raw little-endian tensor bytes, offsets relative to here

Files written here carry two CRC-32s in `__metadata__`: `"checksum": "crc32:xxxxxxxx"` of the
tensor entries (name, dtype, shape, offsets) followed by the whole data section, and
`"checksum_meta"` of the other metadata (a model's config lives there). Reading verifies each
one present, so flipped bytes raise instead of silently changing weights or config; files
written before `checksum_meta` existed, or without any checksum (e.g. from
`safetensors.torch.save_file`), load with what they have.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
import zlib

import numpy as np

from metastate_core.config import is_natural

from .files import WeightsError, check_memory, open_regular

# safetensors dtype code <-> NumPy dtype name (stored little-endian); ml_dtypes is imported
# only where a bfloat16 tensor is met (it costs most of a second)
DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}
CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# What a reader accepts unless told otherwise: a model's tensors are floats. U32 (MLX's packed
# quantized matrices) is read only where the caller asks for it (weights/quantized.py).
FLOAT_CODES = tuple(CODES.values())
CHECKSUM_KEY = "checksum"
META_CHECKSUM_KEY = "checksum_meta"  # a key of its own: readers that predate it ignore it
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit
_READ_CHUNK = 1 << 30


def write_file(path: str | os.PathLike, tensors: dict[str, np.ndarray],
               metadata: dict[str, str] | None = None, checksum: bool = True) -> int:
    """Write `tensors` (in dict order) to `path`, flush and fsync. Returns the file size.

    Every array must already be float32, bfloat16 or float16. The file is written front to
    back, never sought in: `path` may be a pipe or a device.
    """
    entries, offset = {}, 0
    for name, t in tensors.items():
        code = CODES.get(t.dtype.name)
        if code is None:
            raise WeightsError(f"tensor {name!r} has dtype {t.dtype}, which the weight format cannot store "
                               "(supported: float32, bfloat16, float16)")
        entries[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WeightsError("safetensors metadata must map strings to strings")
    if checksum:
        meta.pop(CHECKSUM_KEY, None)
        meta[META_CHECKSUM_KEY] = f"crc32:{zlib.crc32(_meta_signature(meta)):08x}"
        crc = zlib.crc32(_entries_signature(entries))
        for t in tensors.values():
            crc = zlib.crc32(_raw_bytes(t), crc)
        meta[CHECKSUM_KEY] = f"crc32:{crc:08x}"
    head = _header_bytes(meta, entries)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            f.write(_raw_bytes(t))
        f.flush()
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            os.fsync(f.fileno())
    return len(head) + offset


def read_header(path: str | os.PathLike, dtypes: tuple[str, ...] = FLOAT_CODES
                ) -> tuple[dict[str, dict], dict[str, str]]:
    """The validated tensor entries (file order) and `__metadata__` of a file, without its data.
    dtypes: the safetensors codes accepted (a tensor of another is refused)."""
    with open_regular(path, "weight file") as f:
        entries, meta, _ = _read_header(f, os.fstat(f.fileno()).st_size, path, dtypes)
    return entries, meta


def read_file(path: str | os.PathLike, check=None, dtypes: tuple[str, ...] = FLOAT_CODES
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a file (native byte order, in memory, no handle left open) and its metadata.

    check(entries, meta), if given, runs once the header is read and before any data is: it
    raises on names or shapes the caller does not expect, so that a forged header costs no
    memory. Tensors are then read one at a time. dtypes: the safetensors codes accepted
    (floats; "U32" too for MLX-quantized weights). Raises WeightsError on a truncated or
    corrupted file, a dtype outside `dtypes` or a checksum mismatch.
    """
    with open_regular(path, "weight file") as f:
        entries, meta, data_len = _read_header(f, os.fstat(f.fileno()).st_size, path, dtypes)
        if META_CHECKSUM_KEY in meta and meta[META_CHECKSUM_KEY] != f"crc32:{zlib.crc32(_meta_signature(meta)):08x}":
            raise WeightsError(f"{path}: checksum mismatch in the header metadata (its config): the file is corrupted")
        if check is not None:
            check(entries, meta)
        check_memory(data_len, f"reading {path}")
        crc = zlib.crc32(_entries_signature(entries))
        tensors = {}
        for name, e in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):  # file order
            buf = np.empty(e["data_offsets"][1] - e["data_offsets"][0], np.uint8)
            _read_into(f, buf, path, e["data_offsets"][0], data_len)
            crc = zlib.crc32(buf, crc)
            dtype = np_dtype(e["dtype"])
            t = buf.view(dtype).reshape(e["shape"])
            tensors[name] = t if dtype.isnative else t.astype(dtype.newbyteorder("="))
    if CHECKSUM_KEY in meta:
        _verify_checksum(path, meta[CHECKSUM_KEY], crc)
    return {name: tensors[name] for name in entries}, meta


def np_dtype(code: str) -> np.dtype:
    """The NumPy dtype of a safetensors code (little-endian)."""
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"F32": "<f4", "F16": "<f2", "U32": "<u4"}[code])


# -- internals -------------------------------------------------------------------------------

def _read_into(f, buf: np.ndarray, path, begin: int, data_len: int) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):  # loop: one read() call may return less than asked (>2 GiB)
        n = f.readinto(view[got:got + _READ_CHUNK])
        if not n:
            raise WeightsError(f"{path}: file is truncated (data ends at byte {begin + got} of {data_len})")
        got += n


def _header_bytes(meta: dict, entries: dict) -> bytes:
    header = ({"__metadata__": meta} if meta else {}) | entries
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8 + len is then a multiple of 8, as the reference library pads
    return struct.pack("<Q", len(raw)) + raw


def _entries_signature(entries: dict) -> bytes:
    rows = [[name, e["dtype"], e["shape"], e["data_offsets"]] for name, e in entries.items()]
    return json.dumps(rows, separators=(",", ":")).encode()


def _meta_signature(meta: dict) -> bytes:
    return json.dumps(sorted([k, v] for k, v in meta.items() if k not in (CHECKSUM_KEY, META_CHECKSUM_KEY)),
                      separators=(",", ":")).encode()


def _raw_bytes(t: np.ndarray) -> memoryview:
    t = np.ascontiguousarray(t)
    if t.dtype.byteorder == ">" or (t.dtype.byteorder == "=" and sys.byteorder == "big"):
        t = t.byteswap()  # the file is little-endian
    return memoryview(t.reshape(-1).view(np.uint8))


def _verify_checksum(path, value: str, crc: int) -> None:
    algo, _, digest = value.partition(":")
    if algo != "crc32" or len(digest) != 8:
        raise WeightsError(f"{path}: unknown checksum {value!r} in header metadata")
    if f"{crc:08x}" != digest:
        raise WeightsError(f"{path}: checksum mismatch (stored {digest}, computed {crc:08x}): "
                           "the file is corrupted")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise WeightsError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_header(f, size: int, path, dtypes: tuple[str, ...] = FLOAT_CODES) -> tuple[dict, dict, int]:
    """Parse and check the header: returns (entries in file order, metadata, data length)."""
    if size < 8:
        raise WeightsError(f"{path}: file is truncated ({size} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes): "
                           "file truncated or corrupted")
    if n > MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
    raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except WeightsError as e:
        raise WeightsError(f"{path}: header is not valid: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise WeightsError(f"{path}: header is not valid JSON ({e}): file corrupted") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WeightsError(f"{path}: header __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not (isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()):
            raise WeightsError(f"{path}: header entry {name!r} needs dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes or dtype not in DTYPE_SIZES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                               f"(supported: {', '.join(dtypes)})")
        if not (isinstance(shape, list) and all(is_natural(s) for s in shape)):
            raise WeightsError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_natural(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise WeightsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise WeightsError(f"{path}: tensor {name!r} data_offsets {offsets} span {offsets[1] - offsets[0]} "
                               f"bytes, but {dtype} {shape} needs {nbytes}")
        if offsets[1] > data_len:
            raise WeightsError(f"{path}: tensor {name!r} data_offsets {offsets} run past the end of the "
                               f"data section ({data_len} bytes): file truncated or corrupted")
        spans.append((offsets[0], offsets[1], name))
    # The tensors must tile the data section exactly: no overlap, no gap, nothing left over.
    end, prev = 0, None
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise WeightsError(f"{path}: tensors {prev!r} and {name!r} overlap in the data section")
        if begin > end:
            raise WeightsError(f"{path}: data section has a gap of {begin - end} bytes before tensor {name!r}")
        end, prev = stop, name
    if end != data_len:
        raise WeightsError(f"{path}: tensors cover {end} bytes but the data section holds {data_len}: "
                           "data_offsets do not cover the buffer (trailing bytes or corrupted header)")
    return header, meta, data_len
