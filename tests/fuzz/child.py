"""`python child.py ARGV...` is `metastate ARGV...` under the limits and faults the harness sets
in the environment, applied before anything of ours is imported:

    METASTATE_TEST_AS     address-space limit in bytes (RLIMIT_AS): a blow-up fails, never swaps
    METASTATE_TEST_CPU    CPU-time limit in seconds (RLIMIT_CPU)
    METASTATE_TEST_KILL   KIND:N, SIGKILL this process at the Nth call of KIND, before it runs:
                          rename  os.rename, os.replace and the atomic swap (renameat2)
                          fsync   os.fsync
                          unlink  os.unlink, os.rmdir (removing a temporary or an old model)
                          write   the write that takes any file past N bytes (RLIMIT_FSIZE with
                                  SIGXFSZ's default action: the kernel ends the process mid-write)
    METASTATE_TEST_COUNT  a file to which the number of calls of each KIND is written at exit
    METASTATE_TEST_NO_EXCHANGE  1: no renameat2 (the two-rename path of macOS and other systems)
    METASTATE_TEST_PEAK   a file to which the peak resident memory (bytes) is written at exit
"""

import atexit
import json
import os
import resource
import signal
import sys

KINDS = {"rename": ("rename", "replace"), "fsync": ("fsync",), "unlink": ("unlink", "rmdir")}


def _limits() -> None:
    for var, limit in (("METASTATE_TEST_AS", resource.RLIMIT_AS), ("METASTATE_TEST_CPU", resource.RLIMIT_CPU)):
        if os.environ.get(var):
            n = int(os.environ[var])
            try:
                resource.setrlimit(limit, (n, n))
            except (ValueError, OSError):  # e.g. macOS refuses some address-space limits
                pass


def _peak() -> int:
    try:  # Linux: this process image's own high-water mark, not the parent's before the exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _faults() -> None:
    kill = os.environ.get("METASTATE_TEST_KILL", "")
    count_file = os.environ.get("METASTATE_TEST_COUNT")
    kind, _, n = kill.partition(":")
    if kind == "write":
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(n), int(n)))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the default ends the process
        return
    counts = dict.fromkeys(KINDS, 0)

    def hit(k):
        counts[k] += 1
        if k == kind and counts[k] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(k, real):
        def call(*args, **kwargs):
            hit(k)
            return real(*args, **kwargs)
        return call

    for k, names in KINDS.items():
        for name in names:
            setattr(os, name, wrap(k, getattr(os, name)))
    import weights.files  # the one swap of folders (models, data directories)

    exchange = (lambda a, b: False) if os.environ.get("METASTATE_TEST_NO_EXCHANGE") else weights.files._exchange
    weights.files._exchange = wrap("rename", exchange)
    if count_file:
        atexit.register(lambda: open(count_file, "w").write(json.dumps(counts)))


if __name__ == "__main__":
    _limits()
    if os.environ.get("METASTATE_TEST_PEAK") and not os.environ.get("METASTATE_TEST_KILL"):
        atexit.register(lambda: open(os.environ["METASTATE_TEST_PEAK"], "w").write(str(_peak())))
    if os.environ.get("METASTATE_TEST_KILL") or os.environ.get("METASTATE_TEST_COUNT") or \
            os.environ.get("METASTATE_TEST_NO_EXCHANGE"):
        _faults()
    from metastate.cli import main

    sys.argv[0] = "metastate"
    sys.exit(main(sys.argv[1:]))
