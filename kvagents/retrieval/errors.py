"""The errors of :class:`~kvagents.retrieval.index.KVIndex` and its file format: each names what is wrong."""

from __future__ import annotations


class KVIndexError(ValueError):
    """Base class of the index's errors."""


class IndexFormatError(KVIndexError):
    """The file is not a kvagents index, is truncated, or its header cannot be read."""


class IndexVersionError(IndexFormatError):
    """The file was written by a newer kvagents (format version above what this one reads)."""


class IndexChecksumError(KVIndexError):
    """The file's bytes do not match its SHA-256 (corruption)."""


class IndexMismatchError(KVIndexError):
    """The index was built by another encoder or for another dimension than the one in use."""
