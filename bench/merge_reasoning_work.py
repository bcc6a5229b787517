"""Merge several ``kvagents eval reasoning collect`` work folders into one, for ``kvagents train router --from-work``.

Each folder holds ``config.json``, ``window.json``, ``train_fast.jsonl``, ``train_slow.jsonl``, ``train_features.npz``
(``prompt [N, D]``, ``windows [M, D]``, ``win_row [M]``, ``win_step [M]``) and ``train_features.tokens.json``. The
folders must come from the same runs' settings (model, format, fast/slow/answer tokens, every, layers, window and
the slow cue's length) and the same feature width; anything else is refused, naming the difference. Rows are
deduplicated by ``(dataset, row)`` (the first folder that holds a row keeps it); the features of the kept rows are
concatenated, the windows' ``win_row`` renumbered to the merged order.

    python bench/merge_reasoning_work.py OUT DIR1 DIR2 [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: run settings that must agree between the merged folders (fields of the collect run's config)
SAME_CONFIG = ("model", "format", "fast_tokens", "slow_tokens", "answer_tokens", "every", "layers")
FILES = ("config.json", "window.json", "train_fast.jsonl", "train_slow.jsonl", "train_features.npz")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _load(folder: Path) -> dict:
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a collected reasoning work folder: it lacks {', '.join(missing)}")
    z = np.load(folder / "train_features.npz")
    feats = {k: z[k] for k in z.files}
    for k in ("prompt", "windows", "win_row"):
        if k not in feats:
            raise ValueError(f"{folder / 'train_features.npz'} has no {k!r} array")
    tok_path = folder / "train_features.tokens.json"
    fast, slow = _jsonl(folder / "train_fast.jsonl"), _jsonl(folder / "train_slow.jsonl")
    if not len(fast) == len(slow) == len(feats["prompt"]):
        raise ValueError(f"{folder}: {len(fast)} fast records, {len(slow)} slow records and {len(feats['prompt'])} "
                         "prompt feature rows; they must be equal")
    for f, s in zip(fast, slow):
        if (f["dataset"], f["row"]) != (s["dataset"], s["row"]):
            raise ValueError(f"{folder}: fast and slow records are not in the same row order "
                             f"({f['dataset']}:{f['row']} vs {s['dataset']}:{s['row']})")
    return {"folder": folder, "config": json.loads((folder / "config.json").read_text()),
            "window": json.loads((folder / "window.json").read_text()), "fast": fast, "slow": slow, "feats": feats,
            "tokens": json.loads(tok_path.read_text()) if tok_path.is_file() else None}


def _check_same(parts: list[dict]) -> None:
    a = parts[0]
    for b in parts[1:]:
        diff = []
        for k in ("window", "slow_cue_tokens"):
            if a["window"].get(k) != b["window"].get(k):
                diff.append(f"{k} {a['window'].get(k)!r} vs {b['window'].get(k)!r}")
        for k in SAME_CONFIG:
            va, vb = a["config"]["config"].get(k), b["config"]["config"].get(k)
            if va != vb:
                diff.append(f"{k} {va!r} vs {vb!r}")
        da, db = a["feats"]["prompt"].shape[1], b["feats"]["prompt"].shape[1]
        if da != db:
            diff.append(f"feature width {da} vs {db}")
        if (a["tokens"] is None) != (b["tokens"] is None):
            diff.append("token ids present in one folder only")
        if diff:
            raise ValueError(f"cannot merge {a['folder']} and {b['folder']}: they were collected with other settings "
                             f"({'; '.join(diff)})")


def merge(out: str | Path, folders: list[str | Path]) -> dict:
    """Merge ``folders`` into ``out`` (created; refused when it already holds a work folder). Returns a summary:
    ``rows`` kept, ``duplicates`` dropped, ``per_dataset`` row counts."""
    out = Path(out)
    if len(folders) < 2:
        raise ValueError("give at least two work folders to merge")
    if (out / "train_slow.jsonl").exists():
        raise FileExistsError(f"{out} already holds a work folder; pick another output folder")
    parts = [_load(Path(f)) for f in folders]
    _check_same(parts)
    seen: set[tuple[str, int]] = set()
    fast, slow, prompt, windows, win_row, win_step, tokens = [], [], [], [], [], [], []
    dup = 0
    has_step = all("win_step" in p["feats"] for p in parts)
    for p in parts:
        f = p["feats"]
        for i, (fr, sr) in enumerate(zip(p["fast"], p["slow"])):
            key = (fr["dataset"], int(fr["row"]))
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            new = len(fast)
            fast.append(fr)
            slow.append(sr)
            prompt.append(f["prompt"][i])
            mine = np.nonzero(f["win_row"] == i)[0]
            if len(sr.get("checkpoints", [])) != len(mine):
                raise ValueError(f"{p['folder']}: row {key[0]}:{key[1]} has {len(sr.get('checkpoints', []))} "
                                 f"checkpoints but {len(mine)} windows")
            windows.append(f["windows"][mine])
            win_row += [new] * len(mine)
            if has_step:
                win_step += f["win_step"][mine].tolist()
            if p["tokens"] is not None:
                tokens.append(p["tokens"][i])
    out.mkdir(parents=True, exist_ok=True)
    d = parts[0]["feats"]["prompt"].shape[1]
    arrays = {"prompt": np.stack(prompt).astype(np.float32),
              "windows": np.concatenate(windows).astype(np.float32) if windows else np.zeros((0, d), np.float32),
              "win_row": np.asarray(win_row, dtype=np.int64)}
    if has_step:
        arrays["win_step"] = np.asarray(win_step, dtype=np.int64)
    np.savez_compressed(out / "train_features.npz", **arrays)
    if parts[0]["tokens"] is not None:
        (out / "train_features.tokens.json").write_text(json.dumps(tokens))
    for name, recs in (("train_fast.jsonl", fast), ("train_slow.jsonl", slow)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (out / "window.json").write_text(json.dumps(parts[0]["window"]))
    conf = dict(parts[0]["config"]["config"])
    datasets: list[str] = []
    for p in parts:
        datasets += [d for d in p["config"]["config"].get("datasets", []) if d not in datasets]
    conf["datasets"] = datasets
    per_dataset: dict[str, int] = {}
    for r in fast:
        per_dataset[r["dataset"]] = per_dataset.get(r["dataset"], 0) + 1
    merged = {"config": conf, "merged_from": [str(p["folder"]) for p in parts],
              "train": " + ".join(str(p["config"].get("train", p["folder"])) for p in parts),
              "slices": [p["config"].get("slices") for p in parts],
              "device": parts[0]["config"].get("device", "unknown")}
    (out / "config.json").write_text(json.dumps(merged, indent=2))
    return {"rows": len(fast), "duplicates": dup, "per_dataset": per_dataset, "windows": len(win_row)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the merged work folder (created)")
    ap.add_argument("folders", nargs="+", help="collect work folders, in priority order for duplicate rows")
    args = ap.parse_args(argv)
    try:
        s = merge(args.out, args.folders)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.folders)} folders into {args.out}: {s['rows']} rows ({s['duplicates']} duplicates "
          f"dropped), {s['windows']} windows; per dataset {s['per_dataset']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
