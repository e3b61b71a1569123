"""CLI start-up: wall time and peak memory of fresh `crossmodal` processes (issue 12, "A fast CLI").

Runs each command in 5 new interpreters (`python -m retrieval ...`) and prints, side by side, the
median wall time and the median peak RSS of those processes (the kernel's own figure for each
child, from wait4): `--help`, `info`, an in-process `search`, and when the CLI has `serve`, the
same search answered by a running server (started here, on a free port, once its model has
loaded; the server's own memory is not counted). Without `--index`, an index of 200 generated
images is built with the bundled demo model in a temp folder first. The last line printed is JSON.

    python bench/startup.py
    python bench/startup.py --index .demo/index --runs 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from demo_index import build_index, free_port  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
QUERY = "a red circle"
TARGETS = {"help": 0.5, "search_server": 0.5}  # seconds, median


def crossmodal(*args: object) -> list[str]:
    return [sys.executable, "-m", "retrieval", *map(str, args)]


def output_of(*args: object, env: dict | None = None) -> str:
    return subprocess.run(crossmodal(*args), cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def measure(args: list, runs: int, env: dict) -> dict:
    """Median wall seconds and peak RSS (MB) of ``runs`` fresh processes of ``crossmodal ARGS``."""
    seconds, peaks = [], []
    for _ in range(runs):
        with tempfile.TemporaryFile() as errors:
            started = time.perf_counter()
            proc = subprocess.Popen(crossmodal(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not a running total
            seconds.append(time.perf_counter() - started)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                errors.seek(0)
                sys.exit(f"crossmodal {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                         f"{errors.read().decode(errors='replace')}")
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
    return {"seconds": statistics.median(seconds), "peak_rss_mb": statistics.median(peaks), "runs": runs}


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f}s")


def through_server(index: Path, runs: int, env: dict, log: Path) -> dict:
    port = free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen(crossmodal("serve", "--index", index, "--port", port), cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", server)
        return measure(["search", QUERY, "--index", index], runs, env)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="Index to use [default: build one in a temp folder].")
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes per command.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crossmodal-startup-") as scratch:
        scratch = Path(scratch)
        # A private place for server records: this run's searches find this run's server, and no other.
        env = {**os.environ, "CROSSMODAL_RUNTIME_DIR": str(scratch / "runtime")}
        index = (args.index or build_index(scratch, 200, 5, output_of)).resolve()
        commands = output_of("--help", env=env)
        no_server = ["--no-server"] if "--no-server" in output_of("search", "--help", env=env) else []

        rows = {
            "help": ("crossmodal --help", measure(["--help"], args.runs, env)),
            "info": ("crossmodal info", measure(["info", "--index", index], args.runs, env)),
            "search": ("crossmodal search" + (" --no-server" if no_server else ""),
                       measure(["search", QUERY, "--index", index, *no_server], args.runs, env)),
        }
        has_serve = any(line.split()[:1] == ["serve"] for line in commands.splitlines())
        if has_serve:
            try:
                rows["search_server"] = ("crossmodal search (server)",
                                         through_server(index, args.runs, env, scratch / "serve.log"))
            except RuntimeError as exc:
                log = (scratch / "serve.log").read_text(errors="replace")[-2000:]
                print(f"search through a server not measured: {exc}\n{log}", file=sys.stderr)

    where = index if args.index else "200 generated images, crossmodal-demo model (built here, removed)"
    print(f"index: {where}   {args.runs} fresh processes each, medians")
    print(f"{'command':<32}{'wall s':>8}{'peak RSS MB':>13}  target")
    for key, (label, figures) in rows.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else \
            f"<= {target} s  {'met' if figures['seconds'] <= target else 'MISSED'}"
        print(f"{label:<32}{figures['seconds']:>8.3f}{figures['peak_rss_mb']:>13.0f}  {verdict}")
    if not has_serve:
        print("(no `crossmodal serve` command: search through a server not measured)")
    results = {key: figures for key, (_, figures) in rows.items()}
    print(json.dumps({"index": str(index) if args.index else None, "results": results, "targets_seconds": TARGETS}))


if __name__ == "__main__":
    main()
