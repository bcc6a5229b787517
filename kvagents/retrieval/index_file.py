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
magic, version (a newer format is refused), size (truncation), checksum, then every section against the header
(offsets within the payload and not overlapping, each section's SHA-256, counts, ids / labels / texts /
metadatas, the vectors' size; the faiss index's own header, ``ntotal``, ``d``, type, metric, ids and flat codes
against the records and vectors; an IVF's list ids and IVF-Flat vectors too), then the encoder identity and
dimension the caller expects. Nothing is sized by a stored count before it is checked: the header's factory string
is never built at full size, and faiss reads the faiss section with its read limits lowered to the section's size.
What the checks cannot see is the *trained* state of an approximate index (IVF centroids, PQ / SQ codebooks and
codes, the HNSW graph): for those bytes the SHA-256s are the only protection. A successful save also removes temp
files that savers killed mid-write left next to the target (never a live process's, unless untouched for a day).
Each failure raises a named subclass of :class:`~kvagents.retrieval.index.KVIndexError` and leaves the file
untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
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
        "sections": {  # [offset in the payload, length, SHA-256 of the section]
            "records": [0, len(records), hashlib.sha256(records).hexdigest()],
            "faiss": [len(records), len(faiss_bytes), hashlib.sha256(faiss_bytes).hexdigest()],
            "vectors": [len(records) + len(faiss_bytes), len(vec_bytes), hashlib.sha256(vec_bytes).hexdigest()],
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
    remove_stale_temp_files(path)
    return path


STALE_AFTER_S = 24 * 3600  # a temp file untouched this long is left over whatever its pid says (pids get reused)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume alive, rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process, or cannot tell: keep its file
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-<hex>`` files next to ``path`` left by savers that no longer run (killed
    mid-write), and any such file untouched for :data:`STALE_AFTER_S` (its pid was reused); a saver that is
    writing keeps its file. Returns the removed paths."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # pragma: no cover - folder vanished or unreadable
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix):
            continue
        pid_str, sep, rest = name[len(prefix):].partition("-")
        if not sep or not pid_str.isdigit() or not rest:
            continue
        if _pid_alive(int(pid_str)):
            try:  # a live pid may be a reused one: a file nobody has written for a day is stale all the same
                if time.time() - entry.stat().st_mtime < STALE_AFTER_S:
                    continue
            except OSError:  # pragma: no cover - renamed by its saver meanwhile
                continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:  # pragma: no cover - removed by another saver meanwhile
            pass
    return removed


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
        header = _strict_json(header_bytes)
    except (ValueError, RecursionError) as e:
        raise IndexFormatError(f"{path} has an unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise IndexFormatError(f"{path} has a header that is not a JSON object")
    return header, data[_FIXED.size + header_len:]


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} in JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r} appears twice in one JSON object")
    return out


def _strict_json(data: bytes) -> Any:
    """JSON without NaN / Infinity (which would not round-trip as metadata equality) and without repeated keys
    in an object (which one would count is a guess)."""
    return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_index_file(path: Path, *, encoder_identity: dict[str, Any] | None = None, dim: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], bytes, np.ndarray]:
    """Read and verify one index file: ``(header, records, faiss_bytes, vectors)``.

    Refuses a missing, truncated, corrupt or newer file, and an index built by another encoder (``encoder_identity``)
    or for another dimension (``dim``) than the caller's."""
    path = Path(path)
    header, payload = _read(path)

    def bad(what: str) -> IndexFormatError:
        return IndexFormatError(f"{path} is not a consistent index file: {what}")

    stored_dim = header.get("dim")
    if not _is_int(stored_dim) or not 1 <= stored_dim <= 1 << 20:
        raise bad(f"header dim {stored_dim!r} is not a positive int")
    version = header.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise bad(f"header format_version {version!r} is not one this kvagents reads")
    if header.get("metric") not in ("cosine", "ip", "l2"):
        raise bad(f"unknown metric {header.get('metric')!r}")
    if header.get("factory") is not None and not isinstance(header.get("factory"), str):
        raise bad(f"factory {header.get('factory')!r} is not a string")
    if header.get("encoder_identity") is not None and not isinstance(header.get("encoder_identity"), dict):
        raise bad(f"encoder_identity {header.get('encoder_identity')!r} is not an object")
    sections = header.get("sections")
    names = ("records", "faiss", "vectors")
    if not isinstance(sections, dict) or set(sections) != set(names):
        raise bad(f"sections {sections!r} are not exactly {names}")
    spans = []
    for name in names:
        sec = sections[name]
        if (not isinstance(sec, list) or len(sec) not in (2, 3) or not all(_is_int(v) for v in sec[:2])
                or (len(sec) == 3 and not isinstance(sec[2], str))):
            raise bad(f"section {name} is {sec!r}, not [offset, length, sha256]")
        start, length = sec[0], sec[1]
        if start < 0 or length < 0 or start + length > len(payload):
            raise bad(f"section {name} [{start}, {start + length}) lies outside the {len(payload)}-byte payload")
        spans.append((start, start + length, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise bad(f"sections {a} and {b} overlap")
    if sum(e - s for s, e, _ in spans) != len(payload):
        raise bad("the sections do not cover the payload exactly")

    def section(name: str) -> bytes:
        start, length = sections[name][0], sections[name][1]
        data = bytes(payload[start: start + length])
        if len(sections[name]) == 3 and hashlib.sha256(data).hexdigest() != sections[name][2]:
            raise IndexChecksumError(f"{path}: section {name} fails its SHA-256 check; the file is corrupt")
        return data

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

    try:
        records = _strict_json(section("records"))
    except (ValueError, RecursionError) as e:
        raise bad(f"the records section is not valid JSON ({e})") from e
    _check_records(records, header, bad)
    vec_bytes = section("vectors")
    n = len(records["labels"])
    if len(vec_bytes) != n * stored_dim * 4:
        raise bad(f"the vectors section has {len(vec_bytes)} bytes; {n} labels x {stored_dim} dims x 4 need "
                  f"{n * stored_dim * 4}")
    vectors = np.frombuffer(vec_bytes, dtype="<f4").reshape(n, stored_dim).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise bad("the vectors section holds NaN or inf")
    return header, records, section("faiss"), vectors


def _check_records(records: Any, header: dict[str, Any], bad) -> None:
    """Cross-check the records against themselves and the header; raise ``bad(what)`` on the first problem."""
    keys = {"ids", "labels", "texts", "metadatas", "tombstones", "next_label"}
    if not isinstance(records, dict) or set(records) != keys:
        raise bad(f"the records are not an object with exactly the keys {sorted(keys)}")
    for name in ("ids", "labels", "texts", "metadatas", "tombstones"):
        if not isinstance(records[name], list):
            raise bad(f"records {name} is not a list")
    ids, labels, tombstones, next_label = records["ids"], records["labels"], records["tombstones"], records["next_label"]
    n = len(labels)
    for name in ("ids", "texts", "metadatas"):
        if len(records[name]) != n:
            raise bad(f"records hold {len(records[name])} {name} for {n} labels")
    if header.get("ntotal") != n:
        raise bad(f"header ntotal {header.get('ntotal')!r} differs from the {n} stored entries")
    if not _is_int(next_label) or not 0 <= next_label < 1 << 62:
        raise bad(f"next_label {next_label!r} is not an int in [0, 2**62)")
    for name, seq in (("labels", labels), ("tombstones", tombstones)):
        if not all(_is_int(v) and 0 <= v < next_label for v in seq):
            raise bad(f"{name} must be ints in [0, next_label={next_label})")
        if len(set(seq)) != len(seq):
            raise bad(f"{name} repeat a value")
    if set(labels) & set(tombstones):
        raise bad("a label is both live and a tombstone")
    if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise bad("ids must be unique strings")
    if not all(t is None or isinstance(t, str) for t in records["texts"]):
        raise bad("texts must be strings or null")
    if not all(isinstance(m, dict) for m in records["metadatas"]):
        raise bad("metadatas must be objects")


def _canonical(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, default=_json_default)
