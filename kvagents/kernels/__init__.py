"""Triton kernels of the fast decode path, each with a torch reference it is tested against.

``fused_gemv`` (GEMVs with norms / residuals / SwiGLU fused in, up to 8 rows), ``fused_rope`` (q/k norm + RoPE +
cache write), ``decode_attention`` (attention over each row's own KV columns), ``topk_values`` (exact top-k values),
``top_p_search`` (sort-free top-p), ``kernel_precompile`` (compile them in worker processes), ``triton_support``
(what they share: device checks, the CPU interpreter). Nothing outside this wing imports Triton; nothing here
imports the rest of kvagents.
"""
