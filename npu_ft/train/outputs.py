"""Where a run writes: ``output_dir`` checked before anything is written, file modes that follow the
process umask, whole folders published by rename, and recognising a full disk.

* :func:`check_output_dir` -- ``output_dir`` must not be (or lie inside) the model folder, must not
  be a file (or lie under one), and must be writable (a probe file is created and removed).
* :func:`file_mode` / :func:`dir_mode` / :func:`chmod_like_open` / :func:`fix_modes` -- ``0o666 &
  ~umask`` for files and ``0o777 & ~umask`` for folders, where ``tempfile`` or a library (safetensors
  writes 0600 files) created something more private than ``open`` / ``mkdir`` would.
* :func:`publish_folder` -- move every file of a finished staging folder into ``output_dir``, one
  rename each (weights first, JSON last), then remove the staging folder.
* :func:`is_disk_full` -- an error from writing that means "no space left" (``OSError`` ENOSPC /
  EDQUOT, or the text of a safetensors / torch error that wraps it).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading

__all__ = [
    "OutputDirError",
    "check_output_dir",
    "chmod_like_open",
    "dir_mode",
    "file_mode",
    "fix_modes",
    "is_disk_full",
    "publish_folder",
    "umask",
]

_UMASK_LOCK = threading.Lock()
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122", "storagefull")


class OutputDirError(ValueError):
    """``output_dir`` cannot be used; the message says why (the caller adds file and key)."""


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------
def umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set-and-restore under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a file created with ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a folder created with ``os.mkdir``: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


def chmod_like_open(path: str | os.PathLike) -> None:
    """Give an entry made by ``tempfile`` (0600 / 0700) the mode ``open`` / ``mkdir`` would give it."""
    os.chmod(path, dir_mode() if os.path.isdir(path) else file_mode())


def fix_modes(folder: str | os.PathLike) -> None:
    """:func:`chmod_like_open` on ``folder`` and everything under it (symlinks left alone)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dmode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), fmode)


# ---------------------------------------------------------------------------------------------
# output_dir checks
# ---------------------------------------------------------------------------------------------
def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, model_path: str | os.PathLike | None = None) -> None:
    """Raise :class:`OutputDirError` if training cannot or must not write to ``output_dir``.

    Symlinks are resolved. Nothing is left behind: the write probe is removed again.
    """
    real_out = os.path.realpath(os.path.expanduser(output_dir))
    if model_path is not None and os.path.isdir(os.path.expanduser(str(model_path))):
        real_model = os.path.realpath(os.path.expanduser(str(model_path)))
        if _inside(real_out, real_model):
            where = "is the model folder" if real_out == real_model else f"is inside the model folder {real_model!r}"
            raise OutputDirError(
                f"{output_dir!r} {where} (model_name_or_path): training would overwrite the base weights or mix "
                "its outputs into the model folder; choose an output_dir outside it")
    if os.path.exists(real_out) and not os.path.isdir(real_out):
        raise OutputDirError(f"{output_dir!r} is a file, not a folder")
    existing = real_out
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise OutputDirError(f"{output_dir!r} cannot be created: {existing!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".npu_ft-write-probe-", dir=existing)
    except OSError as exc:
        what = "is not writable" if existing == real_out else f"cannot be created ({existing!r} is not writable)"
        raise OutputDirError(f"{output_dir!r} {what}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


# ---------------------------------------------------------------------------------------------
# publishing
# ---------------------------------------------------------------------------------------------
def publish_folder(staging: str, output_dir: str) -> list[str]:
    """Move the files of ``staging`` into ``output_dir`` (one rename each: weights first, JSON
    last, so a reader never sees a config without its weights; modes as the umask says); returns
    the names moved."""
    fix_modes(staging)
    names = sorted(os.listdir(staging))
    names.sort(key=lambda n: (n.endswith(".json"), n))
    for name in names:
        src, dst = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    shutil.rmtree(staging, ignore_errors=True)
    return names


# ---------------------------------------------------------------------------------------------
# full disk
# ---------------------------------------------------------------------------------------------
def is_disk_full(exc: BaseException, folder: str | None = None) -> bool:
    """Whether ``exc`` (raised while writing into ``folder``) means the disk or quota is full.

    OSError ENOSPC / EDQUOT, or an error whose text carries them (safetensors' ``SafetensorError``
    wraps the OS error). ``torch.save`` only says "file write failed" / "unexpected pos": that counts
    when ``folder`` has less than 1 MiB free.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur).lower()
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
        if folder is not None and any(t in text for t in _TORCH_WRITE_FAILED):
            try:
                return shutil.disk_usage(folder).free < (1 << 20)
            except OSError:
                return False
        cur = cur.__cause__ or cur.__context__
    return False
