"""Run `metastate` in a child process under resource limits, and judge how it failed.

A hostile input must end in one line `error: ...` on stderr, exit code 1 or 2, no traceback,
within its time, and under MEMORY of peak resident memory; the address-space limit (AS_LIMIT)
turns a blow-up into a failure of the child instead of an exhausted machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).resolve().with_name("child.py")
MEMORY = 1 << 30          # peak resident memory a hostile input may cost
AS_LIMIT = 2 << 30        # address space of the child (torch alone reserves ~700 MB of it)
TIMEOUT = 60.0


@dataclass
class Result:
    argv: list
    rc: int | None            # None: killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int             # bytes (0 if the child was killed before it could tell)

    def problems(self) -> list[str]:
        """How this run breaks the rules for a refused input (empty when it is a clean refusal)."""
        out = []
        lines = self.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        if self.rc is None:
            out.append(f"no answer within {self.seconds:.0f} s")
        elif self.rc not in (1, 2):
            out.append(f"exit code {self.rc}")
        if len(errors) != 1:
            out.append(f"{len(errors)} 'error:' lines")
        if "Traceback" in self.stderr:
            out.append("a traceback")
        if any("out of memory" in e for e in errors):
            out.append("ran out of memory")
        if self.peak_rss > MEMORY:
            out.append(f"peak memory {self.peak_rss / 2**20:.0f} MiB")
        return out

    def describe(self) -> str:
        return f"metastate {' '.join(map(str, self.argv))}: rc {self.rc}, {self.seconds:.1f} s, " \
               f"{self.peak_rss / 2**20:.0f} MiB\n{self.stderr[-2000:]}"


def environment(cache: Path | None = None, **extra) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TQDM_DISABLE="1", METASTATE_TEST_AS=str(AS_LIMIT),
               METASTATE_TEST_CPU=str(int(TIMEOUT) + 5))
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(argv, *, stdin: bytes | None = b"", close: str | None = None, timeout: float = TIMEOUT,
        env: dict | None = None, cwd=None) -> Result:
    """`metastate ARGV` in a child (tests/fuzz/child.py). stdin: bytes fed to it; close "stdin"
    or "stdout" starts it with that descriptor closed (a shell's `0<&-` / `>&-`)."""
    cmd = [sys.executable, str(CHILD), *(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a)
                                         for a in argv)]
    if close:
        cmd = ["sh", "-c", f'exec "$@" {dict(stdin=0, stdout=1)[close]}>&-', "sh", *cmd]
    with tempfile.TemporaryDirectory() as tmp:
        # the child's own peak, from itself: the rusage of a child counts its parent's memory
        # up to the exec of a fork (or vfork)
        peak = Path(tmp) / "peak"
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                env=dict(env or environment(), METASTATE_TEST_PEAK=str(peak)))
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        seconds = time.monotonic() - start
        peak_rss = int(peak.read_text()) if peak.exists() else 0
    return Result(list(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"), seconds, peak_rss)
