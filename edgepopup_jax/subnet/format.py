"""The .subnet byte format: a checksummed JSON header of typed layer entries, then raw arrays.

File layout (all integers little-endian):

    offset  size  content
    0       8     magic b"\\x89EPSUBN\\n"
    8       4     uint32 format version (FORMAT_VERSION)
    12      8     uint64 H, the header length
    20      32    sha256 of the header bytes
    52      H     header: UTF-8 JSON (model_name, model_options, keep_fraction, mask, layers,
                  extra, arrays, payload_bytes, payload_sha256)
    52+H    P     payload: the arrays' raw bytes back to back (each: dtype, shape, offset in
                  the header's "arrays" table)

A masked layer stores its mask as 1 bit per weight and its kept weights in one of three
encodings (`pack_layer`); a dense layer its whole kernel; extra arrays (BN state) whole. This
module knows bytes and arrays only; `io.py` converts between files and models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import numpy as np

MAGIC = b"\x89EPSUBN\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ32s")  # magic, version, header length, header sha256

# Encodings of a masked layer's kept weights.
ENC_SIGN_SCALE = "sign_scale"  # every kept |w| is one value: sign bits + one float32 magnitude
ENC_CONSTANT = "constant"  # every kept w is one value (e.g. unsigned_constant): just that value
ENC_VALUES = "values"  # kept values as float32, in mask (row-major) order


# --------------------------------------------------------------------------------------------
# one masked layer: pure pack / unpack


def pack_layer(weights, mask) -> dict[str, Any]:
    """Packs W restricted to a 0/1 mask: {'shape', 'kept', 'mask_bits', 'encoding', ...}.

    Exact: unpack_layer(pack_layer(W, m)) == W * m (up to the sign of the zeros).
    """
    w = np.asarray(weights)
    if w.dtype != np.float32:
        raise ValueError(f"weights must be float32, got {w.dtype}")
    m = np.asarray(mask).astype(bool)
    if m.shape != w.shape:
        raise ValueError(f"mask shape {m.shape} != weight shape {w.shape}")
    flat_m = m.reshape(-1)
    kept = w.reshape(-1)[flat_m]
    out = {"shape": tuple(w.shape), "kept": int(kept.size), "mask_bits": np.packbits(flat_m)}
    bits = kept.view(np.uint32)
    if kept.size and np.all(bits == bits[0]):
        out.update(encoding=ENC_CONSTANT, value=np.float32(kept[0]))
    elif kept.size and np.all((bits & 0x7FFFFFFF) == (bits[0] & 0x7FFFFFFF)) and np.isfinite(kept[0]):
        out.update(encoding=ENC_SIGN_SCALE, value=np.abs(kept[0]).astype(np.float32),
                   sign_bits=np.packbits(np.signbit(kept)))
    else:
        out.update(encoding=ENC_VALUES, values=kept.astype(np.float32))
    return out


def unpack_layer(packed: dict[str, Any]) -> np.ndarray:
    """The float32 kernel W * mask from pack_layer's output."""
    shape = tuple(packed["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    flat_m = np.unpackbits(np.asarray(packed["mask_bits"], np.uint8), count=n).astype(bool)
    k = int(flat_m.sum())
    if k != packed["kept"]:
        raise ValueError(f"corrupt subnet: the mask keeps {k} weights, the header says {packed['kept']}")
    enc = packed["encoding"]
    if enc == ENC_CONSTANT:
        kept = np.full((k,), packed["value"], np.float32)
    elif enc == ENC_SIGN_SCALE:
        neg = np.unpackbits(np.asarray(packed["sign_bits"], np.uint8), count=k).astype(bool)
        v = np.float32(packed["value"])
        kept = np.where(neg, -v, v).astype(np.float32)
    elif enc == ENC_VALUES:
        kept = np.asarray(packed["values"], np.float32)
        if kept.size != k:
            raise ValueError(f"corrupt subnet: {kept.size} kept values for a mask keeping {k}")
    else:
        raise ValueError(f"corrupt subnet: unknown encoding {enc!r}")
    out = np.zeros((n,), np.float32)
    out[flat_m] = kept
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# header entries: array fields are indices into the file's array table


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def total(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class MaskedLayer(_Layer):
    kept: int
    encoding: str
    mask_bits: int
    values: int | None = None  # ENC_VALUES
    value: str | None = None  # float.hex() of the constant or magnitude (other encodings)
    sign_bits: int | None = None  # ENC_SIGN_SCALE
    kind = "masked"


@dataclasses.dataclass(frozen=True)
class DenseLayer(_Layer):
    kernel: int
    kind = "dense"


@dataclasses.dataclass(frozen=True)
class ExtraArray:
    path: tuple[str, ...]  # the full variable path, e.g. ("batch_stats", "bn0", "mean")
    array: int


@dataclasses.dataclass(frozen=True)
class SubnetFile:
    """A parsed subnet file: header fields, typed entries and the decoded arrays."""

    model_name: str
    model_options: dict
    keep_fraction: float
    mask: str
    layers: list  # MaskedLayer | DenseLayer
    extra: list  # ExtraArray
    arrays: list  # numpy arrays, in header order

    def kernel(self, entry: MaskedLayer | DenseLayer) -> np.ndarray:
        """The float32 kernel of a layer entry: W * mask, or the dense kernel."""
        if isinstance(entry, DenseLayer):
            return self.arrays[entry.kernel]
        packed = {"shape": entry.shape, "kept": entry.kept, "encoding": entry.encoding,
                  "mask_bits": self.arrays[entry.mask_bits]}
        if entry.encoding == ENC_VALUES:
            packed["values"] = self.arrays[entry.values]
        else:
            packed["value"] = np.float32(float.fromhex(entry.value))
            if entry.encoding == ENC_SIGN_SCALE:
                packed["sign_bits"] = self.arrays[entry.sign_bits]
        return unpack_layer(packed)

    def layer_mask(self, entry: MaskedLayer) -> np.ndarray:
        """The layer's 0/1 mask as a bool array."""
        bits = np.unpackbits(self.arrays[entry.mask_bits], count=entry.total)
        return bits.astype(bool).reshape(entry.shape)


def _entry_json(entry) -> dict:
    d = {k: v for k, v in dataclasses.asdict(entry).items() if v is not None}
    d["path"] = list(d["path"])
    if "shape" in d:
        d["shape"] = list(d["shape"])
    if not isinstance(entry, ExtraArray):
        d["kind"] = entry.kind
    return d


def _entry(d: dict):
    d = {**d, "path": tuple(d["path"])}
    kind = d.pop("kind", None)
    if "shape" in d:
        d["shape"] = tuple(d["shape"])
    return {"masked": MaskedLayer, "dense": DenseLayer, None: ExtraArray}[kind](**d)


# --------------------------------------------------------------------------------------------
# bytes


class ArrayTable:
    """Collects the arrays of a file: `add` returns the index an entry refers to."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def add(self, a) -> int:
        self.arrays.append(np.ascontiguousarray(np.asarray(a)))
        return len(self.arrays) - 1


def encode(*, model_name: str, model_options: dict, keep_fraction: float, mask: str, layers: list,
           extra: list, table: ArrayTable) -> tuple[bytes, int]:
    """The file's bytes, and the header's length."""
    specs, chunks, offset = [], [], 0
    for a in table.arrays:
        b = a.tobytes()
        specs.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": len(b)})
        chunks.append(b)
        offset += len(b)
    payload = b"".join(chunks)
    header = {
        "model_name": model_name,
        "model_options": model_options,
        "keep_fraction": keep_fraction,
        "mask": mask,
        "layers": [_entry_json(e) for e in layers],
        "extra": [_entry_json(e) for e in extra],
        "arrays": specs,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes), hashlib.sha256(hbytes).digest())
    return prefix + hbytes + payload, len(hbytes)


def parse(data: bytes, source: str = "<bytes>") -> SubnetFile:
    """Parses and verifies a subnet file's bytes (magic, version, lengths, both checksums)."""
    if len(data) < _PREFIX.size:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise ValueError(f"{source}: not a subnet file (bad magic)")
        raise ValueError(f"{source}: truncated subnet file ({len(data)} bytes, the fixed prefix alone is "
                         f"{_PREFIX.size})")
    magic, version, hlen, hsha = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{source}: not a subnet file (bad magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"{source}: subnet file has format version {version}, this reader supports "
                         f"{FORMAT_VERSION}")
    start = _PREFIX.size
    if len(data) < start + hlen:
        raise ValueError(f"{source}: truncated subnet file (header needs {hlen} bytes, "
                         f"{len(data) - start} present)")
    hbytes = data[start:start + hlen]
    if hashlib.sha256(hbytes).digest() != hsha:
        raise ValueError(f"{source}: corrupt subnet file (header checksum mismatch)")
    try:
        header = json.loads(hbytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: corrupt subnet file (header is not JSON: {e})") from None
    payload = data[start + hlen:]
    want = int(header["payload_bytes"])
    if len(payload) < want:
        raise ValueError(f"{source}: truncated subnet file (payload has {len(payload)} of {want} bytes)")
    if len(payload) > want:
        raise ValueError(f"{source}: corrupt subnet file ({len(payload) - want} unexpected trailing bytes)")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"{source}: corrupt subnet file (payload checksum mismatch)")
    arrays = []
    for a in header["arrays"]:
        buf = payload[a["offset"]:a["offset"] + a["nbytes"]]
        arrays.append(np.frombuffer(buf, dtype=np.dtype(a["dtype"])).reshape(a["shape"]).copy())
    return SubnetFile(header["model_name"], header["model_options"], header["keep_fraction"],
                      header["mask"], [_entry(e) for e in header["layers"]],
                      [_entry(e) for e in header["extra"]], arrays)
