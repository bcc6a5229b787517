"""Bring a ``kvagents train probe`` work folder back from a lent GPU, and unpack it here.

The work folder holds one ``features/<row>.npy`` per question (float32, samples x pooled KV) and ``records.jsonl``;
for 1000 GSM8K rows at n = 8 on qwen2.5-coder-0.5b that is 98 MB, more than a device call returns. ``pack`` writes
the features as float16 in four ``features_<k>.npz`` files (under 16 MiB each) and the records with the trained
probe folder in ``probe_run.tgz``; ``unpack`` rebuilds the work folder (float32 again), so that
``kvagents train probe ... --out DIR`` run here with the same settings resumes with every row done and only trains.

    python bench/pack_probe_work.py pack /tmp/probe.work /tmp/probe "$OUT"
    python bench/pack_probe_work.py pack /tmp/probe.work /tmp/probe "$OUT" --tag .w16   # features recorded with
                                                        # --record window:16 (one pooling per call: size limits)
    python bench/pack_probe_work.py unpack FILES_DIR out/probe.work      # FILES_DIR: what came back
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np


def pack(work: Path, probe: Path, out: Path, parts: int = 4, tag: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"{tag}.npy"  # "<row>.npy" for the mean features, "<row>.w16.npy" for window:16, ...
    stems = (p.name[: -len(suffix)] for p in (work / "features").glob(f"*{suffix}"))
    rows = sorted(int(x) for x in stems if x.isdigit())
    for k in range(parts):
        mine = rows[k::parts]
        if not mine:
            continue
        feats = [np.load(work / "features" / f"{r}{tag}.npy") for r in mine]
        np.savez(out / f"features{tag}_{k}.npz", rows=np.array(mine, dtype=np.int64),
                 counts=np.array([len(f) for f in feats], dtype=np.int64),
                 features=np.concatenate(feats).astype(np.float16))
    with tarfile.open(out / "probe_run.tgz", "w:gz") as tar:
        if (work / "records.jsonl").exists():
            tar.add(work / "records.jsonl", arcname="records.jsonl")
        if probe.is_dir():
            for p in sorted(probe.iterdir()):
                tar.add(p, arcname=f"probe/{p.name}")
    print(f"packed {len(rows)} rows into {out}")


def unpack(files: Path, work: Path) -> None:
    (work / "features").mkdir(parents=True, exist_ok=True)
    n = 0
    for z in sorted(files.glob("features*_*.npz")):
        tag = z.name[len("features"): z.name.rindex("_")]
        d = np.load(z)
        at = 0
        for row, c in zip(d["rows"].tolist(), d["counts"].tolist()):
            np.save(work / "features" / f"{row}{tag}.npy", d["features"][at: at + c].astype(np.float32))
            at += c
            n += 1
    with tarfile.open(files / "probe_run.tgz") as tar:
        for m in tar.getmembers():
            if m.isfile() and not m.name.startswith(("/", "..")):
                data = tar.extractfile(m).read()
                dest = work / m.name if m.name == "records.jsonl" else work.parent / (work.name + ".gpu-" + m.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
    recs = sum(1 for _ in io.StringIO((work / "records.jsonl").read_text()))
    print(f"unpacked {n} feature files and {recs} records into {work}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("work", type=Path)
    p.add_argument("probe", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tag", default="", help="features of another pooling: .w16 (window:16), .last")
    u = sub.add_parser("unpack")
    u.add_argument("files", type=Path)
    u.add_argument("work", type=Path)
    a = ap.parse_args()
    pack(a.work, a.probe, a.out, tag=a.tag) if a.cmd == "pack" else unpack(a.files, a.work)


if __name__ == "__main__":
    main()
