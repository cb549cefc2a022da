"""kill -9 at the exact calls of a save, not at a time: the child (child.py) kills itself at the
Nth rename, fsync or unlink, or the kernel ends it at the write that takes a file past N bytes.

After each kill the destination holds the old model (or state file) or the new one, whole; the
next save into its folder removes every leftover and puts back an old model that a two-rename
swap (macOS, file systems without renameat2) left aside. For convert, grow and prepare-data
(each with both swaps) and chat's /save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fuzz import harness
from fuzz.corpus import CHAT, DEFAULT, words
from weights import atomic_write

KINDS = ("rename", "fsync", "unlink")
WRITE_LIMITS = (0, 1, 100, 4096, 65536, 300_000)


def contents(p: Path):
    """A model folder's files or a file's bytes; None if nothing is there."""
    if p.is_dir():
        return {f.name: f.read_bytes() for f in sorted(p.iterdir())}
    return p.read_bytes() if p.exists() else None


def destination(name: str, root: Path) -> Path:
    return root / {"save": "s.state", "prepare-data": "d"}.get(name.removesuffix("-two-renames"), "m")


def old_contents(name: str, base):
    return contents({"save": base.state, "prepare-data": base.data}.get(name.removesuffix("-two-renames"), base.model))


def scenario(name: str, base, root: Path, text: Path):
    """(argv making `dest` from its old to its new contents, stdin, env extras) for a folder `root`;
    text: the new text prepare-data tokenizes (one file for every run: meta.json names it)."""
    dest = destination(name, root)
    if name == "save":
        shutil.copy(base.state, dest)
        return ["chat", "--model", base.model, *CHAT], f"To be\n/save {dest}\n/quit\n".encode(), {}
    extra = {"METASTATE_TEST_NO_EXCHANGE": 1} if name.endswith("two-renames") else {}
    if name.startswith("prepare-data"):
        shutil.copytree(base.data, dest)
        return ["prepare-data", text, "--out", dest, "--tokenizer", DEFAULT / "tokenizer.model", "--shard-tokens",
                200, "--val-fraction", "0.2"], b"", extra
    shutil.copytree(base.model, dest)
    if name.startswith("convert"):
        quantize = ["--quantize", 8] if name == "convert-quantize" else []  # MLX's writer, built beside as well
        return ["convert", base.other, "--out", dest, "--force", *quantize], b"", extra
    return ["grow", base.other, "--out", dest, "--force", "--param-tokens", 32], b"", extra


@pytest.mark.parametrize("name", ["convert", "convert-two-renames", "convert-quantize", "grow", "grow-two-renames",
                                  "save", "prepare-data", "prepare-data-two-renames"])
def test_kill_at_every_rename_fsync_unlink_and_write(base, tmp_path, name):
    if name == "convert-quantize":
        pytest.importorskip("mlx.core")
    env = harness.environment(tmp_path / "cache")
    text = tmp_path / "new.txt"
    text.write_text(words(1, 40))

    def run(folder: str, **faults):
        root = tmp_path / folder
        root.mkdir()
        argv, stdin, extra = scenario(name, base, root, text)
        return root, harness.run(argv, stdin=stdin, env=dict(env, **{k: str(v) for k, v in (extra | faults).items()}))

    old = old_contents(name, base)
    ref, result = run("reference", METASTATE_TEST_COUNT=tmp_path / "counts.json")
    assert result.rc == 0 and "error" not in result.stderr, result.describe()
    new = contents(destination(name, ref))
    assert new != old
    counts = json.loads((tmp_path / "counts.json").read_text())
    points = [f"{k}:{n}" for k in KINDS for n in range(1, counts[k] + 1)] + [f"write:{n}" for n in WRITE_LIMITS]
    assert counts["rename"] and counts["fsync"] and len(points) >= 10, counts

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda p: (p, *run(p.replace(":", "-"), METASTATE_TEST_KILL=p)), points))
    failures = []
    for point, root, result in runs:
        dest = destination(name, root)
        killed = result.rc in (-signal.SIGKILL, -signal.SIGXFSZ)
        if not killed and not (point.startswith("write:") and result.rc == 0):
            failures.append(f"{point}: not killed: {result.describe()}")
            continue
        now = contents(dest)
        aside = [p.name for p in root.iterdir() if p.name.startswith(f".{dest.name}.old-")]
        if now not in (old, new) and not (now is None and aside and name.endswith("two-renames")):
            failures.append(f"{point}: the destination holds neither the old nor the new contents "
                            f"(files: {sorted(os.listdir(root))})")
        atomic_write(root / "next", lambda tmp: Path(tmp).write_bytes(b"x"))  # the next save into the folder
        if contents(dest) not in (old, new):
            failures.append(f"{point}: after the next save, the destination holds neither old nor new")
        left = sorted(p for p in os.listdir(root) if p.startswith("."))
        if left:
            failures.append(f"{point}: leftovers after the next save: {left}")
    assert sum(r.rc != 0 for _, _, r in runs) >= len(points) - len(WRITE_LIMITS), "too few kills happened"
    assert not failures, f"{name}: " + "\n".join(failures)
