"""``KVModel``: a causal LM + tokenizer, loaded lazily, with kvagents' decode loop and KV embeddings."""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine.components import Component, check_components
from .engine.decode import (
    MAX_SEQUENCES,
    DecodeEngine,
    LogitsProcessor,
    PromptError,
    TooManySequencesError,
    layer_info,
    left_pad,
    token_id,
)
from .engine.params import SamplingParams
from .engine.results import GenerationResult, StreamEvent
from .signals.pooling import KVPooling, pool_cache_rows

Message = dict[str, Any]
Prompt = str | Sequence[int] | Sequence[Message]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX); without them bf16 is
    emulated and several times slower than float32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest sensible dtype: bf16 on CUDA and on CPUs with bf16 instructions, else float32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()):
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fast":
        return fast_dtype(device)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}, 'auto' (bfloat16 on CUDA, float32 "
                         "on CPU) or 'fast' (bfloat16 also on CPUs with bf16 instructions)")
    return _DTYPES[dtype]


class KVModel:
    """A Hugging Face causal LM with kvagents' decode loop, components and KV embeddings.

    Weights load on first use (``.model``, ``.generate``, ``.embed``), not at construction.

    Example:
        >>> llm = KVModel.from_pretrained("qwen2.5-coder-0.5b", dtype="bfloat16")  # nothing loaded yet
        >>> out = llm.generate("What is 2+3?", SamplingParams(max_new_tokens=16, temperature=0))  # doctest: +SKIP
        >>> out.samples[0][0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        source: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        attn_implementation: str | None = None,
        sync_every: int = 8,
        progress: bool = True,
        device_map: str | dict | None = None,
        tp_plan: str | dict | None = None,
    ) -> None:
        if model is None and source is None:
            raise ValueError("KVModel needs a model (and tokenizer) or a source name/path to load lazily")
        self.source = source
        self._model = model
        self._tokenizer = tokenizer
        self.device = model.device if model is not None else resolve_device(device)
        self.dtype = model.dtype if model is not None else resolve_dtype(dtype, self.device)
        self.attn_implementation = attn_implementation
        if device_map is not None and tp_plan is not None:
            raise ValueError("pass device_map (layers over GPUs) or tp_plan (tensor parallel under torchrun), not both")
        self.device_map, self.tp_plan = device_map, tp_plan
        self.sync_every = sync_every
        self.progress = progress
        self._engine: DecodeEngine | None = None
        self._fast_engine = None
        self._scheduler = None
        self._lock = threading.RLock()
        self.load_s: float | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        attn_implementation: str | None = None,
        progress: bool = True,
        **kwargs,
    ) -> KVModel:
        """A lazily-loading model from a registry name (``smollm2-135m``, ``qwen2.5-coder-0.5b``), a hub id,
        a local folder or a ``.gguf`` file. ``dtype="auto"``: bfloat16 on CUDA, float32 on CPU.

        Larger than one GPU: ``device_map="auto"`` (accelerate spreads the layers over the GPUs) or
        ``tp_plan="auto"`` under ``torchrun --nproc-per-node N`` (transformers splits every layer's heads over
        the ranks); KV views, components and ``embed`` gather what they need (:mod:`kvagents.engine.devices`)."""
        from .registry import REGISTRY, UnknownModelError

        if name_or_path is None or not isinstance(name_or_path, (str, Path)):
            raise UnknownModelError(repr(name_or_path), "a model name must be a string or a path")
        name = str(name_or_path)
        if isinstance(name_or_path, str) and name.strip() == "":
            raise UnknownModelError(name, "an empty name would load the current folder; pass a name or a path")
        if name not in REGISTRY and not Path(name).exists() and "/" not in name:
            raise UnknownModelError(name)
        return cls(source=name, dtype=dtype, device=device, attn_implementation=attn_implementation,
                   progress=progress, **kwargs)

    # -- lazy loading -------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> KVModel:
        if self._model is not None:  # loaded: no lock (a caller must not wait for a running decode loop's steps)
            return self
        with self._lock:
            if self._model is not None:
                return self
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from .registry import resolve_model_source

            t0 = time.perf_counter()
            path = resolve_model_source(self.source, progress=self.progress)
            kw = {"dtype": self.dtype}
            if self.attn_implementation:
                kw["attn_implementation"] = self.attn_implementation
            if self.device_map is not None or self.tp_plan is not None:
                # accelerate places layers on several GPUs / transformers shards heads over torchrun ranks;
                # the engine then runs on the input embedding's device (kvagents.engine.devices gathers the KV rows)
                kw.update({"device_map": self.device_map} if self.device_map is not None else {"tp_plan": self.tp_plan})
                model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
                self.device = model.get_input_embeddings().weight.device
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kw).to(self.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = model
            if self.device.type == "cpu":  # measured, not torch's default (see kvagents.engine.threads)
                from .engine.threads import configure_cpu_threads

                configure_cpu_threads(getattr(model.config, "hidden_size", 896), verbose=self.progress)
            self.load_s = time.perf_counter() - t0
        return self

    @property
    def model(self):
        return self.load()._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    @property
    def engine(self) -> DecodeEngine:
        with self._lock:
            if self._engine is None:
                self._engine = DecodeEngine(self.model, self.tokenizer, sync_every=self.sync_every)
        return self._engine

    @property
    def fast_engine(self):
        """The :class:`~kvagents.engine.fast_decode.FastDecodeEngine` (static cache, CUDA graphs on CUDA), built on
        first use (it fuses the q/k/v and gate/up weights in place, values unchanged)."""
        with self._lock:  # its construction rewrites weights in place: never while another call decodes
            return self._build_fast_engine()

    def _build_fast_engine(self):
        if self._fast_engine is None:
            from .engine.fast_decode import FastDecodeEngine

            model = self.model
            if int(getattr(model, "tp_size", None) or 1) > 1 or len({p.device for p in model.parameters()}) > 1:
                raise NotImplementedError(
                    "the fast path (static cache, CUDA graphs) runs a model on one device; this one is spread over "
                    "devices (device_map / tp_plan): use generate(..., fast=False)"
                )

            self._fast_engine = FastDecodeEngine(self.model, self.tokenizer, sync_every=self.sync_every)
        return self._fast_engine

    @property
    def name(self) -> str:
        if self.source:
            return self.source
        return getattr(self._model.config, "_name_or_path", None) or type(self._model).__name__

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # -- prompts ------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, index: int = 0) -> list[int]:
        """Token ids of a prompt: text (tokenized as is), token ids, or chat messages (chat template applied,
        generation prompt added)."""
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError(f"prompt {index} is empty ('')")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                raise PromptError(f"prompt {index}: token ids must be integers, got a {prompt.dtype} tensor")
            ids = prompt.flatten().tolist()
        elif isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise PromptError(
                f"prompt {index} must be text, a list of token ids or a list of chat messages, got {prompt!r}")
        elif len(prompt) > 0 and isinstance(prompt[0], dict):
            if self.tokenizer.chat_template is None:
                raise ValueError(f"prompt {index} is a message list but the tokenizer of {self.name!r} has no chat template")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = [token_id(x, index) for x in prompt]
        if len(ids) == 0:
            raise ValueError(f"prompt {index} is empty (0 tokens)")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [x for x in ids if not 0 <= x < vocab]
        if bad:
            raise ValueError(f"prompt {index} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        ctx = self.context_length
        if ctx is not None and len(ids) >= ctx:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens, the model's context is {ctx}: shorten the prompt"
            )
        return list(ids)

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, np.ndarray):
            if prompts.dtype.kind not in "iu":
                raise PromptError(f"a numpy array of prompts must hold integer token ids, got dtype {prompts.dtype}")
            prompts = torch.from_numpy(np.ascontiguousarray(prompts))
        if isinstance(prompts, torch.Tensor):  # 1-D: one prompt; 2-D: one prompt a row
            if prompts.dim() not in (1, 2):
                raise PromptError(f"a tensor of prompts must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
            prompts = [prompts] if prompts.dim() == 1 else list(prompts)
        elif isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], (numbers.Number, dict))
        ):
            prompts = [prompts]
        elif prompts is None or isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Sequence):
            raise PromptError(f"prompts must be text, token ids, chat messages or a list of those, got {prompts!r}")
        if len(prompts) == 0:
            raise ValueError("no prompts given (empty list)")
        return [self.encode_prompt(p, i) for i, p in enumerate(prompts)]

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        components: Sequence[Component] = (),
        on_text: Callable[[StreamEvent], None] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        fast: bool = False,
        **param_overrides,
    ) -> GenerationResult:
        """Sample ``params.n`` continuations of each prompt (one prefill per prompt).

        ``param_overrides`` build or update ``params`` (``generate("Hi", max_new_tokens=8, temperature=0)``);
        ``params`` may also be a dict of :class:`SamplingParams` fields. One call decodes at most
        :data:`~kvagents.engine.decode.MAX_SEQUENCES` (4096) sequences, prompts x ``n`` (else
        :class:`~kvagents.engine.decode.TooManySequencesError`, before any work).
        ``logits_processors`` shape sampling (see :meth:`DecodeEngine.run`), e.g. a grammar mask.
        ``fast=True`` decodes with :attr:`fast_engine` (static KV cache, CUDA graphs; Llama/Qwen2/Qwen3/Mistral).
        """
        params = _params(params, param_overrides)
        components = check_components(components)
        ids = self._batch(prompts)
        _check_rows(ids, params)
        with self._lock:
            if fast:
                return self.fast_engine.generate(ids, params, components, on_text=on_text,
                                                 logits_processors=logits_processors)
            return self.engine.generate(ids, params, components, on_text=on_text, logits_processors=logits_processors)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        components: Sequence[Component] = (),
        logits_processors: Sequence[LogitsProcessor] = (),
        fast: bool = False,
        **param_overrides,
    ) -> GenerationStream:
        """Iterate over :class:`StreamEvent` text deltas; ``.result`` holds the full result afterwards.
        ``fast=True``: decode with :attr:`fast_engine` (its deltas come every ``sync_every`` steps).

        The stream holds the model lock only while it computes its next event: suspended between events it blocks
        no other caller, and other calls (here or in other threads) may run in between, each with its own decode
        state. ``close()`` (or ``with llm.stream(...) as s:``, or dropping the stream) releases what it holds."""
        params = _params(params, param_overrides)
        components = check_components(components)
        ids = self._batch(prompts)
        _check_rows(ids, params)
        engine = self.fast_engine if fast else self.engine
        return GenerationStream(
            self, engine.run(ids, params, components, stream=True, logits_processors=logits_processors)
        )

    # -- continuous batching ------------------------------------------------------------------------------------
    def scheduler(self, **config):
        """The model's continuous-batching scheduler, started on first call with ``config``
        (:class:`~kvagents.engine.scheduler.SchedulerConfig` fields: ``max_rows``, ``max_queue``, ``prefill_chunk``,
        ``fast``, ``max_seq_len``); later calls return it (a different ``config`` is refused while it runs). A
        shut-down scheduler is replaced by a new one. ``generate`` / ``stream`` are unchanged: they run between the
        scheduler's steps (one model lock).

        ``fast=False`` (default): a :class:`~kvagents.engine.scheduler.Scheduler` over the eager engine (any
        request: components, logits processors). ``fast=True``: a
        :class:`~kvagents.engine.fast_scheduler.FastScheduler` over :attr:`fast_engine` (slots of static buffers,
        one CUDA-graph step for all of them; any request, results equal ``generate(..., fast=True)``'s).

        Example:
            >>> # sched = llm.scheduler(max_rows=8)            # or llm.scheduler(fast=True, max_rows=32)
            >>> # h = sched.submit("What is 2+3?", SamplingParams(max_new_tokens=16, temperature=0))
            >>> # h.result(timeout=60).samples[0][0].text
        """
        from .engine.scheduler import Scheduler, SchedulerConfig

        cfg = SchedulerConfig(**config)
        running = self._scheduler
        if running is not None and not running.closed and (not config or cfg == running.config):
            return running  # no lock: the decode loop holds it between steps, and submitters must not queue on it
        with self._lock:
            if self._scheduler is not None and not self._scheduler.closed:
                if config and cfg != self._scheduler.config:
                    raise ValueError(f"this model's scheduler runs with {self._scheduler.config!r}; shut it down "
                                     f"(llm.scheduler().shutdown()) before starting one with {cfg!r}")
                return self._scheduler
            if cfg.fast:
                from .engine.fast_scheduler import FastScheduler

                self._scheduler = FastScheduler(self.fast_engine, lock=self._lock, config=cfg,
                                                encode=lambda p: self.encode_prompt(p))
            else:
                self._scheduler = Scheduler(self.engine, lock=self._lock, config=cfg,
                                            encode=lambda p: self.encode_prompt(p))
            return self._scheduler

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, components: Sequence[Component] = (),
               logits_processors: Sequence[LogitsProcessor] = (), stream: bool = False,
               on_text: Callable[[StreamEvent], None] | None = None, **param_overrides):
        """Queue one prompt on :meth:`scheduler` (continuous batching); returns a
        :class:`~kvagents.engine.scheduler.RequestHandle` (``.result(timeout)``, iterate with ``stream=True``,
        ``.cancel()``). Its result equals ``generate(prompt, params)``'s for the same prompt and parameters, or
        ``generate(prompt, params, fast=True)``'s when the running scheduler is the fast one (``llm.scheduler(fast=
        True)`` started first; with no scheduler running an eager one starts)."""
        params = _params(params, param_overrides)
        return self.scheduler().submit(prompt, params, components=components, logits_processors=logits_processors,
                                       stream=stream, on_text=on_text)

    # -- embeddings ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(
        self,
        texts: str | Sequence[Prompt],
        pooling: KVPooling | None = None,
        *,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
    ) -> torch.Tensor:
        """Pooled KV embeddings of ``texts`` from one prefill each (batched), ``[N, D]`` float32 on CPU.

        Only the ``prompt`` segment exists here (nothing is generated).
        """
        from tqdm.auto import tqdm
        from transformers import DynamicCache

        pooling = pooling or KVPooling()
        if pooling.segment != "prompt":
            raise ValueError(f"embed() pools prompts only; got segment={pooling.segment!r} (use segment='prompt')")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise ValueError("embed() got no texts")
        ids = [self.encode_prompt(t, i) for i, t in enumerate(items)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # length-sorted batches waste less padding
        out: list[torch.Tensor | None] = [None] * len(ids)
        show = show_progress_bar if show_progress_bar is not None else len(ids) > 4 * batch_size
        engine = self.engine
        with self._lock:
            for start in tqdm(range(0, len(ids), batch_size), desc="embed", disable=not show):
                chunk = order[start : start + batch_size]
                x, m, pos = left_pad([ids[i] for i in chunk], engine.pad_token_id, self.device)
                cache = DynamicCache(config=self.model.config)
                engine.prefill(x, m, pos, cache)
                info = layer_info(cache, self.model)
                layers = pooling.resolve_layers(info.attention_layers, info.num_layers)
                vec = pool_cache_rows(cache, layers, m.bool(), pooling, tp=info.tp).cpu()
                for r, i in enumerate(chunk):
                    out[i] = vec[r]
        res = torch.stack(out)
        return res[0] if single else res

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"KVModel({self.name!r}, dtype={self.dtype}, device={self.device}, {state})"


def _check_rows(ids: list[list[int]], params: SamplingParams) -> None:
    if len(ids) * params.n > MAX_SEQUENCES:
        raise TooManySequencesError(
            f"{len(ids)} prompts x n={params.n} = {len(ids) * params.n} sequences; one call decodes at most "
            f"{MAX_SEQUENCES}: split the prompts over several calls or lower n")


def _params(params: SamplingParams | dict | None, overrides: dict) -> SamplingParams:
    """``params`` (a :class:`SamplingParams`, a dict of its fields or ``None``) with ``overrides`` applied; anything
    else, or a bad field, raises pydantic's ``ValidationError``."""
    if params is None:
        return SamplingParams(**overrides)
    if not isinstance(params, SamplingParams):
        return SamplingParams.model_validate({**params, **overrides} if isinstance(params, dict) else params)
    if overrides:
        return SamplingParams(**{**params.model_dump(), **overrides})
    return params


class GenerationStream:
    """Iterator of :class:`StreamEvent`; after exhaustion ``result`` holds the :class:`GenerationResult`.

    Each ``next`` holds the model lock while it decodes up to the next event and releases it before returning, so a
    suspended stream never blocks another caller. The decode state (the fast engine's static buffers included)
    belongs to this stream until it is exhausted, fails, is closed (:meth:`close`, ``with``) or is garbage-collected;
    a closed stream yields nothing more and keeps ``result`` as ``None``."""

    def __init__(self, llm: KVModel, gen) -> None:
        self._llm = llm
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        with self._llm._lock:
            gen = self._gen
            if gen is None:
                raise StopIteration
            try:
                return next(gen)
            except StopIteration as stop:
                self.result = stop.value
                self._gen = None
                raise StopIteration from None
            except BaseException:
                self._gen = None  # a generator that raised is finished (and has released its state)
                raise

    def close(self) -> None:
        """Stop decoding and release the stream's decode state (no-op once finished or closed)."""
        with self._llm._lock:
            gen, self._gen = self._gen, None
            if gen is not None:
                gen.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
