"""A decode step over pre-allocated (static) KV buffers for Llama-family models (Llama, Mistral, Qwen2, Qwen3).

gpt-fast's ``generate.py`` design on top of a Hugging Face model's own weights (nothing is copied but the fused
projections, see below): one function computes a whole decode step for ``B`` sequences from device tensors only,
so it can be captured in a CUDA graph; its per-layer pieces can be compiled with ``torch.compile`` (one compiled
function shared by all layers: the weights are arguments, not attributes, so Dynamo traces each piece once).

Layout of the cache: ``K``/``V`` are ``[L, B, H_kv, capacity, d]`` (one tensor for all layers, so the rows a step
wrote are one strided read for the components). Prompts are left-padded as in :func:`kvagents.engine.decode.left_pad`:
row ``b`` holds its prompt in columns ``start[b] .. T - 1`` and the token fed at decode step ``t`` (``t >= 1``) in
column ``T + t - 1``, the same for every row. Attention reads columns ``0 .. Lb - 1`` only, where ``Lb`` is the
current length rounded up to a bucket (:meth:`StaticLM.bucket_for`): its cost follows the current length, not the
capacity. On CUDA the default attention (:mod:`kvagents.kernels.decode_attention`) goes further: each row reads only its own
columns ``start[b] .. col``, and a row that has finished (``live`` False) reads nothing. Keys are stored after RoPE,
as Hugging Face caches store them.

The arithmetic repeats the Hugging Face modules op for op (RMSNorm in float32 cast back before the weight, RoPE
in the model dtype from the same cos/sin table), so float32 results equal theirs to rounding; the q/k/v and
gate/up projections are each one matrix product over concatenated weights (the modules' weights become views of
the concatenation: no extra memory, the Hugging Face path keeps working).

Example:
    >>> lm = StaticLM(model)  # doctest: +SKIP
    >>> K, V = lm.new_cache(batch=4, capacity=512)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


# KVAGENTS_ATTN values (see StaticLM.attention_for)
ATTN_IMPLS = ("auto", "sdpa", "reduce", "triton")

# batch sizes up to which a step takes the fused Triton kernels by default (see StaticLM.fused_gemv_for; env
# KVAGENTS_GEMV_ROWS, read when a StaticLM is built, overrides). 8: one prompt x n=8 decoded 6.27 ms/step with the
# several-row kernels against 6.43 with Inductor + cuBLAS (bench/fast_variants.py, H200, 2026-11-25)
FUSED_ROWS = 8


class UnsupportedModelError(ValueError):
    """The fast path has no static decode step for this model; use the eager engine (``fast=False``)."""


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Llama/Qwen RMSNorm, op for op."""
    dt = x.dtype
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def prologue(ids, pos, embed_w, cos_t, sin_t, ln_w, eps: float):
    """Embedding, the first input norm and cos/sin of the positions ``[B, 1, d]`` (shapes depend on ``B`` only:
    compiled once per batch size)."""
    h = F.embedding(ids, embed_w)
    return h, _rms(h, ln_w, eps), cos_t[pos][:, None], sin_t[pos][:, None]


def attention_mask(col, start, cols, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask ``[B, 1, 1, Lb]`` over ``cols`` (``[Lb]``): row ``b`` sees columns
    ``start[b] .. col``. Its length changes with the bucket, so it stays eager (five small kernels in the captured
    step; compiled with dynamic shapes it cost 3-5 s of the first call)."""
    valid = (cols[None] >= start[:, None]) & (cols[None] <= col)
    mask = torch.zeros(valid.shape, dtype=dtype, device=cols.device).masked_fill(~valid, float("-inf"))
    return mask[:, None, None, :]


def attn_pre(x, qkv_w, qkv_b, qn_w, kn_w, cos, sin, k_cache, v_cache, col, eps: float, hq: int, hkv: int, d: int):
    """Fused q/k/v projection of the normed input ``x`` ``[B, D]``, q/k norms (Qwen3), RoPE, and the cache write of
    column ``col``. ``cos``/``sin`` ``[B, 1, d]``; ``k_cache``/``v_cache`` ``[B, H_kv, cap, d]``; ``col`` a
    1-element long tensor. Returns the rotated queries ``[B, H_q, d]``.
    """
    return rope_write(F.linear(x, qkv_w, qkv_b), qn_w, kn_w, cos, sin, k_cache, v_cache, col, eps, hq, hkv, d)


def rope_write(qkv, qn_w, kn_w, cos, sin, k_cache, v_cache, col, eps: float, hq: int, hkv: int, d: int):
    """:func:`attn_pre` after the projection: split ``qkv`` ``[B, (H_q + 2 H_kv) d]``, q/k norms, RoPE, cache write;
    returns the rotated queries ``[B, H_q, d]``."""
    b = qkv.shape[0]
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q, k, v = q.view(b, hq, d), k.view(b, hkv, d), v.view(b, hkv, d)
    if qn_w is not None:
        q, k = _rms(q, qn_w, eps), _rms(k, kn_w, eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, col, k[:, :, None])
    v_cache.index_copy_(2, col, v[:, :, None])
    return q


def attn_post(h, a, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b, next_w, eps: float, inter: int):
    """Output projection + residual, post-attention norm, SwiGLU MLP (fused gate/up) + residual, and the next
    norm (the next layer's input norm, or the final norm): returns ``(h, norm(h))``, one kernel fewer per layer."""
    h = h + F.linear(a, o_w, o_b)
    x = _rms(h, ln_w, eps)
    g, u = F.linear(x, gu_w, gu_b).split((inter, inter), dim=-1)
    h = h + F.linear(F.silu(g) * u, down_w, down_b)
    return h, _rms(h, next_w, eps)


def final_logits(x, head_w):
    """LM head of the final-normed ``x``; float32 logits ``[B, V]`` (computed in the model dtype, as HF does)."""
    return F.linear(x, head_w).float()


def attend_reduce(q, k, v, mask, scale: float, hkv: int):
    """:func:`attend` written as elementwise products and reductions (float32 scores and softmax), for
    ``torch.compile``: Triton reductions spread over ``B * H_q * Lb`` scores, where a fused attention kernel has only
    ``B * H_kv`` blocks at decode time."""
    b, hq, d = q.shape
    g = hq // hkv
    s = (q.view(b, hkv, g, 1, d).float() * k[:, :, None].float()).sum(-1) * scale + mask  # [B, H_kv, G, Lb]
    p = torch.softmax(s, dim=-1)
    o = (p[..., None] * v[:, :, None].float()).sum(-2)  # [B, H_kv, G, d]
    return o.to(q.dtype).reshape(b, hq * d)


def attend(q, k, v, mask, scale: float, hkv: int):
    """Decode attention of ``q`` ``[B, H_q, d]`` over ``k``/``v`` ``[B, H_kv, Lb, d]`` with an additive ``mask``
    ``[B, 1, 1, Lb]``. Grouped-query heads ride as the query-length axis (``[B, H_kv, G, d]``): K/V are read once,
    never repeated."""
    b, hq, d = q.shape
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
    return o.reshape(b, hq * d)


class _Layer:
    __slots__ = ("ln1", "qkv_w", "qkv_b", "qn", "kn", "o_w", "o_b", "ln2", "gu_w", "gu_b", "down_w", "down_b")


def _fuse(mods, names):
    """Concatenate the weights (and biases) of ``mods`` along the output axis and rebind each module's parameter
    to its slice of the concatenation (same values, no second copy)."""
    out = []
    for attr in ("weight", "bias"):
        ps = [getattr(m, attr, None) for m in mods]
        if all(p is None for p in ps):
            out.append(None)
            continue
        if any(p is None for p in ps):
            raise UnsupportedModelError(f"{names}: some projections have a {attr} and some do not")
        fused = torch.cat([p.detach() for p in ps], dim=0)
        at = 0
        for m, p in zip(mods, ps):
            n = p.shape[0]
            setattr(m, attr, torch.nn.Parameter(fused[at : at + n], requires_grad=p.requires_grad))
            at += n
        out.append(fused)
    return out


class StaticLM:
    """The decode step of a Llama-family Hugging Face model over static KV buffers.

    ``compile=True`` wraps the per-layer pieces in ``torch.compile(dynamic=False)`` (the GPU default of
    :class:`~kvagents.engine.fast_decode.FastDecodeEngine`); ``False`` runs them eagerly (CPU, CI).

    Example:
        >>> lm = StaticLM(model)  # doctest: +SKIP
        >>> K, V = lm.new_cache(2, 64)  # doctest: +SKIP
    """

    def __init__(self, model, *, compile: bool = False) -> None:
        name = type(model).__name__
        if name not in SUPPORTED:
            raise UnsupportedModelError(
                f"the fast decode path supports {', '.join(SUPPORTED)}; got {name}: use the eager engine "
                "(KVModel.generate(..., fast=False))"
            )
        cfg = model.config
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported by the fast path (only 'silu')")
        types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise UnsupportedModelError(
                f"layer types {sorted(set(types))}: sliding-window layers are not supported by the fast path"
            )
        if name == "MistralForCausalLM" and getattr(cfg, "sliding_window", None):
            raise UnsupportedModelError("Mistral with sliding_window set is not supported by the fast path")
        inner = model.model
        rot = inner.rotary_emb
        if "dynamic" in str(getattr(rot, "rope_type", "default")):
            raise UnsupportedModelError("dynamic RoPE scaling changes with length: not supported by the fast path")
        self.model = model
        self.rotary = rot
        self.device = model.device
        self.dtype = model.dtype
        self.num_layers = cfg.num_hidden_layers
        self.hq = cfg.num_attention_heads
        self.hkv = cfg.num_key_value_heads
        attn0 = inner.layers[0].self_attn
        self.d = attn0.head_dim
        self.scale = float(attn0.scaling)
        self.eps = float(cfg.rms_norm_eps)
        self.inter = inner.layers[0].mlp.gate_proj.out_features
        self.vocab = model.lm_head.out_features
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or 4096)
        self.embed_w = inner.embed_tokens.weight
        self.norm_w = inner.norm.weight
        self.head_w = model.lm_head.weight
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for i, layer in enumerate(inner.layers):
                a, m = layer.self_attn, layer.mlp
                w = _Layer()
                w.ln1, w.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
                w.qkv_w, w.qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj], f"layer {i} q/k/v")
                w.gu_w, w.gu_b = _fuse([m.gate_proj, m.up_proj], f"layer {i} gate/up")
                w.o_w, w.o_b = a.o_proj.weight, a.o_proj.bias
                w.down_w, w.down_b = m.down_proj.weight, m.down_proj.bias
                qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
                w.qn = qn.weight if qn is not None else None
                w.kn = kn.weight if kn is not None else None
                self.layers.append(w)
        self.compiled = compile
        # "auto" (the default): "triton" on CUDA where Triton runs (kvagents.kernels.decode_attention: each row reads only
        # its own columns start[b] .. col and a finished row reads nothing; faster than SDPA in every case of
        # bench/attention_bench.py, H200, 2026-11-25, e.g. 7.6 vs 13.0 us at B=1, 384 columns), else "sdpa" (one
        # fused kernel per layer over the bucket, with a mask). "reduce": the Inductor reduction form, 0.1-0.2
        # ms/step faster than SDPA at B = 1 in one H100 run, 0.3 ms slower in another, 1.5 ms slower at B = 8
        self.attn_impl = os.environ.get("KVAGENTS_ATTN", "auto")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"KVAGENTS_ATTN must be one of {', '.join(map(repr, ATTN_IMPLS))}, got {self.attn_impl!r}")
        self.attention = self._resolve_attention()
        # one-row steps: q/k/v, o, gate/up, down and the LM head as Triton GEMVs with the RMSNorm / SwiGLU /
        # bias / residual around them fused in (kvagents.kernels.fused_gemv; "auto": on CUDA with compile and Triton)
        self.gemv_impl = os.environ.get("KVAGENTS_GEMV", "auto")
        if self.gemv_impl not in ("auto", "fused", "torch"):
            raise ValueError(f"KVAGENTS_GEMV must be 'auto', 'fused' or 'torch', got {self.gemv_impl!r}")
        rows = os.environ.get("KVAGENTS_GEMV_ROWS", str(FUSED_ROWS))
        if not rows.isdigit():
            raise ValueError(f"KVAGENTS_GEMV_ROWS must be a row count (0 for none), got {rows!r}")
        self.fused_rows = int(rows)
        if compile:
            import torch._inductor.config as ind

            # round bf16 intermediates like eager (parity with HF); a process-wide Inductor setting
            ind.emulate_precision_casts = True
            if os.environ.get("KVAGENTS_AUTOTUNE_POINTWISE", "1") == "0":
                # one launch config per pointwise kernel instead of 2 (1-D) or 6 (2-D), each compiled and then
                # benchmarked at the first call: less compile work for the head (a warm-up experiment, unmeasured)
                ind.triton.autotune_pointwise = False
            if os.environ.get("KVAGENTS_CDT", "0") == "1":
                ind.coordinate_descent_tuning = True
            opts = dict(dynamic=False, fullgraph=True)
            self._pre = torch.compile(attn_pre, **opts)
            self._post = torch.compile(attn_post, **opts)
            self._final = torch.compile(final_logits, **opts)
            # the attention length changes with the bucket: dynamic shapes
            self._attend_reduce = torch.compile(attend_reduce, fullgraph=True, dynamic=True)
            self._prologue = torch.compile(prologue, **opts)
        else:
            self._pre, self._post, self._final, self._attend_reduce = attn_pre, attn_post, final_logits, attend_reduce
            self._prologue = prologue
        self._cos = self._sin = None

    def _resolve_attention(self) -> str:
        """``attn_impl`` made concrete once, when the model is wrapped: ``"sdpa"``, ``"reduce"`` or ``"triton"``."""
        impl = self.attn_impl
        if impl not in ("auto", "triton"):
            return impl
        from ..kernels import decode_attention

        ok = decode_attention.available()
        if impl == "auto":
            pow2 = self.d >= 16 and not self.d & (self.d - 1)  # the kernel's tl.dot over the head size
            return "triton" if (self.device.type == "cuda" and pow2 and ok) else "sdpa"
        if not ok:
            raise RuntimeError("KVAGENTS_ATTN=triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        return impl

    def attention_for(self, batch: int) -> str:
        """The attention of a step over ``batch`` rows: ``"sdpa"``, ``"reduce"`` or ``"triton"`` (see
        ``attn_impl``; the same for every ``batch`` today, resolved when the model was wrapped)."""
        return self.attention

    def _attend(self, impl: str, q, kc, vc, Lb: int, mask, start, col, live):
        """Attention of one layer: ``q`` ``[B, H_q, d]`` over the layer's cache ``kc``/``vc`` ``[B, H_kv, cap, d]``,
        columns ``start[b] .. col`` (``mask`` over the first ``Lb``, or the ranges themselves for ``"triton"``,
        where rows with ``live`` False read nothing and give zeros)."""
        if impl == "triton":
            from ..kernels.decode_attention import decode_attention

            return decode_attention(q, kc, vc, start, col, live, self.scale, Lb)
        f = self._attend_reduce if impl == "reduce" else attend
        return f(q, kc[:, :, :Lb], vc[:, :, :Lb], mask, self.scale, self.hkv)

    def fused_gemv_for(self, batch: int) -> bool:
        """Whether a step over ``batch`` rows runs the fused Triton kernels (see ``gemv_impl``): ``"auto"`` for up
        to ``FUSED_ROWS`` rows on CUDA with compile, ``"fused"`` for up to ``fused_gemv.MAX_ROWS`` rows anywhere
        Triton runs. (An earlier several-row variant with unrolled FMA rows was 2.9x slower than cuBLAS at 8 rows:
        commit 76bba41, reverted; the several-row kernel now uses tensor cores.)"""
        if self.gemv_impl == "torch":
            return False
        if self.gemv_impl == "auto" and not (self.compiled and self.device.type == "cuda"):
            return False
        from ..kernels import fused_gemv

        if batch > (self.fused_rows if self.gemv_impl == "auto" else fused_gemv.MAX_ROWS):
            return False

        if self.gemv_impl == "fused":
            if not fused_gemv.available():
                raise RuntimeError("KVAGENTS_GEMV=fused needs triton and a CUDA device (or TRITON_INTERPRET=1)")
            return True
        return fused_gemv.available()

    # -- buffers ------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, batch, self.hkv, capacity, self.d)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def rope_table(self, positions: int) -> bool:
        """Make the cos/sin table ``[>= positions, d]`` (the model's own rotary module, so any static RoPE
        scaling); True when it was (re)allocated, which invalidates captured graphs."""
        if self._cos is None or self._cos.shape[0] < positions:
            n = max(positions, min(self.max_positions, 1 << 17), 1024)
            pos = torch.arange(n, device=self.device)[None]
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(dummy, pos)
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
            return True
        return False

    @staticmethod
    def bucket_for(col: int, bucket: int, capacity: int) -> int:
        """Columns attention reads when the newest row is ``col``: ``col + 1`` rounded up to ``bucket``."""
        return min(capacity, int(math.ceil((col + 1) / bucket)) * bucket)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self, ids, pos, col, start, K, V, Lb: int, cols: torch.Tensor, live=None) -> torch.Tensor:
        """Feed ``ids`` ``[B]`` at positions ``pos`` ``[B]`` into cache column ``col`` (1-element tensor); rows
        attend to columns ``start[b] .. col``. ``live`` ``[B]`` bool (None: all rows): rows still running; with
        the ``"triton"`` attention a row that is not live costs no attention reads (its logits are then
        meaningless). Returns float32 logits ``[B, V]``. No host synchronisation."""
        impl = self.attention_for(ids.shape[0])
        if impl == "triton" and live is None:
            live = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if self.fused_gemv_for(ids.shape[0]):
            return self._step_fused(ids, pos, col, start, K, V, Lb, cols, impl, live)
        layers = self.layers
        h, x, cos, sin = self._prologue(ids, pos, self.embed_w, self._cos, self._sin, layers[0].ln1, self.eps)
        mask = None if impl == "triton" else attention_mask(col, start, cols[:Lb], h.dtype)
        for i, w in enumerate(layers):
            kc, vc = K[i], V[i]
            q = self._pre(x, w.qkv_w, w.qkv_b, w.qn, w.kn, cos, sin, kc, vc, col, self.eps, self.hq, self.hkv,
                          self.d)
            a = self._attend(impl, q, kc, vc, Lb, mask, start, col, live)
            nxt = layers[i + 1].ln1 if i + 1 < len(layers) else self.norm_w
            h, x = self._post(h, a, w.o_w, w.o_b, w.ln2, w.gu_w, w.gu_b, w.down_w, w.down_b, nxt, self.eps,
                              self.inter)
        return self._final(x, self.head_w)

    def _step_fused(self, ids, pos, col, start, K, V, Lb: int, cols: torch.Tensor, impl: str, live) -> torch.Tensor:
        """:meth:`step` for a few rows with the fused GEMVs: five kernels per layer besides attention and the fused
        q/k-norm + RoPE + cache write (the same arithmetic and roundings as the unfused step; fp32 accumulation order
        differs)."""
        from ..kernels.fused_gemv import gemv
        from ..kernels.fused_rope import rope_write_kernel as rope  # runs wherever the fused GEMVs do

        layers, eps = self.layers, self.eps
        # q/k norms + RoPE + cache write: one Triton kernel (JIT in well under a second, where compiling the same
        # piece with Inductor cost 3-4 s of each batch size's first call)
        # eager: three small kernels once a step, where compiling the prologue cost 1-2 s of the first call (the
        # first norm is fused into the q/k/v GEMV)
        h = F.embedding(ids, self.embed_w)
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]
        mask = None if impl == "triton" else attention_mask(col, start, cols[:Lb], h.dtype)
        for i, w in enumerate(layers):
            kc, vc = K[i], V[i]
            qkv = gemv(h, w.qkv_w, bias=w.qkv_b, rms_weight=w.ln1, eps=eps)
            q = rope(qkv, w.qn, w.kn, cos, sin, kc, vc, col, eps, self.hq, self.hkv, self.d)
            a = self._attend(impl, q, kc, vc, Lb, mask, start, col, live)
            h = gemv(a, w.o_w, bias=w.o_b, residual=h)
            gu = gemv(h, w.gu_w, bias=w.gu_b, rms_weight=w.ln2, eps=eps)
            h = gemv(gu, w.down_w, bias=w.down_b, swiglu=True, residual=h)
        return gemv(h, self.head_w, rms_weight=self.norm_w, eps=eps, out_dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Static per-batch state


class StaticBatch:
    """Device buffers of one (batch, capacity): the KV cache, decode state, component state, graphs."""

    def __init__(self, lm: StaticLM, B: int, cap: int) -> None:
        dev = lm.device
        self.B, self.cap = B, cap
        self.K, self.V = lm.new_cache(B, cap)
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        self.tok, self.fed_ids, self.reason, self.n_gen, self.n_forced = z(B), z(B), z(B), z(B), z(B)
        self.nan_step, self.fed_pos, self.lengths, self.start = z(B), z(B), z(B), z(B)
        self.force_tok, self.force_mask = z(B), z(B, dt=torch.bool)
        self.alive, self.forced, self.finished, self.fed_valid = (z(B, dt=torch.bool) for _ in range(4))
        self.out_tokens = z(B, cap)
        self.step, self.T0, self.max_new, self.seed_key = z(), z(), z(), z()
        self.col = z(1)
        self.logits = torch.zeros((B, lm.vocab), dtype=torch.float32, device=dev)
        self.scores: torch.Tensor | None = None  # the logits processors' output (allocated when first used)
        self.rows = torch.arange(B, device=dev)
        self.vocab = torch.arange(lm.vocab, device=dev)
        self.cols = torch.arange(cap, device=dev)
        self.comp_state: dict[tuple, torch.Tensor] = {}
        self.graphs: dict[tuple, Any] = {}
        self.consts: dict[tuple, torch.Tensor] = {}
        self.in_use = False  # owned by a live generation (FastDecodeEngine._static / _release)
        self.info = None  # the owning generation's LayerInfo

    def engine_state(self) -> list[torch.Tensor]:
        return [self.tok, self.fed_ids, self.reason, self.n_gen, self.n_forced, self.nan_step, self.fed_pos,
                self.alive, self.forced, self.finished, self.fed_valid, self.out_tokens, self.step, self.col,
                self.logits, self.force_tok, self.force_mask]

    def const(self, values: Sequence[int]) -> torch.Tensor:
        key = tuple(values)
        if key not in self.consts:
            self.consts[key] = torch.as_tensor(list(values), dtype=torch.long, device=self.tok.device)
        return self.consts[key]
