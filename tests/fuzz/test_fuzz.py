"""Hostile inputs (corpus.py), each run as `metastate` in a child under resource limits
(harness.py): refused in one line, within time and memory, leaving the files as they were.

METASTATE_FUZZ_SEED picks another corpus (default 0); a failure names the seed and the cases.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from fuzz import harness
from fuzz.corpus import corpus, snapshot

SEED = int(os.environ.get("METASTATE_FUZZ_SEED", "0"))
WORKERS = 2


def verdict(case, result, before) -> list[str]:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if case.ok_if is not None and result.rc == 0 and not errors and case.ok_if():
        problems = []
    elif case.expect == "refused":
        problems = result.problems()
    else:  # "chat": the command's error, then on; "ok": no error at all
        problems = [p for p in result.problems() if not p.startswith(("exit code", "0 "))]
        if result.rc != 0:
            problems.append(f"exit code {result.rc}")
        if len(errors) != (case.expect == "chat"):
            problems.append(f"{len(errors)} 'error:' lines")
        if case.check is not None and (note := case.check(case)) is not True:
            problems.append(f"check: {note}")
    after = snapshot(case.dir)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in case.writes)
    if changed:
        problems.append(f"files changed: {changed[:5]}")
    return problems


def test_hostile_inputs(base, tmp_path):
    (tmp_path / "cases").mkdir()
    cases = corpus(tmp_path / "cases", base, SEED)
    assert len(cases) >= 200, len(cases)
    before = [snapshot(c.dir) for c in cases]
    base_before = snapshot(base.model.parent)
    env = harness.environment(tmp_path / "cache")
    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda c: harness.run(c.argv, stdin=c.stdin, close=c.close, env=env, cwd=c.dir),
                                cases))
    failures = [f"{c.dir.name}: {', '.join(p)}\n  {r.describe()}" for c, r, b in zip(cases, results, before)
                if (p := verdict(c, r, b))]
    assert snapshot(base.model.parent) == base_before
    slowest = max(results, key=lambda r: r.seconds)
    print(f"{len(cases)} hostile inputs (seed {SEED}) in {time.monotonic() - start:.0f} s; slowest "
          f"{slowest.seconds:.1f} s, most memory {max(r.peak_rss for r in results) / 2**20:.0f} MiB")
    assert not failures, f"seed {SEED}: {len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:25])
