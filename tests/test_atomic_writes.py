"""Failures that leave nothing behind: a read-only folder, a full disk, and `kill -9` in the middle of a write.

Every case runs the real CLI in a subprocess (`python -m tpas ...`) and then looks at the destination folder: the old
file or no file, never a partial one, and no temp file once the next run is done.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tpas import io as tpas_io
from tpas.io import atomic_write
from tpas.sims import SimsMatrix

ROOT = Path(__file__).resolve().parents[1]
N_QUERIES, N_GALLERY = 40, 60
# In the child: os.replace of the watched output blocks after tearing its temp file in half, so the parent can
# kill -9 the process in the middle of a write (the write is done by the real code; only the rename is held).
_HOLD_WRITE = """
import os, sys, time
from pathlib import Path
target, ready = os.environ["HOLD_TARGET"], os.environ["HOLD_READY"]
_replace = os.replace
def held(src, dst, *a, **k):
    if os.path.abspath(dst) == target:
        size = os.path.getsize(src)
        os.truncate(src, size // 2)
        Path(ready).write_text(str(size))
        time.sleep(120)
    return _replace(src, dst, *a, **k)
os.replace = held
from tpas.cli import main
sys.argv = ["tpas", *sys.argv[1:]]
main()
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **extra}


def _tpas(*args: object, preexec=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpas", *map(str, args)],
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=timeout,
    )


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A score matrix, its query index, and an ensemble config over it (outputs go to tmp_path / 'out')."""
    qids = [f"query-{i:04d}" for i in range(N_QUERIES)]
    gids = [f"gallery-image-{i:05d}" for i in range(N_GALLERY)]
    sims = SimsMatrix(qids, gids, scores=torch.rand(N_QUERIES, N_GALLERY, generator=torch.Generator().manual_seed(0)))
    sims.save(tmp_path / "a.pt")
    (tmp_path / "query_index.txt").write_text("\n".join(qids) + "\n")
    cfg = {"inputs": {"a": "a.pt"}, "fuse": {"method": "iterative", "order": ["a"], "weights": []}}
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    out.mkdir()
    return {"sims": tmp_path / "a.pt", "qi": tmp_path / "query_index.txt", "cfg": tmp_path / "ens.yaml", "out": out}


def _commands(inputs: dict[str, Path], dest: Path) -> dict[str, list[object]]:
    return {
        "ensemble": ["ensemble", "--config", inputs["cfg"], "--out", dest.with_suffix(".pt")],
        "submit": ["submit", inputs["sims"], "--query-index", inputs["qi"], "--out", dest.with_suffix(".txt")],
    }


def _drop_dac_override() -> None:
    """In the child: root ignores file modes unless CAP_DAC_OVERRIDE leaves its capability bounding set."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


@pytest.mark.parametrize("command", ["ensemble", "submit"])
def test_a_read_only_folder_gives_one_line_and_leaves_nothing(command, inputs):
    out = inputs["out"]
    argv = _commands(inputs, out / "result")[command]
    out.chmod(0o555)
    try:
        r = _tpas(*argv, preexec=_drop_dac_override)
    finally:
        out.chmod(0o755)
    _assert_one_line_error(r, str(argv[-1]), "Permission denied")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["ensemble", "submit"])
def test_a_full_disk_gives_one_line_and_keeps_the_old_file(command, inputs):
    """RLIMIT_FSIZE makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    out = inputs["out"]
    argv = _commands(inputs, out / "result")[command]
    dest = Path(argv[-1])
    dest.write_text("the previous result\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = _tpas(*argv, preexec=limit)
    _assert_one_line_error(r, str(dest), "File too large")
    assert dest.read_text() == "the previous result\n"
    assert _leftovers(out) == []


def _kill_while_writing(argv: list[object], dest: Path, tmp: Path) -> None:
    """Start `tpas argv`, wait until its write to `dest` is half done, kill -9 it."""
    ready = tmp / "write-started"
    ready.unlink(missing_ok=True)
    env = _env(HOLD_TARGET=str(dest.resolve()), HOLD_READY=str(ready))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WRITE, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("command", "old"), [("ensemble", True), ("submit", False)], ids=["ensemble-old", "submit-none"]
)
def test_kill_9_while_writing_leaves_the_old_file_or_none_and_the_next_run_cleans_up(command, old, inputs, tmp_path):
    out = inputs["out"]
    argv = _commands(inputs, out / "result")[command]
    dest = Path(argv[-1])
    if old:
        dest.write_text("the previous result\n")
    _kill_while_writing(argv, dest, tmp_path)
    assert (dest.read_text() == "the previous result\n") if old else not dest.exists()
    assert len(_leftovers(out)) == 1  # the killed writer's torn temp file
    r = _tpas(*argv)
    assert r.returncode == 0, r.stderr
    assert _leftovers(out) == []
    if command == "ensemble":
        assert SimsMatrix.load(dest).shape == (N_QUERIES, N_GALLERY)
    else:
        assert len(dest.read_text().splitlines()) == N_QUERIES


def test_kill_9_of_tpas_infer_while_writing_then_the_next_run_succeeds(tmp_path):
    """The same for `tpas infer` (a tiny CLIP over a two-image gallery), whose feature cache also lives beside."""
    from PIL import Image

    from tpas.models.clip import build_open_clip

    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {"image_size": 16, "layers": 1, "width": 64,
           "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
           "layers": 1}}  # fmt: skip
    state = dict(build_open_clip(cfg).state_dict())
    state |= {
        "input_resolution": torch.tensor(16),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    torch.save(state, tmp_path / "clip.pt")
    (tmp_path / "gallery").mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (20, 30), colour).save(tmp_path / "gallery" / f"img{i}.png")
    (tmp_path / "queries.json").write_text(json.dumps(["a man in red", "a woman in blue"]))
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "clip_sims.pt"
    argv = ["infer", "clip", "--checkpoint", tmp_path / "clip.pt", "--images", tmp_path / "gallery", "--queries",
            tmp_path / "queries.json", "--out", dest, "--workers", "0", "--cache-dir", tmp_path / "cache"]  # fmt: skip
    _kill_while_writing(argv, dest, tmp_path)
    assert not dest.exists() and len(_leftovers(out)) == 1
    r = _tpas(*argv)
    assert r.returncode == 0, r.stderr
    assert _leftovers(out) == [] and SimsMatrix.load(dest).shape == (2, 2)


def test_temp_files_of_live_writers_and_other_hosts_are_kept(tmp_path):
    """Only temp files whose writer is gone (same host, pid not running) are removed."""
    live = tmp_path / f".a.pt.{os.getpid()}@{tpas_io._HOST}.abcdefgh.tmp"
    other_host = tmp_path / f".a.pt.1@not-{tpas_io._HOST}.abcdefgh.tmp"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".a.pt.{int(dead_pid.stdout)}@{tpas_io._HOST}.abcdefgh.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for p in (live, other_host, dead, unrelated):
        p.write_text("x")
    atomic_write(tmp_path / "b.txt", lambda tmp: tmp.write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, unrelated.name, "b.txt"])
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~tpas_io._UMASK
