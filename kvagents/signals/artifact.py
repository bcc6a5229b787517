"""One folder format for every trained KV signal (probe, router classifiers), tied to the model it was trained on.

A folder holds ``weights.safetensors`` (the tensors) and ``artifact.json``::

    {"format_version": 1, "kind": "kv_probe", "kvagents_version": "0.1.0",
     "config": {...},            # what the signal needs to run: pooling, layers, window, thresholds, calibration
     "model": {...},             # the ModelFingerprint of the model its features came from
     "training": {...},          # data summary: rows, fields, grader, seed
     "metrics": {...}}           # held-out metrics measured when it was trained

Loading checks the format version (a newer one is refused with the version that wrote it), the kind, that both
files are readable, and, given the model in use, its fingerprint: a probe trained on one model reads features that
mean nothing on another, so :class:`ArtifactMismatchError` names both models instead of returning numbers.
The folder is written to a temporary sibling and renamed into place: a crash leaves the old artifact or none.

Example:
    >>> import tempfile, torch
    >>> fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=2, attention_layers=[0, 1], kv_heads=2,
    ...                       head_dim=16, hidden_size=64, vocab_size=100, tokenizer_sha256="ab", weights_sha256="cd")
    >>> folder = save_artifact(tempfile.mkdtemp() + "/probe", "kv_probe", {"w": torch.zeros(3)}, {"dim": 3}, fp)
    >>> meta, tensors = load_artifact(folder, "kv_probe", model=fp)
    >>> meta["config"], tensors["w"].shape
    ({'dim': 3}, torch.Size([3]))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

FORMAT_VERSION = 1
META = "artifact.json"
WEIGHTS = "weights.safetensors"


class ArtifactError(ValueError):
    """A trained-signal folder that cannot be used: missing, corrupt, of another kind or a newer format."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was trained on another model than the one in use."""


class ModelFingerprint(BaseModel):
    """What identifies a model for a trained KV signal: architecture, cache geometry, tokenizer and a weight hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    num_layers: int
    attention_layers: list[int]
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str
    weights_sha256: str
    weights_sample: list[float] = []  # a few weights, compared with a tolerance (any dtype of the same checkpoint)

    def describe(self) -> str:
        return (f"{self.architecture} ({self.num_layers} layers, {self.kv_heads} KV heads x {self.head_dim}, hidden "
                f"{self.hidden_size}, vocab {self.vocab_size}, weights {self.weights_sha256[:12]})")

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Fields that tell the two models apart. The weights are compared by their samples within bfloat16
        precision when both have them (the same checkpoint loaded as float32, bfloat16 or float16 matches), else by
        the hash."""
        out = [k for k in type(self).model_fields if k not in ("weights_sha256", "weights_sample")
               and getattr(self, k) != getattr(other, k)]
        if self.weights_sample and other.weights_sample:
            a, b = torch.tensor(self.weights_sample), torch.tensor(other.weights_sample)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-4):
                out.append("weights_sample")
        elif self.weights_sha256 != other.weights_sha256:
            out.append("weights_sha256")
        return out

    def matches(self, other: ModelFingerprint) -> bool:
        return not self.differences(other)


def fingerprint(model, tokenizer) -> ModelFingerprint:
    """The :class:`ModelFingerprint` of a Hugging Face causal LM and its tokenizer (or of a ``KVModel``, passed as
    ``model`` with ``tokenizer=None``). Hashes the tokenizer's vocabulary and a few thousand numbers of the first and
    last weight tensors: cheap, and different for any retrained or other model."""
    if tokenizer is None and hasattr(model, "tokenizer") and hasattr(model, "model"):
        model, tokenizer = model.model, model.tokenizer
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = int(text_cfg.num_hidden_layers)
    types = getattr(text_cfg, "layer_types", None)
    attention = [i for i in range(layers) if types is None or "attention" in str(types[i])]
    heads = int(getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads)
    head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads)
    if callable(getattr(tokenizer, "get_vocab", None)):
        vocab = tokenizer.get_vocab()
    else:  # a minimal tokenizer: what its ids decode to
        vocab = {tokenizer.decode([i]): i for i in range(int(text_cfg.vocab_size))}
    tok_hash = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    params = [p for p in model.parameters()]
    w = hashlib.sha256()
    sample: list[float] = []
    for p in (params[0], params[-1]):
        head = p.detach().flatten()[:4096]
        w.update(head.to(torch.bfloat16).float().cpu().numpy().tobytes())  # the same for float32 / bfloat16 loads
        sample += head[:: max(1, head.numel() // 32)][:32].float().cpu().tolist()
    return ModelFingerprint(architecture=(cfg.architectures or [type(model).__name__])[0], num_layers=layers,
                            attention_layers=attention, kv_heads=heads, head_dim=head_dim,
                            hidden_size=int(text_cfg.hidden_size), vocab_size=len(vocab), tokenizer_sha256=tok_hash,
                            weights_sha256=w.hexdigest(), weights_sample=sample)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvagents")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
        return "unknown"


def as_fingerprint(model) -> ModelFingerprint | None:
    """``model`` as a :class:`ModelFingerprint`: one already, a ``KVModel``, or ``None``."""
    if model is None or isinstance(model, ModelFingerprint):
        return model
    return fingerprint(model, None)


#: Trained signals that ship with kvagents: one folder per signal under ``kvagents/signals/trained/``, found by name.
TRAINED_DIR = Path(__file__).with_name("trained")


def shipped(kind: str) -> list[str]:
    """Names of the shipped trained signals of ``kind`` (``"kv_router"``, ``"kv_probe"``), sorted.

    Example:
        >>> isinstance(shipped("kv_router"), list)
        True
    """
    names = []
    if TRAINED_DIR.is_dir():
        for d in sorted(TRAINED_DIR.iterdir()):
            try:
                if json.loads((d / META).read_text(encoding="utf-8")).get("kind") == kind:
                    names.append(d.name)
            except (OSError, ValueError):
                continue
    return names


def find_trained(name: str | Path, kind: str) -> Path:
    """The folder of a trained signal given by path or by the name of a shipped one (see :func:`shipped`);
    raises :class:`ArtifactError` naming what exists when it is neither."""
    p = Path(name)
    if (p / META).is_file():
        return p
    if p.name == str(name):  # a shipped one: its own name, or the model's name + the kind ("<model>-probe")
        for cand in (p.name, f"{p.name}-{kind.removeprefix('kv_')}"):
            if (TRAINED_DIR / cand / META).is_file():
                return TRAINED_DIR / cand
    have = shipped(kind)
    raise ArtifactError(f"no trained signal {str(name)!r}: not a folder holding {META}, nor a shipped {kind} "
                        f"({', '.join(have) if have else 'none ship with this kvagents'}); pass the folder "
                        "`kvagents train` wrote")


def save_artifact(folder: str | Path, kind: str, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                  model: ModelFingerprint | None, *, training: dict[str, Any] | None = None,
                  metrics: dict[str, Any] | None = None) -> Path:
    """Write a trained signal's folder atomically (see the module docstring); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, "kind": kind, "kvagents_version": _version(), "config": config,
                "model": model.model_dump() if model is not None else None, "training": training or {},
                "metrics": metrics or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=float))
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_artifact(folder: str | Path, kind: str, *, model: ModelFingerprint | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a trained signal's folder: ``(metadata, tensors)``. ``model``: the fingerprint of the model
    in use; a different one raises :class:`ArtifactMismatchError` naming both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META).is_file():
        raise ArtifactError(f"{folder} holds no trained signal (no {META}); train one with `kvagents train` or "
                            "pass the folder it wrote")
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        version = int(meta["format_version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{folder / META} is unreadable ({e}); retrain or restore it") from None
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} has format version {version}, written by kvagents "
                            f"{meta.get('kvagents_version', '?')}; this kvagents reads up to {FORMAT_VERSION}: upgrade")
    if meta.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {meta.get('kind')!r}, not a {kind!r}")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError, ValueError) as e:
        raise ArtifactError(f"{folder / WEIGHTS} is missing or corrupt ({e}); retrain or restore it") from None
    if model is not None and meta.get("model") is not None:
        trained = ModelFingerprint(**meta["model"])
        if not trained.matches(model):
            raise ArtifactMismatchError(
                f"{folder} was trained on {trained.describe()}, not on the model in use, {model.describe()} "
                f"(they differ in {', '.join(trained.differences(model))}); train it on this model with "
                "`kvagents train`")
    return meta, tensors
