"""Safe persistence of :class:`~kvagents.retrieval.index.KVIndex`: one file, no pickle, checksummed, written atomically.

File layout (little endian)::

    b"KVAGIDX\\0"          8 bytes  magic
    format version        uint32
    sha256                32 bytes over everything after this field
    header length         uint64
    payload length        uint64
    header                JSON: dim, metric, factory, encoder identity, counts, section offsets
    payload               records JSON | faiss.serialize_index bytes | float32 vectors [n, dim]

Saving writes a temporary file next to the target, fsyncs it, renames it over the target and fsyncs the folder,
so a crash at any point leaves either the previous file or the new one — never a mix. Loading checks, in order:
magic, version (a newer format is refused), size (truncation), checksum, then the encoder identity and dimension
the caller expects. Each failure raises a named subclass of :class:`~kvagents.retrieval.index.KVIndexError` and leaves the
file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IndexChecksumError, IndexFormatError, IndexMismatchError, IndexVersionError, KVIndexError

MAGIC = b"KVAGIDX\x00"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sI32sQQ")  # magic, version, sha256, header_len, payload_len


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _records_bytes(records: dict[str, Any]) -> bytes:
    try:
        return json.dumps(records, default=_json_default, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        for id_, md in zip(records["ids"], records["metadatas"]):
            try:
                json.dumps(md, default=_json_default)
            except (TypeError, ValueError) as inner:
                raise KVIndexError(f"metadata of id {id_!r} cannot be saved as JSON: {inner}") from e
        raise KVIndexError(f"index records cannot be saved as JSON: {e}") from e


def write_index_file(path: Path, meta: dict[str, Any], records: dict[str, Any], faiss_bytes: bytes,
                     vectors: np.ndarray) -> Path:
    """Write one index file atomically (see the module docstring). Returns the path.

    ``meta``: ``dim``, ``metric``, ``factory``, ``encoder_identity``, ``ntotal``; ``records``: the JSON-able
    entries (``ids``, ``labels``, ``texts``, ``metadatas``, ``tombstones``, ``next_label``); ``faiss_bytes``: the
    serialised faiss index (empty for the torch backends); ``vectors``: ``[n, dim]`` in ``records["labels"]`` order.
    """
    path = Path(path)
    if path.is_dir():
        raise KVIndexError(f"{path} is a folder; give a file path such as {path / 'index.kvx'}")
    records = _records_bytes(records)
    vec_bytes = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    header = {
        "format_version": FORMAT_VERSION,
        **meta,
        "sections": {
            "records": [0, len(records)],
            "faiss": [len(records), len(faiss_bytes)],
            "vectors": [len(records) + len(faiss_bytes), len(vec_bytes)],
        },
    }
    header_bytes = json.dumps(header, default=_json_default).encode("utf-8")
    payload_len = len(records) + len(faiss_bytes) + len(vec_bytes)
    lengths = struct.pack("<QQ", len(header_bytes), payload_len)
    digest = hashlib.sha256()
    for part in (lengths, header_bytes, records, faiss_bytes, vec_bytes):
        digest.update(part)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, digest.digest(), len(header_bytes), payload_len)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for part in (fixed, header_bytes, records, faiss_bytes, vec_bytes):
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    return path


def read_header(path: Path) -> dict[str, Any]:
    """Verified header of a saved index (checks magic, version, size and checksum)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    if not path.exists():
        raise FileNotFoundError(f"no index file at {path}")
    if path.is_dir():
        raise IndexFormatError(f"{path} is a folder, not an index file")
    data = path.read_bytes()
    if len(data) < _FIXED.size:
        raise IndexFormatError(f"{path} is truncated ({len(data)} bytes; the fixed header alone is {_FIXED.size})")
    magic, version, sha, header_len, payload_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise IndexFormatError(f"{path} is not a kvagents index (bad magic {magic!r})")
    if version > FORMAT_VERSION:
        raise IndexVersionError(
            f"{path} has index format version {version}, newer than this kvagents reads ({FORMAT_VERSION}); "
            "upgrade kvagents to load it"
        )
    if version < 1:
        raise IndexFormatError(f"{path} has an invalid format version {version}")
    expected = _FIXED.size + header_len + payload_len
    if len(data) != expected:
        raise IndexFormatError(
            f"{path} is truncated or has trailing bytes: {len(data)} bytes, the header announces {expected}"
        )
    body = memoryview(data)[_FIXED.size - 16:]  # lengths + header + payload
    if hashlib.sha256(body).digest() != sha:
        raise IndexChecksumError(f"{path} fails its SHA-256 check: the file is corrupt; restore it or rebuild the index")
    header_bytes = data[_FIXED.size: _FIXED.size + header_len]
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # pragma: no cover - checksum catches this first
        raise IndexFormatError(f"{path} has an unreadable header: {e}") from e
    return header, data[_FIXED.size + header_len:]


def read_index_file(path: Path, *, encoder_identity: dict[str, Any] | None = None, dim: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], bytes, np.ndarray]:
    """Read and verify one index file: ``(header, records, faiss_bytes, vectors)``.

    Refuses a missing, truncated, corrupt or newer file, and an index built by another encoder (``encoder_identity``)
    or for another dimension (``dim``) than the caller's."""
    path = Path(path)
    header, payload = _read(path)
    stored_dim = int(header["dim"])
    if dim is not None and int(dim) != stored_dim:
        raise IndexMismatchError(
            f"{path} holds {stored_dim}-d vectors but the encoder in use gives {dim}-d; "
            "rebuild the index with this encoder or load it with the encoder that built it"
        )
    stored_identity = header.get("encoder_identity")
    if encoder_identity is not None:
        if stored_identity is None:
            raise IndexMismatchError(f"{path} records no encoder identity; cannot check it against {encoder_identity}")
        if _canonical(stored_identity) != _canonical(encoder_identity):
            raise IndexMismatchError(
                f"{path} was built by encoder {stored_identity}, not by the encoder in use {encoder_identity}; "
                "rebuild the index or load it with the same encoder"
            )
        if "dim" in encoder_identity and int(encoder_identity["dim"]) != stored_dim:  # pragma: no cover
            raise IndexMismatchError(f"{path} holds {stored_dim}-d vectors, the encoder gives {encoder_identity['dim']}")

    def section(name: str) -> bytes:
        start, length = header["sections"][name]
        return payload[start: start + length]

    records = json.loads(section("records").decode("utf-8"))
    vectors = np.frombuffer(section("vectors"), dtype="<f4").reshape(-1, stored_dim).astype(np.float32)
    return header, records, section("faiss"), vectors


def _canonical(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, default=_json_default)
