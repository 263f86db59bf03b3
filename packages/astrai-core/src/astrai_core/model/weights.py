"""Reading and writing weight files (safetensors only: single file or shards with an index).

Every failure names the file and what to do about it; pickle files are never loaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Stored by some exports but not parameters: the model recomputes them.
NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq",)
# Stored state that is not a parameter either: the MoE routers' balancing biases.
BUFFER_SUFFIXES = ("e_score_correction_bias",)

# The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON header
# (name -> {dtype, shape, data_offsets}, plus optional "__metadata__"), then the tensor data;
# data_offsets are [begin, end) relative to the start of the data.
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
               "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def find_weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are missing: {', '.join(missing)}; "
                "download or copy the complete model folder"
            )
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} holds only pickle weights (.bin/.pt), which AstrAI never loads; "
            "convert them to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    read_safetensors_header(path)  # the same message for a damaged file as `astrai model info`
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: cannot read weights ({exc}); the file is truncated or corrupt, "
            "copy or download it again"
        ) from None


def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(f"{path}: not a valid safetensors file ({detail}); it is truncated or "
                      "corrupt, copy or download it again")


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """-> (the JSON header, bytes of tensor data after it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise _corrupt(path, "the file is empty" if size == 0 else
                           f"{size} bytes, fewer than the {HEADER_LENGTH_BYTES}-byte header "
                           "length it starts with")
        length = int.from_bytes(prefix, "little")
        if length > size - HEADER_LENGTH_BYTES:
            raise _corrupt(path, f"the header length says {length} bytes, but the file has "
                                 f"{size - HEADER_LENGTH_BYTES} after it")
        if length > MAX_HEADER_BYTES:
            raise _corrupt(path, f"the header length says {length} bytes, more than any "
                                 f"safetensors header may have ({MAX_HEADER_BYTES})")
        return f.read(length), size - HEADER_LENGTH_BYTES - length


def _tensor_shape(path: Path, name: str, entry: object) -> tuple[tuple[int, ...], int]:
    """-> (shape, end of its data) of one header entry, checked for consistency."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"header entry '{name}' is not an object")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor '{name}' has no valid shape ({shape!r})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor '{name}' has no valid data_offsets ({offsets!r})")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor '{name}' has no dtype")
    numel = math.prod(shape)
    if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise _corrupt(path, f"tensor '{name}' ({dtype}, shape {tuple(shape)}) needs "
                             f"{numel * DTYPE_BYTES[dtype]} bytes, its offsets span "
                             f"{offsets[1] - offsets[0]}")
    return tuple(shape), offsets[1]


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read), after
    checking that the header parses and that every tensor's data lies inside the file."""
    raw, data_bytes = _read_header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    shapes, data_end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shapes[name], end = _tensor_shape(path, name, entry)
        data_end = max(data_end, end)
    if data_end > data_bytes:
        raise _corrupt(path, f"the tensors need {data_end} bytes of data, the file holds "
                             f"{data_bytes}")
    return shapes


def count_stored_parameters(folder: Path, tie_weight: bool) -> int:
    """Parameters in a model folder's weights (every shard), counted from the headers as the
    model counts them: a tied lm_head once, recomputed buffers not at all."""
    total = 0
    for path in find_weight_files(folder):
        for name, shape in read_safetensors_header(path).items():
            if name.endswith(NON_PARAMETER_SUFFIXES + BUFFER_SUFFIXES) or (
                    tie_weight and name == "lm_head.weight"):
                continue
            total += math.prod(shape)
    return total


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder):
        state.update(load_safetensors(path))
    return state


def save_weights(
    state_dict: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None = None
) -> None:
    """Write `model.safetensors`, or shards plus an index when larger than `max_shard_bytes`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def folder_size(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
