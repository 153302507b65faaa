"""A minimal safetensors codec for torch tensors, so weights never go through pickle.

Layout: 8-byte little-endian header length, a JSON header mapping each name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data part), then the raw
little-endian bytes of every tensor, back to back.
"""

import json
import struct
import sys

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000


class TensorFileError(ValueError):
    """A byte string that is not a valid safetensors file (or a tensor it cannot hold)."""


def _check_byteorder() -> None:
    # Raw bytes are copied as they lie in memory; the format is little-endian.
    if sys.byteorder != "little":
        raise TensorFileError("safetensors: big-endian hosts are not supported")


def _raw_bytes(tensor: torch.Tensor) -> bytearray:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    buffer = bytearray(flat.numel() * flat.element_size())
    if buffer:
        # frombuffer shares the bytearray's memory, so the copy writes the raw bytes into it.
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(flat.view(torch.uint8))
    return buffer


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize named tensors to safetensors bytes (names sorted, header padded to 8 bytes)."""
    _check_byteorder()
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in CODES:
            raise TensorFileError(f"safetensors: {name}: unsupported dtype {tensor.dtype}")
        raw = _raw_bytes(tensor)
        header[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _entry(name: str, entry: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise TensorFileError(f"safetensors: {name}: missing or unsupported dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    # Sizes past 2**63 overflow torch's int64 sizes even where another is 0 (an empty tensor takes no bytes).
    if not (isinstance(shape, list) and all(isinstance(s, int) and 0 <= s < 2**63 for s in shape)):
        raise TensorFileError(f"safetensors: {name}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise TensorFileError(f"safetensors: {name}: invalid data_offsets {offsets!r}")
    dtype = DTYPES[entry["dtype"]]
    numel = 1
    for size in shape:
        numel *= size
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise TensorFileError(f"safetensors: {name}: data_offsets do not match shape {shape}")
    return dtype, shape, offsets[0], offsets[1]


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into CPU tensors; any malformation raises TensorFileError."""
    _check_byteorder()
    if len(data) < 8:
        raise TensorFileError("safetensors: file is shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise TensorFileError(f"safetensors: header length {size} exceeds the file")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TensorFileError(f"safetensors: header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise TensorFileError("safetensors: header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, len(body))
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).reshape(shape)
    return tensors
