"""Files as a hostile user may hand them over, and the leftovers of interrupted saves.

- `open_regular`: only regular files are read (a FIFO would block forever, a device never end);
- `parse_json`: standard JSON only (no NaN or Infinity), nested at most MAX_JSON_DEPTH deep;
- `check_memory`: a size checked against what this process may hold, before it is allocated;
- temporary names beside a destination (`temp_path`), locked while their save runs, and
  `clean_leftovers`: what a killed save left in a folder is removed (an unlocked `.NAME.tmp-*`)
  or put back (an old model moved aside to `.NAME.old-*` with nothing at NAME);
- `move_into_place`: a folder built beside its destination swapped in whole (a model, a
  prepared data directory), so an interruption leaves the old one or the new one, never half.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

from metastate_core.errors import MetaStateError

MAX_JSON_DEPTH = 64  # config.json needs 3 levels; Python's parser overflows its stack near 1000
NAME_MAX = 255       # bytes in one file name (Linux, macOS)
_TOKEN = 8           # hex digits of a temporary name
_SUFFIX_MAX = 16     # a longer "suffix" is part of a name, not an extension a writer insists on
_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)-[0-9a-f]{8}(\.[^.]*)?", re.S)


class WeightsError(MetaStateError, ValueError):
    """A weight file or model directory that cannot be read or written as asked."""


# -- reading ---------------------------------------------------------------------------------

def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(path, what: str = "file"):
    """`path` (symlinks followed) opened for binary reading if it is a regular file; WeightsError
    at once otherwise: a FIFO is opened without waiting for a writer, then refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise WeightsError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise WeightsError(f"cannot read {what} {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise WeightsError(f"{what} {path} is {kind_of(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_text(path, what: str = "file") -> str:
    with open_regular(path, what) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def parse_json(text: str | bytes, where: str):
    """JSON as the standard has it, nested at most MAX_JSON_DEPTH deep; WeightsError naming
    `where` otherwise. NaN, Infinity and numbers beyond float range (1e999) are refused: what
    this library writes back or prints as JSON must stay JSON."""
    try:
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise WeightsError(f"malformed {where}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the refusals above
        raise WeightsError(f"malformed {where}: not valid JSON ({e})") from None
    check_depth(data, where)
    return data


def check_depth(data, where: str) -> None:
    """WeightsError if parsed JSON (or TOML) nests deeper than MAX_JSON_DEPTH: code that walks
    it recursively (copy.deepcopy, json.dumps, ==) must not overflow the stack."""
    level, depth = [data], 0
    while level := [x for x in level if isinstance(x, (dict, list))]:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise WeightsError(f"malformed {where}: nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x)]


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is beyond the range of a float")
    return value


# -- memory ----------------------------------------------------------------------------------

def memory_limit() -> int | None:
    """Bytes this process may hold: the machine's memory, or less under an rlimit; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # Windows
        pass
    try:
        import resource

        limits += [s for s in (resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_DATA)[0])
                   if s != resource.RLIM_INFINITY]
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    return min(limits, default=None)


def available_memory() -> int | None:
    """Bytes this process can still take without swapping or its cgroup's OOM killer: Linux's
    MemAvailable, less where a cgroup (a container's --memory) leaves less; None where unknown."""
    free = []
    try:
        with open("/proc/meminfo", "rb") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith(b"MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free()
    if cgroup is not None:
        free.append(cgroup)
    return min(free, default=None)


def _cgroup_free(cgroup_file: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit less the usage of this process's cgroup (v2, or v1's memory controller),
    read where /proc/self/cgroup points or at the hierarchy's root (a container's view); None
    without a limit."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":
            root, limit, usage = mount, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit, usage = mount / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in (root / path.lstrip("/"), root):
            try:
                text = (folder / limit).read_text().strip()
                if text != "max" and int(text) < 2**60:  # v1 writes "no limit" as about 2^63
                    return int(text) - int((folder / usage).read_text())
                break
            except (OSError, ValueError):
                continue
    return None


def check_memory(nbytes: int, what: str) -> None:
    """WeightsError, before anything is allocated, when `what` needs `nbytes` of memory and that
    is more than this process may hold."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise WeightsError(f"{what} needs about {nbytes / 2**30:,.1f} GiB of memory, more than the "
                           f"{limit / 2**30:,.1f} GiB available here")


# -- temporary names and leftovers -----------------------------------------------------------

def _stem(name: str, tag: str, suffix: str) -> str:
    """`name`, shortened (in bytes) so that ".NAME.TAG-XXXXXXXX" + suffix is a valid file name."""
    room = NAME_MAX - len(f"..{tag}-") - _TOKEN - len(os.fsencode(suffix))
    return os.fsdecode(os.fsencode(name)[:room])


def temp_path(path: Path, token: str, tag: str = "tmp", suffix: str = "") -> Path:
    """The hidden sibling ".NAME.TAG-TOKEN" + suffix of `path` (NAME shortened to fit)."""
    suffix = suffix if len(os.fsencode(suffix)) <= _SUFFIX_MAX else ""
    return path.with_name(f".{_stem(path.name, tag, suffix)}.{tag}-{token}{suffix}")


def fresh_temp(path: Path, suffix: str, create) -> tuple[Path, int | None]:
    """A new temporary path beside `path`, made by create(p) (which must raise FileExistsError
    if p exists), and a lock held on it until the caller closes it (None where there are no
    locks): the lock tells `clean_leftovers` in other processes that this save is alive."""
    for _ in range(100):
        tmp = temp_path(path, secrets.token_hex(_TOKEN // 2), suffix=suffix)
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp, lock(tmp)
    raise FileExistsError(f"no free temporary name beside {path}")


def lock(path: Path) -> int | None:
    """A descriptor of `path` holding an exclusive lock (the kernel drops it when the process
    ends, however it ends), or None where locks are missing or someone else holds one."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def clean_leftovers(path: Path) -> None:
    """Before a save to `path`: remove the temporaries that killed saves left beside it (any
    name), and put an old model moved aside (".NAME.old-*") back where nothing took its place.
    An entry locked by a live save, or not of our making, is left alone. Best effort: a
    failure here never stops the save."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    room = len(os.fsencode(_stem("x" * NAME_MAX, "old", "")))
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        if not m or entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
            continue
        stem, tag = m.group(1), m.group(2)
        target = None
        if tag == "old":  # a model moved aside by a two-rename swap; its own name, if it can be known
            if entry.is_file() or m.group(3):
                continue
            if stem == _stem(path.name, "old", ""):
                target = path
            elif len(os.fsencode(stem)) < room:
                target = path.parent / stem
            else:
                continue
        fd = lock(Path(entry.path))
        if fd is None:
            continue
        try:
            if target is not None and not os.path.lexists(target):
                os.rename(entry.path, target)
            elif entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


# -- swapping a finished folder into place ---------------------------------------------------

def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename tmp to path; if path exists, swap atomically where the OS can, else via a sibling."""
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
    else:
        # Two renames: an interruption between them leaves the old folder at `old`, never half
        # (and the next save puts it back); it is locked while aside, so no other save does.
        old, held = temp_path(path, tmp.name[-_TOKEN:], "old"), lock(path)
        try:
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # the old folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            release(held)
    fsync_dir(path.parent)


def build_beside(path: Path, fill, error):
    """Build a folder with fill(tmp) in a hidden sibling of `path`, fsync it, then swap it in
    whole: an interruption (an error, a full disk, kill -9) leaves the old folder or the new
    one, never half. An OSError becomes error(e) (the caller's one-line error type). Returns
    what fill returned."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        # os.mkdir's mode, not mkdtemp's owner-only one: the result is an ordinary folder
        tmp, held = fresh_temp(path, "", lambda p: os.mkdir(p, 0o777))
    except OSError as e:
        raise error(e) from e
    try:
        result = fill(tmp)
        fsync_dir(tmp)
        move_into_place(tmp, path)
        return result
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder (if any) is untouched
        if isinstance(e, OSError):
            raise error(e) from e
        raise
    finally:
        release(held)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))
