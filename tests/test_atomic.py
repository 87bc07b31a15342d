"""Atomic writes (``io/atomic.py``): the user's file mode, and temporaries of killed runs cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import magnitude_prune, tiny_llama

import llmprune
from llmprune.io.atomic import atomic_folder, atomic_write, remove_stale_temporaries, temp_path
from llmprune.io.save import save_pruned
from llmprune.result import PruneResult


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_checkpoint_files_get_the_umask_mode(tmp_path, umask_022):
    model = tiny_llama()
    keep = magnitude_prune(model)
    result = PruneResult(method="magnitude", sparsity="0.5", options={})
    result.keep_masks.update(keep)
    out = save_pruned(model, None, tmp_path / "out", result=result)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes["model.safetensors"] == oct(0o644)  # safetensors' own writer creates 0600
    assert modes["masks.safetensors"] == oct(0o644)
    assert set(modes.values()) == {oct(0o644)}, modes


def test_atomic_write_gets_the_umask_mode(tmp_path, umask_022):
    def write(tmp: Path) -> None:  # like mkstemp or safetensors: a private file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    path = atomic_write(tmp_path / "f.bin", write)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_go_and_nothing_else(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".llmprune-tmp-{dead}-0123abcd-out"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".llmprune-tmp-{dead}-89abcdef-recipe.yaml"
    stale_file.write_text("half")
    live = temp_path(tmp_path / "other")  # this process: still running
    live.mkdir()
    foreign = [
        tmp_path / ".out.tmp-123456",  # someone else's hidden temporary
        tmp_path / f".llmprune-tmp-{dead}-notahex-out",  # not our pattern
        tmp_path / f"llmprune-tmp-{dead}-0123abcd-out",  # not hidden: not ours
        tmp_path / "notes.txt",
    ]
    for path in foreign:
        path.write_text("keep me")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.is_dir() and all(p.read_text() == "keep me" for p in foreign)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from llmprune.io.atomic import atomic_folder

    with atomic_folder(Path(sys.argv[1])) as staging:
        (staging / "model.safetensors").write_bytes(b"0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: no finally runs
    """
)


def test_a_killed_save_is_cleaned_up_by_the_next_write(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(llmprune.__file__).parents[1])]))
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "out")], env=env)
    assert child.returncode == -signal.SIGKILL
    (left,) = list(tmp_path.iterdir())  # the killed run's full-size temporary folder
    assert left.name.startswith(".llmprune-tmp-") and (left / "model.safetensors").is_file()
    with atomic_folder(tmp_path / "out2") as staging:
        (staging / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out2"]
