"""HTTP latency of this tree against another commit's, side by side in one run: python -m bench.versus REV.

Each tree's service runs under its own gunicorn.conf.py, on its own copy of a small backlog (the benchmark's, of
ENTRIES entries, applied before the load), polling every second. wrk then loads each endpoint of each tree in
turn, round after round (A, B, A, B...), paced (about 1,000 requests/s) and saturated, so that a moment of noise
on a shared machine falls on both alike.
The table gives the median p50 and p99 of the rounds, and this tree's over the other's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import http
from bench.data import build_templates, fresh_copy
from bench.serve import service_env, status
from devkit import ROOT, gunicorn, postgres
from devkit.net import free_port, wait_until

PATHS = ("/health", "/api/v1/consistency/status")
ENTRIES = 2_000  # entries each service applies before the load, so that its status has something in it


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """Check out a commit in a temporary worktree, removed at the end."""
    parent = Path(tempfile.mkdtemp(prefix="versus-"))
    folder = parent / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(folder), rev], cwd=ROOT, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=True)
        parent.rmdir()


@contextmanager
def served(server: str, templates: tuple[str, str], tree: Path) -> Iterator[int]:
    """Serve one tree's app on a fresh copy of the backlog, once it has drained it; yield its port."""
    queue_uri, portfolio_uri, names = fresh_copy(server, templates)
    port = free_port()
    env = service_env(queue_uri, portfolio_uri, port, POLLING_INTERVAL="1", PYTHONPATH=str(tree))
    try:
        with gunicorn.running(gunicorn.command(), env, subprocess.DEVNULL, cwd=tree):
            wait_until(lambda: (status(port).get("last_cycle") or {}).get("result") == "ok", 120, f"{tree} to drain")
            yield port
    finally:
        for name in names:
            postgres.drop(server, name)


def rounds(ports: dict[str, int], count: int, seconds: int) -> dict[str, list[http.Load]]:
    """Load each path of each tree in turn, paced then saturated, `count` times; return every load by row."""
    loads: dict[str, list[http.Load]] = {}
    for _ in range(count):
        for path in PATHS:
            for paced in (True, False):
                for tree, port in ports.items():
                    row = f"{tree} {path} {'paced' if paced else 'saturated'}"
                    loads.setdefault(row, []).append(http.wrk(f"http://127.0.0.1:{port}{path}", seconds, paced))
    return loads


def table(loads: dict[str, list[http.Load]], rev: str) -> str:
    """Show each path and load: the other tree's and this one's median p50 and p99, and their ratios."""
    lines = [f"| load | {rev} p50 ms | this p50 ms | ratio | {rev} p99 ms | this p99 ms | ratio | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for path in PATHS:
        for kind in ("paced", "saturated"):
            a, b = loads[f"{rev} {path} {kind}"], loads[f"this {path} {kind}"]
            p50 = [statistics.median(load.p50_ms for load in side) for side in (a, b)]
            p99 = [statistics.median(load.p99_ms for load in side) for side in (a, b)]
            errors = sum(load.errors for load in a + b)
            lines.append(f"| {path} {kind} | {p50[0]:.2f} | {p50[1]:.2f} | {p50[1] / p50[0]:.2f} "
                         f"| {p99[0]:.2f} | {p99[1]:.2f} | {p99[1] / p99[0]:.2f} | {errors} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    """Serve both trees, load them in turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rev", help="the commit to compare with, e.g. a release tag")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of loads (default 5)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each load (default 5)")
    args = parser.parse_args()
    if not http.available():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    server, embedded = postgres.server_uri()
    templates = build_templates(server, ENTRIES)
    try:
        with worktree(args.rev) as other, ExitStack() as stack:
            ports = {args.rev: stack.enter_context(served(server, templates, other)),
                     "this": stack.enter_context(served(server, templates, ROOT))}  # fmt: skip
            print(table(rounds(ports, args.rounds, args.seconds), args.rev))
    finally:
        for template in templates:
            postgres.drop(server, template)
        del embedded


if __name__ == "__main__":
    main()
