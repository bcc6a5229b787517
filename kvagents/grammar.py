"""Grammar-constrained decoding: a logits processor that masks every token the grammar forbids (xgrammar).

The mask is a :data:`~kvagents.engine.decode.LogitsProcessor` for ``KVModel.generate(..., logits_processors=[mask])``: one
xgrammar matcher per sequence (``P`` prompts x ``n`` samples, prompt-major as in the engine), each advanced with
the token the engine chose at the previous step, then asked for the bitmask of allowed next tokens. Constrained
decoding needs that host round trip every step (the matcher runs on the CPU); unconstrained calls pay nothing.

Grammars come from JSON schemas, regular expressions, EBNF or xgrammar structural tags (tool calls); compiling
against a tokenizer is cached per (tokenizer, vocabulary size) and per grammar.

Why xgrammar (``bench/grammar_libs.py``, smollm2-135m's 49k-token vocabulary, 2-core CPU, one thread; all three
accept the same replayed answers; table in ``bench/RESULTS.md``): per-token cost of mask + accept 18 / 10 us
(joke / tool schema) for xgrammar, 38 / 27 us for llguidance, 633 / 447 us for outlines-core; schema compile
12 / 2 ms, 4 / 1 ms, 41 / 72 ms; tokenizer set-up 0.36 s, 0.54 s, 0.48 s. xgrammar has the cheapest steps (the
model's own step is ~75 ms here)
and native structural tags (free text until a ``<tool_call>`` trigger, then the tool's schema), which the
``tool_choice="auto"`` mode needs; llguidance is a close second, outlines-core is ~30x slower per token.

Example:
    >>> from kvagents import KVModel
    >>> from kvagents.grammar import GrammarMask
    >>> llm = KVModel.from_pretrained("smollm2-135m")  # doctest: +SKIP
    >>> mask = GrammarMask.from_json_schema(llm, {"type": "object", "properties": {"n": {"type": "integer"}},
    ...                                          "required": ["n"]})  # doctest: +SKIP
    >>> llm.generate("A JSON object:", max_new_tokens=32, temperature=0, logits_processors=[mask])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["GrammarError", "GrammarMask", "closing_tokens", "compile_grammar", "grammar_compiler"]


class GrammarError(ValueError):
    """A grammar (JSON schema, regex, EBNF, structural tag) the constrained-decoding library rejects."""


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("grammar-constrained decoding needs xgrammar: pip install 'xgrammar>=0.1'") from e
    return xgrammar


_COMPILERS: dict[tuple[int, int], Any] = {}
_COMPILERS_LOCK = threading.Lock()


def grammar_compiler(llm) -> Any:
    """The (cached) ``xgrammar.GrammarCompiler`` for a :class:`~kvagents.KVModel`'s tokenizer and vocabulary."""
    xgr = _xgr()
    tok = llm.tokenizer
    vocab = llm.model.get_output_embeddings().weight.shape[0]
    key = (id(tok), vocab)
    with _COMPILERS_LOCK:
        comp = _COMPILERS.get(key)
        if comp is None:
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=llm.engine.eos_token_ids)
            comp = xgr.GrammarCompiler(info, max_threads=1)
            _COMPILERS[key] = comp
    return comp


_CLOSING: dict[tuple[int, int], torch.Tensor] = {}
# closing-token mask's data_ptr -> (its tokens holding a quote, the bare quote token)
_QUOTE_TOKENS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_CLOSING_CHARS = set('"}], \n')
_CLOSERS = set('"}],')


def closing_tokens(llm) -> torch.Tensor:
    """Bool ``[V]``: tokens whose text is only JSON punctuation that ends values (at least one of ``"}],``,
    optionally with spaces / newlines; no digits or letters). Cached per tokenizer."""
    tok = llm.tokenizer
    vocab = llm.model.get_output_embeddings().weight.shape[0]
    key = (id(tok), vocab)
    mask = _CLOSING.get(key)
    if mask is None:
        mask = torch.zeros(vocab, dtype=torch.bool)
        quote = torch.zeros(vocab, dtype=torch.bool)
        exact: list[int] = []
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(min(len(tok), vocab))))):
            text = tok.convert_tokens_to_string([piece]) if piece is not None else ""
            mask[i] = bool(text) and set(text) <= _CLOSING_CHARS and bool(set(text) & _CLOSERS)
            quote[i] = bool(mask[i]) and '"' in text
            if text == '"':
                exact.append(i)
        _CLOSING[key] = mask
        bare = torch.zeros(vocab, dtype=torch.bool)
        bare[exact] = True
        _QUOTE_TOKENS[mask.data_ptr()] = (quote, bare)
    return mask


def compile_grammar(llm, kind: str, spec: Any) -> Any:
    """Compile a grammar for ``llm``: ``kind`` is ``"json_schema"`` (dict / JSON string / pydantic class),
    ``"json"`` (any JSON value), ``"regex"``, ``"ebnf"`` or ``"structural_tag"`` (dict). Raises
    :class:`GrammarError` naming the grammar when the library rejects it."""
    comp = grammar_compiler(llm)
    try:
        if kind == "json_schema":
            schema = spec if isinstance(spec, str) else json.dumps(spec) if isinstance(spec, dict) else spec
            return comp.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        if kind == "json":
            return comp.compile_builtin_json_grammar()
        if kind == "regex":
            return comp.compile_regex(spec)
        if kind == "ebnf":
            return comp.compile_grammar(spec)
        if kind == "structural_tag":
            return comp.compile_structural_tag(json.dumps(spec) if isinstance(spec, dict) else spec)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors
        text = spec if isinstance(spec, str) else json.dumps(spec, default=str) if isinstance(spec, dict) else spec
        raise GrammarError(
            f"the grammar library (xgrammar) rejected this {kind}: {e}. Grammar: {str(text)[:300]}. "
            "Simplify the schema (e.g. drop unsupported keywords or formats) or pass a different one."
        ) from e
    raise ValueError(f"unknown grammar kind {kind!r}; use json_schema, json, regex, ebnf or structural_tag")


class GrammarMask:
    """Logits processor constraining each sequence to its compiled grammar (``None``: unconstrained).

    Args:
        grammars: one compiled grammar (or ``None``) per prompt.
        n: samples per prompt (the engine's ``params.n``); rows are ``P * n``, prompt-major.

    Use one instance per ``generate`` call (matchers hold per-call state). After the call, ``violations``
    lists rows whose chosen token the grammar rejected (a component forced it); those rows are left
    unconstrained from then on.
    """

    def __init__(self, grammars: Sequence[Any], n: int = 1, *, budget: int | None = None, reserve: int = 0,
                 closing_tokens: torch.Tensor | None = None, stop_token_ids: Sequence[int] = ()) -> None:
        xgr = _xgr()
        self._xgr = xgr
        self.compiled = [g for g in grammars for _ in range(n)]
        self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in self.compiled]
        self.running = [m is not None for m in self.matchers]
        self.violations: list[int] = []
        self._bitmask = None
        self.budget, self.reserve = budget, reserve
        self.closing_tokens = closing_tokens
        quote, bare = _QUOTE_TOKENS.get(closing_tokens.data_ptr(), (closing_tokens, closing_tokens)) if (
            closing_tokens is not None) else (None, None)
        self.quote_tokens, self.bare_quote = quote, bare
        self.stop_token_ids = list(stop_token_ids)
        self.step = 0

    @classmethod
    def from_json_schema(cls, llm, schema: Any, n: int = 1, prompts: int = 1) -> GrammarMask:
        g = compile_grammar(llm, "json_schema", schema)
        return cls([g] * prompts, n=n)

    def __call__(self, logits: torch.Tensor, prev_tokens: torch.Tensor | None, prev_valid: torch.Tensor | None):
        B, V = logits.shape
        if B != len(self.matchers):
            raise ValueError(f"GrammarMask was built for {len(self.matchers)} sequences, the batch has {B}")
        if not any(self.running):
            return logits
        if prev_tokens is not None:
            toks, valid = prev_tokens.tolist(), prev_valid.tolist()
            for i, m in enumerate(self.matchers):
                if not self.running[i]:
                    continue
                if not m.accept_token(toks[i]):
                    self.violations.append(i)
                    self.running[i] = False
                    warnings.warn(f"sequence {i}: token {toks[i]} breaks its grammar; left unconstrained", stacklevel=2)
                    continue
                self.running[i] = bool(valid[i]) and not m.is_terminated()
        if not any(self.running):
            return logits
        vocab = self.compiled[next(i for i, r in enumerate(self.running) if r)].tokenizer_info.vocab_size
        if self._bitmask is None:
            self._bitmask = self._xgr.allocate_token_bitmask(B, vocab)
        self._xgr.reset_token_bitmask(self._bitmask)
        for i, m in enumerate(self.matchers):
            if self.running[i]:
                m.fill_next_token_bitmask(self._bitmask, i)
        out = logits.clone()
        mask = self._bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(out, mask, vocab_size=min(vocab, V))
        self.step += 1
        if self.budget is not None and self.closing_tokens is not None and self.budget - self.step < self.reserve:
            self._close(out)
        return out

    def _close(self, out: torch.Tensor) -> None:
        """Closing mode (the last ``reserve`` tokens of the budget): steer every constrained row to finish its
        grammar in time. In order of preference, among the tokens the grammar allows: a stop token; the bare
        quote token (ends a string, or opens and then ends an empty one); a punctuation token with a quote (inside a string it ends the string: ``"``, ``",``, ``"}``); any other JSON punctuation
        token (``}``, ``]``, ``,``); else whatever the grammar allows (keys, digits and tags it dictates)."""
        V = out.shape[1]
        closing = self.closing_tokens.to(out.device)[:V]
        quotes = self.quote_tokens.to(out.device)[:V]
        bare = self.bare_quote.to(out.device)[:V]
        stops = torch.zeros(V, dtype=torch.bool, device=out.device)
        if self.stop_token_ids:
            stops[torch.as_tensor(self.stop_token_ids, device=out.device)] = True
        for i, r in enumerate(self.running):
            if not r:
                continue
            allowed = torch.isfinite(out[i])
            for pick in (allowed & stops, allowed & bare, allowed & quotes, allowed & closing):
                if bool(pick.any()):
                    out[i] = out[i].masked_fill(~pick, float("-inf"))
                    break
