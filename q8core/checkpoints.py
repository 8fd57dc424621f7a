"""Checkpoint folders: written atomically, described by a manifest, rotated.

A checkpoint folder holds what the backend wrote (weights, model config, quantizer state), the
tokenizer, ``q8_spec.json`` and, written last, ``q8_checkpoint.json``: backend, task, labels,
step, metrics and the size and SHA-256 of every file. The folder is assembled under a temporary
name and renamed into place, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import Q8Error

MANIFEST_FILE = "q8_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT = "q8bert-checkpoint"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``directory``, on error it
    is removed, so ``directory`` is never seen half-written."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(directory: Path, backend, tokenizer, info: dict[str, Any],
                     extra: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint into ``directory`` (replacing one that is there); ``extra`` adds
    files (the trainer's resume state) before the manifest lists them."""
    with atomic_dir(directory) as tmp:
        backend.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        backend.spec.save(tmp)
        if extra is not None:
            extra(tmp)
        write_manifest(tmp, backend.name, info)
    return Path(directory)


def write_manifest(directory: Path, backend: str, info: dict[str, Any]) -> None:
    """The manifest, last: ``backend`` (the plugin that loads the folder), ``info``, and the size and
    SHA-256 of every file already in ``directory``."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(Path(directory).iterdir()) if p.is_file()}
    manifest = {"format": FORMAT, "version": 1, "backend": backend, **info, "files": files}
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint folder, after checking every listed file's size and hash."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise Q8Error(f"{directory}: no such checkpoint folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Q8Error(f"{directory}: not a complete q8 checkpoint (no {MANIFEST_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise Q8Error(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Q8Error(f"{path}: not a q8 checkpoint manifest")
    for name, meta in manifest.get("files", {}).items():
        if Path(name).name != name:
            raise Q8Error(f"{path}: file name {name!r} points outside the checkpoint")
        file = directory / name
        if not file.is_file():
            raise Q8Error(f"{directory}: checkpoint file {name} is missing")
        if file.stat().st_size != meta.get("size"):
            raise Q8Error(f"{file}: truncated or changed (size {file.stat().st_size}, manifest says {meta.get('size')})")
        if verify and sha256(file) != meta.get("sha256"):
            raise Q8Error(f"{file}: corrupted (SHA-256 differs from the manifest)")
    return manifest


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its best checkpoint, else its newest)."""
    path = Path(path)
    if path.is_file() and (path.parent / MANIFEST_FILE).exists():  # a file of an export: model.onnx
        return path.parent
    if (path / MANIFEST_FILE).exists():
        return path
    state_file = path / TRAINER_STATE_FILE
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Q8Error(f"{state_file}: unreadable ({type(exc).__name__}); "
                          f"pass a checkpoint-N folder instead") from None
        for key in ("best_checkpoint", "last_checkpoint"):
            if state.get(key) and (path / state[key] / MANIFEST_FILE).exists():
                return path / state[key]
    found = list_checkpoints(path) if path.is_dir() else []
    if found:
        return found[-1]
    if not path.exists():
        raise Q8Error(f"{path}: no such checkpoint or run folder")
    raise Q8Error(f"{path}: neither a q8 checkpoint nor a run folder with checkpoints")


def model_source(source: str) -> str:
    """``--model`` naming a q8 run folder: its best checkpoint, a Hugging Face folder that keeps the run's
    fine-tuned task head (QAT can start from an FP32 run this way); any other source unchanged."""
    path = Path(source)
    if path.is_dir() and (path / TRAINER_STATE_FILE).exists() and not (path / MANIFEST_FILE).exists():
        return str(resolve(path))
    return source


def newest_complete(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint of a run whose files match its manifest, and why newer ones were skipped."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir) if Path(run_dir).is_dir() else []):
        try:
            read_manifest(path)
            return path, skipped
        except Q8Error as exc:
            skipped.append(str(exc))
    raise Q8Error(f"{run_dir}: no complete checkpoint to resume from")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders of a run, oldest step first."""
    found = []
    for child in Path(output_dir).iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / MANIFEST_FILE).exists():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def rotate(output_dir: Path, keep: int, protect: set[Path]) -> list[Path]:
    """Delete the oldest checkpoints so at most ``keep`` remain besides those in ``protect``."""
    protect = {Path(p).resolve() for p in protect}
    unprotected = [p for p in list_checkpoints(output_dir) if p.resolve() not in protect]
    doomed = unprotected[:-keep] if keep > 0 else unprotected
    for path in doomed:
        shutil.rmtree(path)
    return doomed
