"""The folder ``npu-ft export`` writes: it replaces only a folder it wrote itself, and never in place.

* :func:`check_export_dir` refuses, before any work, an ``export_dir`` that is, contains or lies
  inside a folder the export reads (the base model, an adapter), one that is a file or a link,
  and a non-empty folder that is not a previous npu-ft export or holds files npu-ft did not write.
* :func:`publish` writes the new export into a fresh sibling staging folder, records the files in
  ``npu_ft_export.json`` (the manifest that marks a folder as npu-ft's), then swaps it in with
  renames; the previous export is moved aside and only the files its manifest lists are removed.
  An interrupted export leaves the previous one in place (plus, at worst, a ``.<name>.npu-ft-*``
  sibling). Folders and files get the modes the process umask gives a new file (some writers leave
private 0600 files behind).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["MANIFEST_NAME", "ExportError", "check_export_dir", "publish", "read_manifest"]

MANIFEST_NAME = "npu_ft_export.json"
_WRITTEN_BY = "npu-ft export"

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """A bad export recipe or export folder: the message names the file/key."""


def _files_and_dirs(folder: Path) -> tuple[set[str], set[str], set[str]]:
    """Relative POSIX paths of the regular files, folders and other entries (links, ...) under ``folder``."""
    files, dirs, other = set(), set(), set()
    for root, dirnames, filenames in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in dirnames:
            rel, path = (base / name).as_posix(), Path(root) / name
            (other if path.is_symlink() else dirs).add(rel)
        for name in filenames:
            rel, path = (base / name).as_posix(), Path(root) / name
            (files if path.is_file() and not path.is_symlink() else other).add(rel)
    return files, dirs, other


def read_manifest(folder: Path) -> list[str] | None:
    """The files a previous export wrote into ``folder`` (its manifest), or None when it has none."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable npu-ft export manifest ({exc}); export_dir is left alone: "
                          "choose another export_dir or empty this one yourself") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("written_by") != _WRITTEN_BY or not isinstance(files, list)
            or not all(isinstance(f, str) and _is_plain_relative(f) for f in files)):
        raise ExportError(f"{path}: not an npu-ft export manifest; export_dir is left alone: choose another "
                          "export_dir or empty this one yourself")
    return files


def _is_plain_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and name == path.as_posix()


def _foreign_entries(folder: Path, owned_files: Iterable[str]) -> list[str]:
    """Entries under ``folder`` that a previous export did not write (its manifest does not list them)."""
    owned = set(owned_files) | {MANIFEST_NAME}
    owned_dirs = {parent.as_posix() for name in owned for parent in PurePosixPath(name).parents} - {"."}
    files, dirs, other = _files_and_dirs(folder)
    return sorted((files - owned) | (dirs - owned_dirs) | other)


def check_export_dir(export_dir: Path, where: str, read_folders: Mapping[str, Iterable[str]]) -> None:
    """Refuse an ``export_dir`` the export could damage (see the module docstring).

    ``where`` names the recipe (file or command line); ``read_folders`` maps a key
    (``model_name_or_path``, ``adapter_name_or_path``) to the folders the export reads for it.
    """
    key = f"{where}: key 'export_dir'"
    if export_dir.is_symlink():
        raise ExportError(f"{key}: {str(export_dir)!r} is a symbolic link; give the real folder")
    target = Path(os.path.realpath(export_dir))
    for name, folders in read_folders.items():
        for folder in folders:
            real = Path(os.path.realpath(folder))
            if target == real:
                problem = f"is the {name} folder; the export would replace what it reads"
            elif real.is_relative_to(target):
                problem = f"contains the {name} folder {str(folder)!r}; the export would replace it"
            elif target.is_relative_to(real):
                problem = f"lies inside the {name} folder {str(folder)!r}; write the export elsewhere"
            else:
                continue
            raise ExportError(f"{key}: {str(export_dir)!r} {problem}")
    if not export_dir.exists():
        return
    if not export_dir.is_dir():
        raise ExportError(f"{key}: {str(export_dir)!r} is a file, not a folder")
    if not any(export_dir.iterdir()):
        return
    owned = read_manifest(export_dir)
    if owned is None:
        raise ExportError(f"{key}: {str(export_dir)!r} is not empty and is not an npu-ft export (no "
                          f"{MANIFEST_NAME}); npu-ft replaces only its own exports: choose a new or empty folder")
    foreign = _foreign_entries(export_dir, owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"{key}: {str(export_dir)!r} is a previous npu-ft export but also holds what npu-ft did "
                          f"not write ({shown}); move that out or choose another export_dir")


def _sibling(folder: Path, kind: str) -> Path:
    return folder.parent / f".{folder.name}.npu-ft-{kind}-{uuid.uuid4().hex[:12]}"


def _remove_owned(folder: Path, owned_files: Iterable[str]) -> None:
    """Delete the listed files (and the manifest) under ``folder``, then the folders they emptied.
    Anything else is kept, and so is ``folder`` itself when something else is in it."""
    owned = set(owned_files) | {MANIFEST_NAME}
    for name in owned:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    parents = {parent for name in owned for parent in PurePosixPath(name).parents} - {PurePosixPath(".")}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # gone, or holds something else
            (folder / parent).rmdir()
    with contextlib.suppress(OSError):  # gone, or holds something else
        folder.rmdir()
    if folder.exists():
        logger.warning("kept %s: it holds files npu-ft did not write", folder)


def publish(export_dir: Path, write: Callable[[Path], None], where: str,
            read_folders: Mapping[str, Iterable[str]], info: Mapping[str, Any]) -> Path:
    """Write an export with ``write(folder)`` into a staging sibling of ``export_dir`` and swap it in.

    ``info`` goes into the manifest next to the file list. ``export_dir`` is checked again (as in
    :func:`check_export_dir`) right before the swap.
    """
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(export_dir, "staging")
    staging.mkdir()  # the process umask applies (tempfile.mkdtemp would make it private: 0700)
    try:
        write(staging)
        _apply_umask(staging)
        files, _, _ = _files_and_dirs(staging)
        manifest = {"written_by": _WRITTEN_BY, **info, "files": sorted(files - {MANIFEST_NAME})}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        check_export_dir(export_dir, where, read_folders)
        _swap_in(staging, export_dir)
    except BaseException:
        _remove_owned(staging, _files_and_dirs(staging)[0])  # a fresh folder: everything in it is ours
        raise
    return export_dir


def _apply_umask(folder: Path) -> None:
    """Give what ``write`` produced the modes of files a user creates (0666 / 0777 minus the umask):
    some writers stage through ``tempfile`` and leave private 0600 files behind."""
    umask = os.umask(0o022)
    os.umask(umask)
    files, dirs, _ = _files_and_dirs(folder)
    for name in files:
        os.chmod(folder / name, 0o666 & ~umask)
    for name in dirs:
        os.chmod(folder / name, 0o777 & ~umask)


def _swap_in(staging: Path, export_dir: Path) -> None:
    owned = read_manifest(export_dir) if export_dir.is_dir() else None
    if owned is None:  # no folder, or an empty one: a rename replaces it
        os.replace(staging, export_dir)
        return
    aside = _sibling(export_dir, "old")
    os.rename(export_dir, aside)
    try:
        os.rename(staging, export_dir)
    except BaseException:
        os.rename(aside, export_dir)
        raise
    _remove_owned(aside, owned)
