"""The paper's KV classifier: an MLP over a pooled window of the KV cache, regressing a difficulty in 0-100.

Features (as the released ``KVClassifier``): the K and V rows of the last ``window`` positions of the last
``layers`` attention layers, ``[B, nL, parts, H, w, d]``, reduced over positions (``sum`` in the paper), heads
(``flatten``) and layers (``mean``), K and V concatenated. The head is ``Linear(D, 512) -> ReLU -> Linear(512, 1)``
on standardised features (kvagents adds the standardisation; the paper feeds raw sums). Output: a difficulty in
0-100 (>= 50: think slowly). Saved as ``classifier.safetensors`` + ``classifier.json``; :meth:`KVClassifier.load`
takes the folder.

The same features are computed at prefill (the prompt's last ``window`` rows) and in the decode loop (a ring
buffer of the last ``window`` rows of prompt + generated tokens, updated O(1) per step): see
:class:`~kvagents.control.thinking.ReasoningController`.

:class:`KVRouter` pairs two such heads (``gain`` at prefill, ``step`` mid-thinking; each may be an ensemble of K heads
whose scores are averaged, :class:`KVHeadEnsemble`) with thresholds calibrated by ``kvagents train router``, saved as
one trained-signal folder (:mod:`kvagents.signals.artifact`); a ``ReasoningController`` takes it as its classifier.

Example:
    >>> cfg = KVClassifierConfig(layers=4, window=64)
    >>> clf, report = KVClassifier.fit(features, labels, cfg)   # doctest: +SKIP
    >>> clf.save("clf/"); KVClassifier.load("clf/").predict(features[:4])   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMAT_VERSION = 1
POSITION_AGGS = ("sum", "mean", "last")
HEAD_AGGS = ("mean", "flatten")
LAYER_AGGS = ("mean", "sum", "flatten", "last")
PARTS = ("k", "v", "kv")


def _choice(value, allowed: tuple[str, ...], what: str):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


class KVClassifierConfig(BaseModel):
    """Which KV rows the classifier reads and how they are pooled; the MLP's size; the decision threshold.

    Defaults are the paper's: last 4 layers, last 64 positions summed, heads flattened, layers averaged, K;V,
    hidden 512. ``threshold`` is the difficulty at and above which slow thinking is chosen (50 in the paper;
    a calibrated value can be stored here).

    Example:
        >>> KVClassifierConfig(window=32, positions="mean").window
        32
    """

    model_config = ConfigDict(extra="forbid")

    layers: int | list[int] = Field(4, description="Last n attention layers (int) or explicit layer indices.")
    part: str = Field("kv", description="k, v or kv (K and V concatenated).")
    window: int = Field(64, description="Last w positions pooled (prompt tail at prefill; last w tokens later).")
    positions: str = Field("sum", description="Position aggregation over the window: sum | mean | last.")
    heads: str = Field("flatten", description="Head aggregation: mean | flatten.")
    layer_agg: str = Field("mean", description="Layer aggregation: mean | sum | flatten | last.")
    hidden: int = Field(512, description="Hidden units of the MLP.")
    standardize: bool = Field(True, description="Standardise features with the training mean/std.")
    input_dim: int = Field(0, description="Feature size (set by fit).")
    threshold: float = Field(50.0, description="Difficulty >= threshold -> slow thinking.")
    labels: str = Field("paper", description="Name of the labelling it was trained on (informational).")

    @field_validator("part")
    @classmethod
    def _part(cls, v):
        return _choice(v, PARTS, "KV part")

    @field_validator("positions")
    @classmethod
    def _positions(cls, v):
        return _choice(v, POSITION_AGGS, "position aggregation")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v):
        return _choice(v, HEAD_AGGS, "head aggregation")

    @field_validator("layer_agg")
    @classmethod
    def _layer_agg(cls, v):
        return _choice(v, LAYER_AGGS, "layer aggregation")

    @field_validator("window", "hidden")
    @classmethod
    def _positive(cls, v, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"layers as a count must be >= 1, got {v}")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"layers must list distinct layer indices, got {v}")
        return v

    @property
    def parts(self) -> int:
        return 2 if self.part == "kv" else 1

    def resolve_layers(self, attention_layers: list[int], num_layers: int) -> list[int]:
        """Absolute layer indices (raises ``ValueError`` naming the valid range when one is out of range)."""
        from .pooling import KVPooling

        return KVPooling(layers=self.layers).resolve_layers(attention_layers, num_layers)

    def feature_dim(self, num_layers_selected: int, kv_heads: int, head_dim: int) -> int:
        d = head_dim * (kv_heads if self.heads == "flatten" else 1) * self.parts
        return d * (num_layers_selected if self.layer_agg == "flatten" else 1)


def window_features(win: torch.Tensor, cfg: KVClassifierConfig, last: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a window of rows ``[B, w, nL, parts, H, d]`` into features ``[B, D]`` (float32).

    ``last`` ``[B]`` (optional): index along ``w`` of the most recent row (a ring buffer); default ``w - 1``.
    """
    win = win.float()
    if cfg.positions == "sum":
        x = win.sum(1)
    elif cfg.positions == "mean":
        x = win.mean(1)
    else:
        idx = torch.full((win.shape[0],), win.shape[1] - 1, device=win.device) if last is None else last
        x = win[torch.arange(win.shape[0], device=win.device), idx]
    x = x.mean(dim=3) if cfg.heads == "mean" else x.flatten(3)  # [B, nL, parts, D']
    x = x.flatten(2)  # [B, nL, parts * D'] = [K ; V]
    if cfg.layer_agg == "mean":
        return x.mean(1)
    if cfg.layer_agg == "sum":
        return x.sum(1)
    if cfg.layer_agg == "flatten":
        return x.flatten(1)
    return x[:, -1]


def prompt_window(rows: torch.Tensor, lengths: torch.Tensor | list[int], cfg: KVClassifierConfig) -> torch.Tensor:
    """The last ``window`` prompt rows ``[P, w, nL, parts, H, d]`` from left-padded cache rows
    ``[P, nL, parts, H, T, d]``. A prompt shorter than the window has its window filled on the left with the mean
    of its own rows (so a window summed over positions keeps its scale, and a mean over positions is unchanged);
    an empty prompt is refused."""
    lengths = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    w = cfg.window
    if min(lengths) < 1:
        raise ValueError(f"a prompt of {min(lengths)} tokens has no KV rows for the classifier window")
    win = rows[:, :, :, :, -w:]
    if min(lengths) < w:
        win = win.clone()
        if win.shape[4] < w:  # every prompt is shorter than the window
            pad = win.new_zeros(*win.shape[:4], w - win.shape[4], win.shape[5])
            win = torch.cat([pad, win], dim=4)
        for p, k in enumerate(lengths):
            if k < w:
                own = win[p, :, :, :, w - k:]
                win[p, :, :, :, : w - k] = own.mean(dim=3, keepdim=True)
    return win.permute(0, 4, 1, 2, 3, 5)


class _MLP(torch.nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)


class KVClassifier:
    """Standardise -> ``Linear(D, hidden) -> ReLU -> Linear(hidden, 1)``; ``predict`` gives difficulty 0-100.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
        >>> y = 100.0 * (x[:, 0] > 0)
        >>> clf, rep = KVClassifier.fit(x, y, KVClassifierConfig(hidden=16), seed=0)
        >>> bool(rep["val_accuracy"] >= 0.85)
        True
    """

    def __init__(self, config: KVClassifierConfig, mlp: _MLP, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.config, self.mlp, self.mean, self.std = config, mlp.eval(), mean.float(), std.float()

    @property
    def dim(self) -> int:
        return self.config.input_dim

    def to(self, device) -> KVClassifier:
        self.mlp.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Difficulty ``[B]`` (float32, on ``x``'s device) of features ``[B, D]``; no host synchronisation."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"the classifier expects {self.dim} features, got {x.shape[-1]}: it was trained on another model's "
                "KV or with another pooling"
            )
        dev = x.device
        if self.mean.device != dev:
            self.to(dev)
        w = self.mlp.fc1.weight
        z = ((x.float() - self.mean) / self.std).to(w.dtype)
        with torch.no_grad():
            return (self.mlp(z) * 100.0).float()

    def predict(self, features) -> np.ndarray:
        """Difficulty 0-100 (not clipped) of features ``[N, D]`` (NumPy or tensor) as a NumPy array."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return self.scores(x.to(self.mean.device)).cpu().numpy()

    # -- training ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, features, labels, config: KVClassifierConfig | None = None, *, val_fraction: float = 0.2,
            seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
            max_epochs: int = 400, patience: int = 30, balance: bool = False, weights=None,
            val_index=None, device: str | torch.device = "cpu") -> tuple[KVClassifier, dict[str, Any]]:
        """Fit on ``features`` ``[N, D]`` and ``labels`` ``[N]`` (0-100) with MSE; early stopping on a held-out
        validation split (``val_fraction`` of the rows, random by ``seed``, or ``val_index``). Returns the model at
        its best validation MSE and a report (MSE and accuracy at the 50 threshold on both splits).

        ``balance``: weight rows so that labels >= 50 and < 50 count equally (rare "think slowly" labels).
        ``device``: where to train (the returned classifier is on the CPU; ``.to(device)`` moves it).
        """
        config = (config or KVClassifierConfig()).model_copy()
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).flatten() / 100.0
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be [N, D] with N = len(labels); got {tuple(x.shape)} and {len(y)} labels")
        if x.shape[0] < 4:
            raise ValueError(f"need at least 4 training rows, got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise ValueError("features hold NaN or inf values")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        if val_index is None:
            perm = torch.randperm(n, generator=g)
            n_val = max(1, int(round(n * val_fraction)))
            val_idx, tr_idx = perm[:n_val], perm[n_val:]
        else:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.as_tensor(list(val_index), dtype=torch.long)] = True
            val_idx, tr_idx = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        w = torch.ones(n) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if balance:
            pos = y >= 0.5
            for m in (pos, ~pos):
                if m[tr_idx].any():
                    w[m] = w[m] * (0.5 * len(tr_idx) / float(m[tr_idx].sum()))
        mean = x[tr_idx].mean(0) if config.standardize else torch.zeros(x.shape[1])
        std = x[tr_idx].std(0).clamp(min=1e-6) if config.standardize and len(tr_idx) > 1 else torch.ones(x.shape[1])
        dev = torch.device(device)
        z, y, w = ((x - mean) / std).to(dev), y.to(dev), w.to(dev)
        torch.manual_seed(seed)
        mlp = _MLP(x.shape[1], config.hidden).to(dev)
        opt = torch.optim.Adam(mlp.parameters(), lr=lr, weight_decay=weight_decay)

        def loss_of(idx):
            idx = idx.to(dev)
            with torch.no_grad():
                return float((w[idx] * (mlp(z[idx]) - y[idx]) ** 2).sum() / w[idx].sum())

        best, best_state, best_epoch, bad = float("inf"), None, 0, 0
        for epoch in range(max_epochs):
            mlp.train()
            order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
            for s in range(0, len(order), batch_size):
                b = order[s : s + batch_size].to(dev)
                opt.zero_grad()
                loss = (w[b] * (mlp(z[b]) - y[b]) ** 2).sum() / w[b].sum()
                loss.backward()
                opt.step()
            mlp.eval()
            v = loss_of(val_idx)
            if v < best - 1e-7:
                best, best_epoch, bad = v, epoch, 0
                best_state = {k: t.clone() for k, t in mlp.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
        mlp.load_state_dict(best_state)
        config.input_dim = int(x.shape[1])
        clf = cls(config, mlp.cpu(), mean, std)
        pred = clf.predict(x.numpy())
        yy = y.cpu().numpy() * 100.0

        def stats(idx):
            idx = idx.numpy()
            return (float(np.mean((pred[idx] - yy[idx]) ** 2)), float(np.mean((pred[idx] >= 50) == (yy[idx] >= 50))))

        tr_mse, tr_acc = stats(tr_idx)
        va_mse, va_acc = stats(val_idx)
        report = {"rows": n, "train_rows": len(tr_idx), "val_rows": len(val_idx), "best_epoch": best_epoch,
                  "epochs": epoch + 1, "train_mse": tr_mse, "val_mse": va_mse, "train_accuracy": tr_acc,
                  "val_accuracy": va_acc, "label_mean": float(yy.mean()),
                  "val_predictions": pred[val_idx.numpy()].tolist(), "val_index": val_idx.tolist()}
        return clf, report

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``classifier.safetensors`` and ``classifier.json`` into folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"mlp.{k}": v.detach().float().cpu().contiguous() for k, v in self.mlp.state_dict().items()}
        tensors["mean"], tensors["std"] = self.mean.cpu().contiguous(), self.std.cpu().contiguous()
        save_file(tensors, str(path / "classifier.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "kind": "kv_classifier", "config": self.config.model_dump()}
        (path / "classifier.json").write_text(json.dumps(meta, indent=2))
        return path

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights as named tensors (``prefix`` + ``mlp.fc1.weight``, ..., ``mean``, ``std``)."""
        t = {f"{prefix}mlp.{k}": v.detach().float().cpu().contiguous() for k, v in self.mlp.state_dict().items()}
        t[f"{prefix}mean"], t[f"{prefix}std"] = self.mean.cpu().contiguous(), self.std.cpu().contiguous()
        return t

    @classmethod
    def from_tensors(cls, config: KVClassifierConfig, tensors: dict[str, torch.Tensor],
                     prefix: str = "") -> KVClassifier:
        """The inverse of :meth:`tensors` (the tensors are copied)."""
        mlp = _MLP(config.input_dim, config.hidden)
        n = len(prefix) + 4
        mlp.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(f"{prefix}mlp.")})
        return cls(config, mlp, tensors[f"{prefix}mean"].clone(), tensors[f"{prefix}std"].clone())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> KVClassifier:
        """Load a folder written by :meth:`save`. A router folder (``kvagents train router``) loads as its
        :class:`KVRouter`, which a ``ReasoningController`` takes wherever it takes a classifier."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path / "classifier.json"
        if not meta_path.exists() and (path / "artifact.json").is_file():
            try:
                kind = json.loads((path / "artifact.json").read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError):
                kind = None
            if kind == KVRouter.kind:
                return KVRouter.load(path, device=device)
        if not meta_path.exists():
            raise FileNotFoundError(f"no classifier at {path}: expected {meta_path} (written by KVClassifier.save)")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "kv_classifier":
            raise ValueError(f"{meta_path} is not a KV classifier (kind={meta.get('kind')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer kvagents (format {meta['format_version']}); upgrade")
        config = KVClassifierConfig(**meta["config"])
        t = load_file(str(path / "classifier.safetensors"))
        mlp = _MLP(config.input_dim, config.hidden)
        mlp.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("mlp.")})
        return cls(config, mlp, t["mean"], t["std"]).to(device)


#: what the heads of an ensemble must share (the rows they read and the shape of their MLP)
_SHARED = ("layers", "part", "window", "positions", "heads", "layer_agg", "hidden", "standardize", "input_dim")


class KVHeadEnsemble:
    """K classifier heads read as one: ``scores`` is the mean of the heads' scores (0-100 scale). The heads must read
    the same KV rows with the same pooling and MLP size; ``config`` is the first head's.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
        >>> heads = [KVClassifier.fit(x, 100.0 * (x[:, 0] > 0), KVClassifierConfig(hidden=8), seed=s,
        ...                           max_epochs=3)[0] for s in (0, 1)]
        >>> ens = KVHeadEnsemble(heads)
        >>> bool(np.allclose(ens.predict(x[:3]), (heads[0].predict(x[:3]) + heads[1].predict(x[:3])) / 2, atol=1e-4))
        True
    """

    def __init__(self, heads) -> None:
        heads = list(heads)
        if not heads:
            raise ValueError("an ensemble needs at least one head")
        ref = {k: getattr(heads[0].config, k) for k in _SHARED}
        for h in heads[1:]:
            bad = [k for k in _SHARED if getattr(h.config, k) != ref[k]]
            if bad:
                raise ValueError(f"the heads of an ensemble must read the same features with the same MLP size; "
                                 f"they differ in {', '.join(bad)}")
        self.heads = heads
        self.config = heads[0].config

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def dim(self) -> int:
        return self.heads[0].dim

    def to(self, device) -> KVHeadEnsemble:
        for h in self.heads:
            h.to(device)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Mean difficulty ``[B]`` of the heads (float32, on ``x``'s device)."""
        if len(self.heads) == 1:
            return self.heads[0].scores(x)
        return torch.stack([h.scores(x) for h in self.heads]).mean(0)

    def predict(self, features) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return self.scores(x.to(self.heads[0].mean.device)).cpu().numpy()


def _head_list(head) -> list[KVClassifier]:
    if head is None:
        return []
    if isinstance(head, KVHeadEnsemble):
        return list(head.heads)
    if isinstance(head, (list, tuple)):
        return [h for x in head for h in _head_list(x)]
    return [head]


def _as_head(heads: list[KVClassifier]):
    if not heads:
        return None
    return heads[0] if len(heads) == 1 else KVHeadEnsemble(heads)


class KVRouterConfig(BaseModel):
    """A router's calibrated decision rule and the settings of the runs it was calibrated on.

    ``tau_gain``: at prefill, gain score >= ``tau_gain`` thinks slowly, below answers fast; ``tau_step``: while
    thinking, a step score (read every ``every`` tokens) below ``tau_step`` ends the thinking; ``thinking_budget``:
    thinking tokens after which the answer is forced (``None``: none). Scores are 0-100-scale difficulties;
    ``-1e6`` / ``1e6`` stand for "always" / "never".

    Example:
        >>> KVRouterConfig(tau_gain=40.0, tau_step=20.0, every=16).every
        16
    """

    model_config = ConfigDict(extra="forbid")

    tau_gain: float = Field(description="Prefill: gain score >= tau_gain -> slow thinking, else a fast answer.")
    tau_step: float = Field(-1e6, description="Mid-thinking: step score < tau_step -> stop thinking and answer.")
    thinking_budget: int | None = Field(None, description="Thinking tokens before the answer is forced.")
    format: str = Field("plain", description="Thinking format of the runs it was trained on (plain, qwen3).")
    every: int = Field(32, description="Tokens between step predictions (the checkpoints it was trained on).")
    fast_tokens: int = Field(32, description="Answer tokens of a fast answer.")
    slow_tokens: int = Field(512, description="Generated tokens after which slow thinking was cut.")
    answer_tokens: int = Field(32, description="Answer tokens after thinking ends.")
    tolerance: float = Field(0.5, description="Calibration: accuracy points below always-slow allowed.")
    instruction: str | None = Field(None, description="Format instruction appended to the questions it saw.")
    answer_cue: str | None = Field(None, description="Answer cue forced after thinking / in fast mode.")

    @field_validator("every", "fast_tokens", "slow_tokens", "answer_tokens")
    @classmethod
    def _positive(cls, v, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v


class KVRouter:
    """Fast or slow thinking per question, and when to stop thinking, from the KV cache: a ``gain`` head on the
    prompt's KV window (does slow thinking change the outcome?) and a ``step`` head on the last-w tokens' KV
    (would thinking on still turn a wrong answer right?), with thresholds calibrated by ``kvagents train router``.

    ``gain`` and ``step`` are each one :class:`KVClassifier` or K of them (a list or a :class:`KVHeadEnsemble`): the
    score is the mean of the heads' scores (``kvagents train router`` keeps the cross-fitted fold heads, the ones its
    thresholds were calibrated on). ``gain_heads`` / ``step_heads`` list them.

    It is a classifier to a :class:`~kvagents.control.thinking.ReasoningController`: ``config`` is the KV rows it
    reads (threshold ``tau_gain``), and ``scores`` answers with the gain head at prefill (``step == -1``, which the
    controller sets) and with the step head later, shifted by ``tau_gain - tau_step`` so that the one threshold
    reads both (no step head: exactly the threshold, never a switch). :meth:`controller_settings` gives the
    controller the rule it was calibrated for.

    Example:
        >>> router = KVRouter.load("routers/mine", llm)                              # doctest: +SKIP
        >>> ctl = ReasoningController(PLAIN_FORMAT, llm.tokenizer, classifier=router,
        ...                           **router.controller_settings())               # doctest: +SKIP
        >>> router.route(prompt_features)   # True: think slowly                      # doctest: +SKIP
    """

    kind = "kv_router"

    def __init__(self, gain, step, settings: KVRouterConfig) -> None:
        gains, steps = _head_list(gain), _head_list(step)
        if not gains:
            raise ValueError("a router needs at least one gain head")
        gain, step = _as_head(gains), _as_head(steps)
        if step is not None and (gain.config.layers, gain.config.part, gain.config.window) != (
                step.config.layers, step.config.part, step.config.window):
            raise ValueError("the gain and step heads must read the same KV rows (layers, part, window)")
        self.gain, self.step_head, self.settings = gain, step, settings
        self.gain_heads, self.step_heads = gains, steps
        self.config = gain.config.model_copy(update={"threshold": float(settings.tau_gain)})
        self.step = -1  # -1 at prefill; a ReasoningController sets the decode step before each later call
        self.metadata: dict = {}  # artifact.json of a loaded router (training summary, held-out metrics, model)

    @property
    def dim(self) -> int:
        return self.gain.dim

    def to(self, device) -> KVRouter:
        self.gain.to(device)
        if self.step_head is not None:
            self.step_head.to(device)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier interface (see the class docstring): gain scores at prefill, shifted step scores later."""
        if self.step < 0:
            return self.gain.scores(x)
        if self.step_head is None:
            return torch.full((x.shape[0],), self.config.threshold, dtype=torch.float32, device=x.device)
        return self.step_head.scores(x) + float(self.settings.tau_gain - self.settings.tau_step)

    def predict(self, prompt_features) -> np.ndarray:
        """Gain scores (0-100 scale) of prompt features ``[N, D]``."""
        return self.gain.predict(prompt_features)

    def predict_step(self, window_features) -> np.ndarray:
        """Step scores (0-100 scale, unshifted) of last-w window features ``[M, D]`` (zeros without a step head)."""
        if self.step_head is None:
            return np.zeros(len(window_features), dtype=np.float32)
        return self.step_head.predict(window_features)

    def route(self, prompt_features) -> np.ndarray:
        """``True`` where the router thinks slowly (gain score >= ``tau_gain``)."""
        return self.predict(prompt_features) >= self.settings.tau_gain

    def controller_settings(self) -> dict[str, Any]:
        """``ReasoningController`` keyword arguments for the calibrated rule: start decided at prefill, one switch
        (slow to fast) when a step score falls below ``tau_step`` (no hysteresis), the calibrated thinking budget,
        the answer and length limits it was trained with, step predictions every ``every`` tokens."""
        s = self.settings
        return {"start": "auto", "delta": 0.0, "every": s.every, "max_switches": 1, "switch_to_slow": False,
                "max_thinking_tokens": s.thinking_budget, "max_answer_tokens": s.answer_tokens,
                "stop_thinking_at": s.slow_tokens}

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, model=None, *, training: dict | None = None, metrics: dict | None = None,
             calibration: dict | None = None) -> Path:
        """Write the router as one trained-signal folder (:mod:`kvagents.signals.artifact`): every head's weights
        (``gain.`` / ``step.`` prefixes for one head, ``gain.<k>.`` / ``step.<k>.`` for K; the config's ``gain_heads``
        / ``step_heads`` say K),
        their pooling, the thresholds and settings (and ``calibration``, how they were chosen), ``model``'s
        fingerprint (a ``KVModel`` or a :class:`~kvagents.signals.artifact.ModelFingerprint`), the training summary
        and held-out metrics."""
        from .artifact import as_fingerprint, save_artifact

        tensors = {}
        for name, heads in (("gain", self.gain_heads), ("step", self.step_heads)):
            for k, h in enumerate(heads):  # one head: "gain.", as single-head routers were always written
                tensors.update(h.tensors(f"{name}." if len(heads) == 1 else f"{name}.{k}."))
        config = {"router": self.settings.model_dump(), "gain": self.gain_heads[0].config.model_dump(),
                  "step": self.step_heads[0].config.model_dump() if self.step_heads else None,
                  "gain_heads": len(self.gain_heads), "step_heads": len(self.step_heads),
                  "calibration": calibration or {}}
        return save_artifact(path, self.kind, tensors, config, as_fingerprint(model), training=training,
                             metrics=metrics)

    @classmethod
    def load(cls, path: str | Path, model=None, device: str | torch.device = "cpu") -> KVRouter:
        """Load a router folder. ``model`` (a ``KVModel`` or a fingerprint): refuse a router trained on another
        model (:class:`~kvagents.signals.artifact.ArtifactMismatchError`, naming both)."""
        from .artifact import as_fingerprint, load_artifact

        meta, t = load_artifact(path, cls.kind, model=as_fingerprint(model))
        c = meta["config"]

        def heads(name: str) -> list[KVClassifier]:
            if c.get(name) is None:
                return []
            k = int(c.get(f"{name}_heads", 1))  # routers written before ensembles: one head, no count
            kc = KVClassifierConfig(**c[name])
            prefixes = [f"{name}."] if k == 1 else [f"{name}.{i}." for i in range(k)]
            missing = [p for p in prefixes if f"{p}mean" not in t]
            if missing:
                from .artifact import ArtifactError

                raise ArtifactError(f"{path} lists {k} {name} head(s) but its weights lack {', '.join(missing)}; "
                                    "retrain or restore it")
            return [KVClassifier.from_tensors(kc, t, p) for p in prefixes]

        router = cls(heads("gain"), heads("step") or None, KVRouterConfig(**c["router"])).to(device)
        router.metadata = meta
        return router

    @classmethod
    def from_pretrained(cls, name: str | Path, model=None, device: str | torch.device = "cpu") -> KVRouter:
        """A shipped router by name (:func:`~kvagents.signals.artifact.shipped` lists them) or a router folder."""
        from .artifact import find_trained

        return cls.load(find_trained(name, cls.kind), model=model, device=device)


def load_classifier(classifier, model=None, device: str | torch.device = "cpu"):
    """A prefill/step classifier given by folder or by name, loaded; anything that is not a path or a name (a
    :class:`KVClassifier`, a :class:`KVRouter`, a stub) is returned as it is.

    A folder holding ``classifier.json`` loads as a :class:`KVClassifier`; any other name goes to
    :meth:`KVRouter.from_pretrained`: a router folder (``kvagents train router``) or a shipped router's name (a
    model's name, e.g. ``"qwen2.5-coder-0.5b"``), refused with an error naming both models when ``model`` (a
    ``KVModel`` or a fingerprint) is not the one it was trained on.

    Example:
        >>> type(load_classifier("qwen2.5-coder-0.5b")).__name__
        'KVRouter'
    """
    import os

    if not isinstance(classifier, (str, os.PathLike)):
        return classifier
    if (Path(classifier) / "classifier.json").is_file():
        return KVClassifier.load(classifier, device=device)
    return KVRouter.from_pretrained(classifier, model, device=device)


class StubClassifier:
    """A classifier replaced by a function of the step (tests, demos): ``fn(step: int, batch: int) -> [B]``
    difficulties, with the same ``config``/``scores`` interface as :class:`KVClassifier`.

    Example:
        >>> stub = StubClassifier(lambda step, b: [80.0] * b if step < 0 else [10.0] * b, window=2)
        >>> stub.config.window
        2
    """

    def __init__(self, fn, *, window: int = 4, layers: int | list[int] = 1, threshold: float = 50.0) -> None:
        self.fn = fn
        self.config = KVClassifierConfig(window=window, layers=layers, threshold=threshold, hidden=1)
        self.step = -1  # -1 at prefill; the controller sets the decode step before each call
        self.calls: list[int] = []

    @property
    def dim(self) -> int:
        return -1

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.step)
        return torch.as_tensor(self.fn(self.step, x.shape[0]), dtype=torch.float32, device=x.device)
