"""Atomic writes: a reader (or a crash) sees the old file or folder or the whole new one, never half.

Every temporary llmprune creates beside a target is named ``.llmprune-tmp-<pid>-<random>-<name>``, so
that what a killed run left behind is recognisable: the next atomic write into the same folder removes
the temporaries whose process is gone (:func:`remove_stale_temporaries`), and nothing else. Written
files get the mode the user's umask gives any new file (``safetensors`` and ``mkstemp`` create 0600).

A leaf module: it imports nothing of llmprune, so every writer (checkpoints, progress, recipes,
reports) can use it without an import cycle.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_PREFIX = ".llmprune-tmp-"
_TEMP_NAME = re.compile(r"^\.llmprune-tmp-(\d+)-[0-9a-f]{8}-")


def temp_path(target: Path, tag: str = "") -> Path:
    """A fresh temporary sibling of ``target`` that names this process (see the module docstring)."""
    return target.parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{tag}{target.name}"


def default_file_mode() -> int:
    """The mode a new file gets from the user's umask (0644 under umask 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it straight back)
    os.umask(mask)
    return 0o666 & ~mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: assume alive, never delete what may be in use
    return True


def _own(entry: os.DirEntry) -> bool:
    """Written by this user (in a shared folder such as /tmp, other users' files are theirs to clean)."""
    try:
        return not hasattr(os, "getuid") or entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove llmprune temporaries in ``folder`` whose owning process has exited; return what went.

    Only names matching ``.llmprune-tmp-<pid>-<8 hex>-…`` owned by this user are considered, so a file
    llmprune did not write is never touched, and a temporary of a running process (this one included)
    is kept.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or _process_alive(int(m.group(1))) or not _own(entry):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by a killed llmprune run: %s", path, exc)
            continue
        log.info("removed %s, left by a killed llmprune run", path)
        removed.append(path)
    return removed


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders have no fd."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_tree(root: Path, durable: bool) -> None:
    """Give every file the umask mode and (``durable``) flush files and folders to disk."""
    mode = default_file_mode()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                os.chmod(path, mode)
                if durable:
                    fsync_file(path)
        if durable:
            fsync_dir(Path(folder))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    ``durable`` fsyncs the file first (what survives a power cut, not only a kill). On failure the
    temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success swap it in for ``target``, on failure delete it.

    The old folder is renamed aside before the new one is renamed in, and renamed back if that fails,
    so ``target`` always holds either the complete old contents or the complete new ones. Whether
    ``target`` may be replaced at all is the caller's decision, taken before calling this.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    staging = temp_path(target)
    staging.mkdir()  # not mkdtemp: that would leave the final folder with mode 0700
    try:
        yield staging
        _finish_tree(staging, durable=True)
        if target.exists():
            old = temp_path(target, "old-")
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no copy, and ``src`` keeps its file until ``dst`` is safe), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
