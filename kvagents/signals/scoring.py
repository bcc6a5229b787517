"""Per-sample scores computed inside the decode loop: KV Chain-of-Embedding and output-probability baselines.

Every component here keeps per-sequence state on the model's device whose size does not grow with the number of
generated tokens (the one exception, :class:`TokenCoE`, keeps two float32 scalars per token for CoE-C), updates
it without host synchronisation in ``on_step`` and does the host work in ``on_finish``. ``on_finish`` returns one
``dict[str, float]`` per sequence; :data:`SCORE_DIRECTIONS` says for every key whether higher (+1) or lower (-1)
means "more likely correct".

* :func:`coe_scores`: the reference CoE-Mag / CoE-Ang / CoE-R / CoE-C of one trajectory ``[N_points, D]``
  (Wang et al., ICLR 2025; see ``docs/paper.md``, "Chain-of-Embedding").
* :class:`LayerCoE`: layer-axis KV-CoE (per-layer mean of the generated tokens' K/V rows, CoE over layers).
* :class:`TokenCoE`: token-axis KV-CoE as the KV-Embedding paper defines it (one vector per generated token,
  CoE over tokens).
* :class:`ProbabilityScores`: mean max-probability, mean log-probability / perplexity, mean entropy and
  DeepConf's lowest group confidence.
* :func:`hidden_coe_from_forward`: the original hidden-state CoE, from one extra forward pass (the loop does not
  expose hidden states).

Which tokens count: the KV scores use the generated tokens that were *fed* to the model, i.e. every generated
token but the last (the last sampled token ends the loop and never enters the cache); the probability scores use
every generated token (each one's distribution exists).

Example:
    >>> comps = [LayerCoE(), TokenCoE(), ProbabilityScores()]
    >>> # res = llm.generate(prompts, SamplingParams(n=8, temperature=0.7), components=comps)
    >>> # best = max(res.samples[0], key=lambda s: s.outputs["kv_coe_token"]["kv_coe_token_c"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..engine.components import Component, FinishView, PrefillView, StepView

__all__ = [
    "SCORE_DIRECTIONS",
    "LayerCoE",
    "ProbabilityScores",
    "TokenCoE",
    "coe_from_steps",
    "coe_from_steps_rows",
    "coe_scores",
    "coe_scores_rows",
    "hidden_coe_from_forward",
]

_COE = ("mag", "ang", "r", "c")

#: For every score key: +1 if higher means "more likely correct", -1 if lower does. CoE-R and CoE-C follow the CoE
#: paper (higher = more likely correct). For CoE-Mag (+1) and CoE-Ang (-1) we choose the signs they carry inside
#: CoE-R = Mag - Ang (our choice; the papers rank by R and C, not by Mag or Ang alone).
SCORE_DIRECTIONS: dict[str, int] = {
    **{f"{prefix}_{k}": s for prefix in ("kv_coe_layer", "kv_coe_token", "hidden_coe")
       for k, s in zip(_COE, (+1, -1, +1, +1))},
    "mean_max_prob": +1,
    "mean_log_max_prob": +1,
    "mean_logprob": +1,
    "perplexity": -1,
    "mean_entropy": -1,
    "lowest_group_confidence": +1,
}


# ----------------------------------------------------------------------------------------------------------------
# Reference CoE


ANGLE_EPS = 1e-12
"""Radians: an end-to-start angle at or below this is rounding noise (``h_last`` parallel to ``h_0``), not a
normaliser: the angle-based scores are NaN there. (The angles are ``2 atan2(||â - b̂||, ||â + b̂||)``: exactly 0 for
a repeated point, ~1e-16 for parallel vectors; the ``arccos`` of a rounded cosine gave ~1e-8 there, and scores
of ~1e8.)"""


def coe_from_steps(
    step_norms: np.ndarray, step_angles: np.ndarray, total_norm: float, total_angle: float
) -> dict[str, float]:
    """The four CoE scores from per-step magnitudes ``||Δ_j||``, angles ``arccos(cos(h_{j+1}, h_j))`` (radians)
    and the end-to-start normalisers ``||h_L - h_0||`` and ``arccos(cos(h_L, h_0))``.

    Returns ``{"mag", "ang", "r", "c"}`` as Python floats. A zero (or non-finite) normaliser, or no steps, makes
    the scores that depend on it NaN: ``total_norm == 0`` -> mag, r, c; ``total_angle <= ANGLE_EPS`` -> ang, r, c.

    Example:
        >>> s = coe_from_steps(np.array([1.0, 1.0]), np.array([0.5, 0.5]), 2.0, 1.0)
        >>> s["mag"], s["ang"], s["r"]
        (0.5, 0.5, 0.0)
    """
    norms = np.asarray(step_norms, dtype=np.float64)
    angles = np.asarray(step_angles, dtype=np.float64)
    nan = float("nan")
    if norms.size == 0:
        return dict.fromkeys(_COE, nan)
    total_norm, total_angle = float(total_norm), float(total_angle)
    ok_n = math.isfinite(total_norm) and total_norm > 0
    ok_a = math.isfinite(total_angle) and total_angle > ANGLE_EPS
    mag_j = norms / total_norm if ok_n else np.full_like(norms, nan)
    ang_j = angles / total_angle if ok_a else np.full_like(angles, nan)
    mag, ang = float(mag_j.mean()), float(ang_j.mean())
    x = float((mag_j * np.cos(ang_j)).mean())
    y = float((mag_j * np.sin(ang_j)).mean())
    return {"mag": mag, "ang": ang, "r": mag - ang, "c": math.hypot(x, y) if math.isfinite(x + y) else nan}


def coe_from_steps_rows(
    step_norms: np.ndarray, step_angles: np.ndarray, valid: np.ndarray, total_norm: np.ndarray,
    total_angle: np.ndarray,
) -> list[dict[str, float]]:
    """:func:`coe_from_steps` for ``B`` sequences at once: ``[B, S]`` steps of which ``valid`` ``[B, S]`` count,
    normalisers ``[B]``; one dict per row, equal to ``coe_from_steps(norms[i, valid[i]], ...)`` up to the order
    of the sums. (Vectorised: at 32 sequences the per-row loop was ~10 ms of the fast path's ``on_finish``.)

    Example:
        >>> s = coe_from_steps_rows(np.array([[1.0, 1.0]]), np.array([[0.5, 0.5]]), np.ones((1, 2), bool),
        ...                         np.array([2.0]), np.array([1.0]))
        >>> s[0]["mag"], s[0]["ang"], s[0]["r"]
        (0.5, 0.5, 0.0)
    """
    norms = np.asarray(step_norms, dtype=np.float64)
    angles = np.asarray(step_angles, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    tn = np.asarray(total_norm, dtype=np.float64)
    ta = np.asarray(total_angle, dtype=np.float64)
    nan = float("nan")
    count = valid.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok_n = np.isfinite(tn) & (tn > 0)
        ok_a = np.isfinite(ta) & (ta > ANGLE_EPS)
        mag_j = np.where(ok_n[:, None], norms / np.where(ok_n, tn, 1.0)[:, None], nan)
        ang_j = np.where(ok_a[:, None], angles / np.where(ok_a, ta, 1.0)[:, None], nan)

        def mean(v):
            return np.where(valid, v, 0.0).sum(-1) / np.maximum(count, 1)

        mag, ang = mean(mag_j), mean(ang_j)
        x, y = mean(mag_j * np.cos(ang_j)), mean(mag_j * np.sin(ang_j))
        c = np.where(np.isfinite(x + y), np.hypot(x, y), nan)
    return [dict.fromkeys(_COE, nan) if count[i] == 0 else
            {"mag": float(mag[i]), "ang": float(ang[i]), "r": float(mag[i] - ang[i]), "c": float(c[i])}
            for i in range(norms.shape[0])]  # fmt: skip


def coe_scores_rows(traj: np.ndarray | torch.Tensor) -> list[dict[str, float]]:
    """:func:`coe_scores` of ``B`` trajectories ``[B, N_points, D]`` at once (float64), one dict per row. A torch
    tensor gets its norms and angles computed where it is (float64 on its device) and makes one small transfer.

    Example:
        >>> t = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
        >>> round(coe_scores_rows(t)[0]["mag"], 4)
        0.7071
    """
    # norms and angles where the tensor is (float64), then one small transfer; arrays take the same path on the CPU
    h = (traj.detach() if isinstance(traj, torch.Tensor) else torch.from_numpy(np.asarray(traj))).to(torch.float64)
    if h.dim() != 3:
        raise ValueError(f"coe_scores_rows expects trajectories [B, N_points, D], got shape {tuple(h.shape)}")
    if h.shape[1] < 2:
        return [dict.fromkeys(_COE, float("nan")) for _ in range(h.shape[0])]
    steps = torch.cat([(h[:, 1:] - h[:, :-1]).norm(dim=-1), _angle(h[:, 1:], h[:, :-1]),
                       (h[:, -1] - h[:, 0]).norm(dim=-1)[:, None], _angle(h[:, -1], h[:, 0])[:, None]],
                      dim=1).cpu().numpy()  # fmt: skip
    s = h.shape[1] - 1
    return coe_from_steps_rows(steps[:, :s], steps[:, s : 2 * s], np.ones((h.shape[0], s), dtype=bool),
                               steps[:, 2 * s], steps[:, 2 * s + 1])


def coe_scores(traj: np.ndarray | torch.Tensor) -> dict[str, float]:
    """CoE-Mag, CoE-Ang, CoE-R and CoE-C of a trajectory ``[N_points, D]`` (layers or tokens), in float64.

    With ``Δ_j = h_{j+1} - h_j`` over consecutive points ``j = 0..N-2``:

    * ``Mag_j = ||Δ_j|| / ||h_last - h_0||``, ``mag = mean_j Mag_j``;
    * ``Ang_j = arccos(cos(h_{j+1}, h_j)) / arccos(cos(h_last, h_0))``, ``ang = mean_j Ang_j``;
    * ``r = mag - ang``; ``c = ||(mean_j Mag_j cos Ang_j, mean_j Mag_j sin Ang_j)||``.

    Angles are computed as ``2 atan2(||â - b̂||, ||â + b̂||)`` (equal to the arccos, accurate near 0). NaN (never an
    exception) where a score is undefined: fewer than two points, ``h_last == h_0`` (mag, ang, r, c), ``h_last``
    parallel to ``h_0`` (ang, r, c: an end-to-start angle at most :data:`ANGLE_EPS`), or a zero vector (its angles).

    Example:
        >>> s = coe_scores(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
        >>> round(s["mag"], 4), round(s["ang"], 4)
        (0.7071, 0.5)
    """
    h = traj.detach() if isinstance(traj, torch.Tensor) else torch.from_numpy(np.asarray(traj, dtype=np.float64))
    if h.dim() != 2:
        raise ValueError(f"coe_scores expects a trajectory [N_points, D], got shape {tuple(h.shape)}")
    return coe_scores_rows(h[None])[0]


def _prefixed(scores: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in scores.items()}


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between ``a`` and ``b`` along the last axis, ``2 atan2(||â - b̂||, ||â + b̂||)``.

    Equal to ``arccos(cos(a, b))`` but accurate for nearly parallel vectors in float32 (arccos of a cosine near
    1 loses half the digits). NaN where a vector is zero.
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    return 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


# ----------------------------------------------------------------------------------------------------------------
# KV-CoE components


@dataclass
class LayerCoE(Component):
    """Layer-axis KV-CoE of the generated segment, accumulated in the decode loop.

    Per attention layer ``l`` a running sum of the fed generated tokens' rows (``view.fed_valid`` masks finished
    sequences); at finish the per-layer means ``h_l`` (``[K_l ; V_l]`` for ``part="kv"``, heads averaged or
    flattened) form the trajectory over *all* attention layers, scored by :func:`coe_scores`. State per sequence:
    ``nL * parts * H * d`` floats, whatever the number of tokens. A sequence with no fed token (it stopped at its
    first token) scores NaN.

    Output per sequence: ``{"kv_coe_layer_mag", "kv_coe_layer_ang", "kv_coe_layer_r", "kv_coe_layer_c"}``.

    Example:
        >>> comp = LayerCoE(part="kv", heads="flatten")
        >>> # llm.generate(p, params, components=[comp]).samples[0][0].outputs["kv_coe_layer"]["kv_coe_layer_c"]
    """

    part: Literal["kv", "k", "v"] = "kv"
    heads: Literal["mean", "flatten"] = "mean"
    name: str = "kv_coe_layer"
    prefix: str = "kv_coe_layer"
    _layers: list[int] = field(default_factory=list, init=False, repr=False)
    _sum: torch.Tensor | None = field(default=None, init=False, repr=False)
    _count: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.part not in ("kv", "k", "v"):
            raise ValueError(f"part must be 'kv', 'k' or 'v', got {self.part!r}")
        if self.heads not in ("mean", "flatten"):
            raise ValueError(f"heads must be 'mean' or 'flatten', got {self.heads!r}")

    def on_prefill(self, view: PrefillView) -> None:
        info = view.layers
        if len(info.attention_layers) < 2:
            raise ValueError(f"layer-axis CoE needs >= 2 attention layers, the model has {len(info.attention_layers)}")
        self._layers = list(info.attention_layers)
        b = view.input_ids.shape[0] * view.n
        parts = 2 if self.part == "kv" else 1
        dev = view.input_ids.device
        self._sum = torch.zeros((b, len(self._layers), parts, info.kv_heads, info.head_dim), device=dev)
        self._count = torch.zeros(b, dtype=torch.long, device=dev)

    def on_step(self, view: StepView) -> None:
        if not view.has_kv:
            return None
        rows = view.kv_rows(self._layers, self.part).float()  # [B, nL, P, H, d]
        self._sum += rows * view.fed_valid[:, None, None, None, None]
        self._count += view.fed_valid.long()
        return None

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The state :meth:`step_tensors` updates in place (the fast path's captured step)."""
        return {"_sum": self._sum, "_count": self._count}

    def step_tensors(self, view) -> None:
        """:meth:`on_step` with in-place device ops only (graph-safe)."""
        if not view.has_kv:
            return
        rows = view.kv_rows(self._layers, self.part).float()
        self._sum += rows * view.fed_valid[:, None, None, None, None]
        self._count += view.fed_valid.long()

    def trajectories(self) -> torch.Tensor:
        """Per-layer mean vectors ``[B, nL, D]`` on the device (zeros where nothing was fed)."""
        mean = self._sum / self._count.clamp(min=1)[:, None, None, None, None].float()
        mean = mean.mean(dim=3) if self.heads == "mean" else mean.flatten(3)  # [B, nL, P, D']
        return mean.flatten(2)

    def on_finish(self, view: FinishView) -> list[dict[str, float]]:
        counts = self._count.tolist()
        scores = coe_scores_rows(self.trajectories())
        return [_prefixed(s if counts[i] > 0 else dict.fromkeys(_COE, float("nan")), self.prefix)
                for i, s in enumerate(scores)]


@dataclass
class TokenCoE(Component):
    """Token-axis KV-CoE (the KV-Embedding paper's definition), accumulated online in the decode loop.

    Each fed generated token ``t`` gives ``e_t = mean over all attention layers of [K_t ; V_t]`` (KV heads
    flattened, size ``2 * H * d``). Per step the component keeps ``e_first`` and ``e_prev`` (vector state, flat in
    the number of tokens) and stores two float32 scalars per token: ``||e_t - e_{t-1}||`` and the step angle
    ``arccos(cos(e_t, e_{t-1}))`` (computed as ``2 atan2(||â-b̂||, ||â+b̂||)``, accurate for nearly parallel
    vectors). CoE-C needs them all because ``Ang_t`` is normalised by the end-to-start angle, known only at the
    end. At finish: normalise by ``||e_T - e_1||`` and ``arccos(cos(e_T, e_1))`` (:func:`coe_from_steps`).
    Fewer than two fed tokens -> NaN.

    The per-token scalars live in the growing buffers named in ``PER_TOKEN_STATE`` (``[B, capacity]``, doubled
    when full: column ``view.step`` holds the token fed in that step's forward).

    Output per sequence: ``{"kv_coe_token_mag", "kv_coe_token_ang", "kv_coe_token_r", "kv_coe_token_c"}``.

    Example:
        >>> comp = TokenCoE()
        >>> # llm.generate(p, params, components=[comp]).samples[0][0].outputs["kv_coe_token"]["kv_coe_token_r"]
    """

    PER_TOKEN_STATE = ("_step_norm", "_step_angle", "_step_valid")

    name: str = "kv_coe_token"
    prefix: str = "kv_coe_token"
    initial_capacity: int = 64
    _layers: list[int] = field(default_factory=list, init=False, repr=False)
    _first: torch.Tensor | None = field(default=None, init=False, repr=False)
    _prev: torch.Tensor | None = field(default=None, init=False, repr=False)
    _count: torch.Tensor | None = field(default=None, init=False, repr=False)
    _step_norm: torch.Tensor | None = field(default=None, init=False, repr=False)
    _step_angle: torch.Tensor | None = field(default=None, init=False, repr=False)
    _step_valid: torch.Tensor | None = field(default=None, init=False, repr=False)

    def on_prefill(self, view: PrefillView) -> None:
        info = view.layers
        if not info.attention_layers:
            raise ValueError("this model's cache holds no keys in any layer: no KV-CoE")
        self._layers = list(info.attention_layers)
        b = view.input_ids.shape[0] * view.n
        dev = view.input_ids.device
        dim = 2 * info.kv_heads * info.head_dim
        self._first = torch.zeros((b, dim), device=dev)
        self._prev = torch.zeros((b, dim), device=dev)
        self._count = torch.zeros(b, dtype=torch.long, device=dev)
        cap = max(1, self.initial_capacity)
        self._step_norm = torch.zeros((b, cap), device=dev)
        self._step_angle = torch.zeros((b, cap), device=dev)
        self._step_valid = torch.zeros((b, cap), dtype=torch.bool, device=dev)

    def _grow(self, need: int) -> None:
        cap = self._step_norm.shape[1]
        if need <= cap:
            return
        extra = max(cap, need - cap)  # at least double: amortised O(1) per token
        for name in self.PER_TOKEN_STATE:
            x = getattr(self, name)
            setattr(self, name, torch.cat([x, x.new_zeros((x.shape[0], extra))], dim=1))

    def on_step(self, view: StepView) -> None:
        if not view.has_kv:
            return None
        rows = view.kv_rows(self._layers, "kv").float()  # [B, nL, 2, H, d]
        e = rows.mean(dim=1).flatten(1)  # [B, 2*H*d]: [K heads flattened ; V heads flattened]
        valid = view.fed_valid
        has_prev = self._count > 0
        step_ok = valid & has_prev
        self._grow(view.step + 1)
        self._step_norm[:, view.step] = (e - self._prev).norm(dim=-1)
        self._step_angle[:, view.step] = _angle(e, self._prev)
        self._step_valid[:, view.step] = step_ok
        self._first = torch.where((valid & ~has_prev)[:, None], e, self._first)
        self._prev = torch.where(valid[:, None], e, self._prev)
        self._count += valid.long()
        return None

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The state :meth:`step_tensors` updates in place (the fast path's captured step)."""
        return {k: getattr(self, k) for k in ("_first", "_prev", "_count", *self.PER_TOKEN_STATE)}

    def graph_reserve(self, capacity: int) -> None:
        """Per-token buffers for ``capacity`` steps at once: a captured step needs stable shapes."""
        self._grow(capacity)

    def step_tensors(self, view) -> None:
        """:meth:`on_step` with in-place device ops only (``view.step`` is a 0-d device tensor)."""
        if not view.has_kv:
            return
        rows = view.kv_rows(self._layers, "kv").float()
        e = rows.mean(dim=1).flatten(1)
        valid = view.fed_valid
        has_prev = self._count > 0
        col = view.step.view(1)
        self._step_norm.index_copy_(1, col, (e - self._prev).norm(dim=-1)[:, None])
        self._step_angle.index_copy_(1, col, _angle(e, self._prev)[:, None])
        self._step_valid.index_copy_(1, col, (valid & has_prev)[:, None])
        self._first.copy_(torch.where((valid & ~has_prev)[:, None], e, self._first))
        self._prev.copy_(torch.where(valid[:, None], e, self._prev))
        self._count += valid.long()

    def on_finish(self, view: FinishView) -> list[dict[str, float]]:
        prev, first = self._prev.double(), self._first.double()  # on the device: one transfer below
        cap = self._step_norm.shape[1]
        host = torch.cat([self._step_norm.double(), self._step_angle.double(), self._step_valid.double(),
                          (prev - first).norm(dim=-1)[:, None], _angle(prev, first)[:, None]], dim=1).cpu().numpy()
        norms, angles, ok = host[:, :cap], host[:, cap : 2 * cap], host[:, 2 * cap : 3 * cap] > 0
        rows = coe_from_steps_rows(norms, angles, ok, host[:, 3 * cap], host[:, 3 * cap + 1])
        return [_prefixed(s, self.prefix) for s in rows]


# ----------------------------------------------------------------------------------------------------------------
# Output-probability baselines


@dataclass
class ProbabilityScores(Component):
    """Output-probability scores of each generated token's raw distribution (``view.logits``, float32, before
    temperature / top-k / top-p), counting the tokens where ``view.alive`` holds.

    Output keys per sequence (NaN when nothing was generated):

    * ``mean_max_prob``: mean over tokens of ``max_v P_t(v)``;
    * ``mean_log_max_prob``: mean of ``log max_v P_t(v)`` (the CoE repo's "perplexity" score is its negative);
    * ``mean_logprob``: mean log-probability of the chosen token; ``perplexity = exp(-mean_logprob)``;
    * ``mean_entropy``: mean of ``-Σ_v P_t(v) log P_t(v)`` (nats);
    * ``lowest_group_confidence``: DeepConf (Fu et al. 2025): token confidence
      ``C_t = -(1/k) Σ_{j<=k} log P_t(j)`` over the top-``k`` tokens (``k = min(top_k, V)``), group confidence
      = mean ``C_t`` over a sliding window of ``window`` consecutive tokens, score = the lowest group
      confidence; the mean ``C_t`` over all tokens when fewer than ``window`` were generated.

    State per sequence: a few running sums and a ring of ``window`` confidences (flat in the number of tokens).

    Example:
        >>> comp = ProbabilityScores(window=32)
        >>> # llm.generate(p, params, components=[comp]).samples[0][0].outputs["probability"]["perplexity"]
    """

    window: int = 32
    top_k: int = 20
    name: str = "probability"
    _count: torch.Tensor | None = field(default=None, init=False, repr=False)
    _sums: torch.Tensor | None = field(default=None, init=False, repr=False)
    _ring: torch.Tensor | None = field(default=None, init=False, repr=False)
    _lowest: torch.Tensor | None = field(default=None, init=False, repr=False)

    _KEYS = ("mean_max_prob", "mean_log_max_prob", "mean_logprob", "mean_entropy", "conf")

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def on_prefill(self, view: PrefillView) -> None:
        b = view.input_ids.shape[0] * view.n
        dev = view.input_ids.device
        self._count = torch.zeros(b, dtype=torch.long, device=dev)
        self._sums = torch.zeros((b, len(self._KEYS)), device=dev)
        self._ring = torch.zeros((b, self.window), device=dev)
        self._lowest = torch.full((b,), float("inf"), device=dev)

    def on_step(self, view: StepView) -> None:
        logp = torch.log_softmax(view.logits.float(), dim=-1)  # [B, V]
        k = min(self.top_k, logp.shape[-1])
        top = logp.topk(k, dim=-1).values  # [B, k], descending
        max_logp = top[:, 0]
        chosen = logp.gather(-1, view.token_ids[:, None]).squeeze(-1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        conf = -top.mean(-1)
        stats = torch.stack([max_logp.exp(), max_logp, chosen, entropy, conf], dim=-1)  # [B, 5]
        alive = view.alive
        self._sums += torch.where(alive[:, None], stats, torch.zeros_like(stats))
        b = torch.arange(alive.shape[0], device=alive.device)
        slot = self._count % self.window
        self._ring[b, slot] = torch.where(alive, conf, self._ring[b, slot])
        self._count += alive.long()
        group = self._ring.sum(-1) / self.window  # exact per step: no drift from add/subtract
        full = alive & (self._count >= self.window)
        self._lowest = torch.where(full, torch.minimum(self._lowest, group), self._lowest)
        return None

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The state :meth:`step_tensors` updates in place (the fast path's captured step)."""
        return {"_count": self._count, "_sums": self._sums, "_ring": self._ring, "_lowest": self._lowest}

    def step_tensors(self, view) -> None:
        """:meth:`on_step` with in-place device ops only, the top-k by :func:`~kvagents.kernels.topk_values.topk_values`.

        ``log_softmax`` is ``logits - lse``: the top-k of the logits (a Triton kernel on CUDA, ``torch.topk``
        elsewhere) minus ``lse`` are the top-k log-probabilities, and ``logp`` itself is never materialised (the
        reductions below fuse it)."""
        from ..kernels.topk_values import topk_values  # noqa: PLC0415 - Triton only when a fast step is built

        logits = view.logits.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logp = logits - lse
        k = min(self.top_k, logp.shape[-1])
        top = topk_values(logits, k) - lse
        max_logp = top[:, 0]
        chosen = logp.gather(-1, view.token_ids[:, None]).squeeze(-1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        conf = -top.mean(-1)
        stats = torch.stack([max_logp.exp(), max_logp, chosen, entropy, conf], dim=-1)
        alive = view.alive
        self._sums += torch.where(alive[:, None], stats, torch.zeros_like(stats))
        slot = (self._count % self.window)[:, None]
        self._ring.scatter_(1, slot, torch.where(alive, conf, self._ring.gather(1, slot).squeeze(1))[:, None])
        self._count += alive.long()
        group = self._ring.sum(-1) / self.window
        full = alive & (self._count >= self.window)
        self._lowest.copy_(torch.where(full, torch.minimum(self._lowest, group), self._lowest))

    def on_finish(self, view: FinishView) -> list[dict[str, float]]:
        counts = self._count.tolist()
        sums = self._sums.double().cpu().tolist()
        lowest = self._lowest.double().cpu().tolist()
        out = []
        for i, n in enumerate(counts):
            if n == 0:
                out.append(dict.fromkeys(
                    ("mean_max_prob", "mean_log_max_prob", "mean_logprob", "perplexity", "mean_entropy",
                     "lowest_group_confidence"), float("nan")))
                continue
            m = dict(zip(self._KEYS, (s / n for s in sums[i])))
            out.append({
                "mean_max_prob": m["mean_max_prob"],
                "mean_log_max_prob": m["mean_log_max_prob"],
                "mean_logprob": m["mean_logprob"],
                "perplexity": math.exp(-m["mean_logprob"]),
                "mean_entropy": m["mean_entropy"],
                "lowest_group_confidence": lowest[i] if n >= self.window else m["conf"],
            })
        return out


# ----------------------------------------------------------------------------------------------------------------
# Hidden-state CoE (the original method), post hoc


@torch.inference_mode()
def hidden_coe_from_forward(model, input_ids: torch.Tensor | list[int], n_prompt: int) -> dict[str, float]:
    """Hidden-state CoE (Wang et al. 2025) of one sequence, from ONE forward pass with ``output_hidden_states``.

    ``input_ids``: the sequence (1-D, or ``[1, T]``), prompt first; positions ``n_prompt..T-1`` are the generated
    tokens whose hidden states are averaged per layer ``j = 0..L`` (embedding output included; in Hugging Face
    models the last entry is after the final norm). The trajectory of these ``L + 1`` means is scored by
    :func:`coe_scores`. To use the same tokens as the KV components, pass ``prompt + generated[:-1]``.

    The decode loop does not expose hidden states, so in-loop hidden CoE is not implemented yet: it would need the
    model to return each new token's per-layer hidden states (an extra ``(L + 1) * hidden`` per token, which is the
    memory cost the KV variants avoid). This baseline pays one extra forward pass per sample instead.

    Output: ``{"hidden_coe_mag", "hidden_coe_ang", "hidden_coe_r", "hidden_coe_c"}``.

    Example:
        >>> # s = hidden_coe_from_forward(llm.model, prompt_ids + sample.token_ids[:-1], len(prompt_ids))
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence (1-D or [1, T]), got shape {tuple(ids.shape)}")
    if not 0 <= n_prompt < ids.shape[1]:
        raise ValueError(f"n_prompt={n_prompt} leaves no generated token in a sequence of {ids.shape[1]}")
    ids = ids.to(model.device)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    means = torch.stack([h[0, n_prompt:].double().mean(dim=0) for h in out.hidden_states])  # [L + 1, D]
    return _prefixed(coe_scores(means), "hidden_coe")
