"""Safe persistence of :class:`~kvagents.index.KVIndex`: one file, no pickle, checksummed, written atomically.

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
the caller expects. Each failure raises a named subclass of :class:`~kvagents.index.KVIndexError` and leaves the
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

from .index import KVIndex, KVIndexError, _FaissBackend

MAGIC = b"KVAGIDX\x00"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sI32sQQ")  # magic, version, sha256, header_len, payload_len


class IndexFormatError(KVIndexError):
    """The file is not a kvagents index, is truncated, or its header cannot be read."""


class IndexVersionError(IndexFormatError):
    """The file was written by a newer kvagents (format version above what this one reads)."""


class IndexChecksumError(KVIndexError):
    """The file's bytes do not match its SHA-256 (corruption)."""


class IndexMismatchError(KVIndexError):
    """The index was built by another encoder or for another dimension than the one in use."""


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _records_bytes(index: KVIndex) -> tuple[bytes, np.ndarray]:
    labels = sorted(index._ids)
    records = {
        "ids": [index._ids[label] for label in labels],
        "labels": labels,
        "texts": [index._texts[label] for label in labels],
        "metadatas": [index._metadata[label] for label in labels],
        "tombstones": sorted(index._tombstones),
        "next_label": index._next_label,
    }
    try:
        data = json.dumps(records, default=_json_default, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        for id_, md in zip(records["ids"], records["metadatas"]):
            try:
                json.dumps(md, default=_json_default)
            except (TypeError, ValueError) as inner:
                raise KVIndexError(f"metadata of id {id_!r} cannot be saved as JSON: {inner}") from e
        raise KVIndexError(f"index records cannot be saved as JSON: {e}") from e
    vectors = index._store[labels] if labels else np.zeros((0, index.dim), dtype=np.float32)
    return data, np.ascontiguousarray(vectors, dtype="<f4")


def save_index(index: KVIndex, path: Path) -> Path:
    """Serialise ``index`` to ``path`` atomically (see module docstring). Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise KVIndexError(f"{path} is a folder; give a file path such as {path / 'index.kvx'}")
    records, vectors = _records_bytes(index)
    faiss_bytes = b""
    if isinstance(index._backend, _FaissBackend):
        faiss_bytes = index._backend.to_bytes().tobytes()
    vec_bytes = vectors.tobytes()
    header = {
        "format_version": FORMAT_VERSION,
        "dim": index.dim,
        "metric": index.metric,
        "factory": index.factory,
        "encoder_identity": index.encoder_identity,
        "ntotal": index.ntotal,
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


def load_index(path: Path, *, encoder_identity: dict[str, Any] | None = None, dim: int | None = None,
               device: str | list[str] = "cpu", backend: str = "auto") -> KVIndex:
    """Load and verify a saved index (see :meth:`KVIndex.load`)."""
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
    index = KVIndex(stored_dim, header["metric"], factory=header.get("factory"), device=device, backend=backend,
                    encoder_identity=stored_identity)
    labels = np.asarray(records["labels"], dtype=np.int64)
    faiss_bytes = section("faiss")
    if isinstance(index._backend, _FaissBackend) and faiss_bytes:
        index._backend = _FaissBackend.from_bytes(
            np.frombuffer(faiss_bytes, dtype=np.uint8), stored_dim, header["metric"], header.get("factory"),
            use_gpu=index.backend_name == "faiss-gpu",
        )
    elif len(labels):
        if not index._backend.is_trained:
            index._backend.train(vectors)
        index._backend.add(labels, vectors)
    index._next_label = int(records["next_label"])
    index._store = np.zeros((max(index._next_label, 1), stored_dim), dtype=np.float32)
    if len(labels):
        index._store[labels] = vectors
    for label, id_, text, md in zip(records["labels"], records["ids"], records["texts"], records["metadatas"]):
        index._labels[id_] = label
        index._ids[label] = id_
        index._texts[label] = text
        index._metadata[label] = md
    index._tombstones = set(records.get("tombstones", []))
    if index._tombstones and isinstance(index._backend, _FaissBackend):
        index._backend.can_remove = False
    return index


def _canonical(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, default=_json_default)
