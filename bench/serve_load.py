"""Load on a real `crossmodal serve`: latency and throughput per kind of request, beside in-process search.

Starts `python -m retrieval serve` on a free port (an index of 300 generated images built with the
bundled demo model in a temp folder first, unless `--index` names one), then, through keep-alive
`http.client` connections (one per client thread):

1. warm-up: a few queries of each kind, not counted;
2. thumbnails, 1 client: every image's thumbnail once with an empty cache ("cold": made on the
   request), then the same URLs again ("cached");
3. mixed load: `--clients` threads for `--seconds`, each looping over a seeded mix of text queries
   (captions of the corpus), image uploads (files of the corpus), "more like this" (ids from earlier
   hits) and thumbnails of earlier hits;
4. text only, 1 client, for `--single-seconds`: the warm text query latency, each text also asked
   in this process (`Searcher.open(index).answer_text(q, to="image", k=24)`), the two alternating
   query by query so that both see the same load from the rest of the machine. Its queries/s is
   1 / mean latency (the time in-process queries took is left out).

Any non-200 answer or exception counts as an error (503s are also counted apart). The server's own
split of each answer (`timings_ms`: encode, search, catalog) and its `/metrics` are summarised to show
where the time goes. The server is stopped with SIGINT and must exit 0. The last line printed is JSON.

    python bench/serve_load.py
    python bench/serve_load.py --index .demo/index --clients 8 --seconds 30 --workers 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from demo_index import build_index, free_port  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
K = 24
KINDS = ("text", "image", "similar", "thumb")
SEARCH_KINDS = ("text", "image", "similar")
STAGES = ("encode", "search", "catalog")
CLIP_BACK_QPS = 20.0  # clip-retrieval README, "Clip back: Benchmark and monitoring": ~50 ms, ~20 query/s
TARGETS = {"ratio_server_to_in_process": 1.2, "queries_per_s": CLIP_BACK_QPS, "errors": 0}


# -- the server ------------------------------------------------------------------------------------
def crossmodal(*args: object) -> list[str]:
    return [sys.executable, "-m", "retrieval", *map(str, args)]


def run_cli(*args: object) -> None:
    done = subprocess.run(crossmodal(*args), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"crossmodal {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def start_server(index: Path, port: int, scratch: Path, workers: int | None, log) -> subprocess.Popen:
    args = ["serve", "--index", index, "--port", port, "--cache-dir", scratch / "thumbs"]
    if workers is not None:
        args += ["--workers", workers]
    env = {**os.environ, "CROSSMODAL_RUNTIME_DIR": str(scratch / "runtime")}
    return subprocess.Popen(crossmodal(*args), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return time.monotonic() - started
            conn.close()
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from /healthz within {timeout:.0f}s")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        return -9


# -- the client ------------------------------------------------------------------------------------
@dataclass
class Sample:
    kind: str
    status: int  # 0: an exception, no answer
    seconds: float
    timings: dict | None = None  # the server's timings_ms of a search answer


@dataclass
class Corpus:
    index_name: str
    texts: list[str]
    images: list[dict]  # {"id", "thumb", "path"}
    uploads: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # image id -> (file name, bytes)


class Client:
    """One keep-alive connection; every request is timed from send to the last byte of the body."""

    def __init__(self, port: int, samples: list[Sample]):
        self.port, self.samples = port, samples
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, kind: str, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, record: bool = True) -> dict | None:
        """The JSON answer (or {} for a thumbnail) when it is a 200, else None; recorded as a Sample."""
        started = time.perf_counter()
        status, data = 0, b""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            data = response.read()
            status = response.status
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()  # a fresh connection for the next request
        seconds = time.perf_counter() - started
        answer = None
        if status == 200:
            answer = json.loads(data) if kind != "thumb" else {}
        if record:
            self.samples.append(Sample(kind, status, seconds, (answer or {}).get("timings_ms")))
        return answer

    def text(self, corpus: Corpus, text: str) -> dict | None:
        body = json.dumps({"index": corpus.index_name, "text": text, "k": K}).encode()
        return self.request("text", "POST", "/api/search", body, {"Content-Type": "application/json"})

    def image(self, corpus: Corpus, image_id: int) -> dict | None:
        name, data = corpus.uploads[image_id]
        boundary = uuid.uuid4().hex
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode()
                 for key, value in (("index", corpus.index_name), ("to", "image"), ("k", K))]
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("image", "POST", "/api/search", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def similar(self, corpus: Corpus, item_id: int) -> dict | None:
        return self.request("similar", "GET", f"/api/items/{item_id}/similar?k={K}&index={corpus.index_name}")

    def thumb(self, url: str) -> dict | None:
        return self.request("thumb", "GET", url)


def discover(port: int) -> Corpus:
    """The served index's images (id, thumbnail URL, file) and captions, read through the API."""
    client = Client(port, [])
    listed = client.request("indexes", "GET", "/api/indexes", record=False)
    if listed is None:
        sys.exit("GET /api/indexes failed")
    name = listed["indexes"][0]["name"]
    images, texts, offset = {}, set(), 0
    while offset <= 10_000 - 200:  # page through every image, 200 at a time
        body = json.dumps({"index": name, "text": "a shape", "to": "image", "k": 200, "offset": offset}).encode()
        answer = client.request("page", "POST", "/api/search", body, {"Content-Type": "application/json"},
                                record=False)
        if answer is None:
            sys.exit("listing the index's images through /api/search failed")
        for hit in answer["hits"]:
            if hit["kind"] == "image" and hit["thumb"]:
                path = Path(hit["root"]) / hit["path"] if hit["root"] else None
                images[hit["id"]] = {"id": hit["id"], "thumb": hit["thumb"], "path": path}
            texts.update(hit["captions"])
        if not answer["has_more"]:
            break
        offset += 200
    client.close()
    if not images or not texts:
        sys.exit("the index has no local images with captions: nothing to load it with")
    corpus = Corpus(name, sorted(texts), [images[i] for i in sorted(images)])
    for image in corpus.images:
        if image["path"] is not None and image["path"].is_file():
            corpus.uploads[image["id"]] = (image["path"].name, image["path"].read_bytes())
    return corpus


def hits_of(answer: dict | None) -> list[dict]:
    return answer["hits"] if answer else []


def warm_up(port: int, corpus: Corpus, rng: np.random.Generator, rounds: int) -> None:
    client = Client(port, [])
    uploads = sorted(corpus.uploads)
    for _ in range(rounds):
        client.text(corpus, corpus.texts[rng.integers(len(corpus.texts))])
        client.image(corpus, uploads[rng.integers(len(uploads))])
        client.similar(corpus, corpus.images[rng.integers(len(corpus.images))]["id"])
    client.close()


def thumbnail_passes(port: int, corpus: Corpus) -> tuple[list[Sample], list[Sample]]:
    """Every image's thumbnail with an empty cache, then again from the cache."""
    passes = []
    for _ in range(2):
        samples: list[Sample] = []
        client = Client(port, samples)
        for image in corpus.images:
            client.thumb(image["thumb"])
        client.close()
        passes.append(samples)
    return passes[0], passes[1]


def mixed_load(port: int, corpus: Corpus, clients: int, seconds: float, seed: int, mix: dict[str, float]
               ) -> tuple[list[Sample], float]:
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = np.array([mix[k] for k in kinds]) / sum(mix[k] for k in kinds)
    uploads = sorted(corpus.uploads)
    per_thread: list[list[Sample]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def work(n: int) -> None:
        rng = np.random.default_rng([seed, n])
        client = Client(port, per_thread[n])
        seen_ids = [image["id"] for image in corpus.images[:K]]  # until this client has hits of its own
        thumbs = [image["thumb"] for image in corpus.images[:K]]
        start.wait()
        while time.perf_counter() < deadline[0]:
            kind = kinds[rng.choice(len(kinds), p=weights)]
            if kind == "text":
                answer = client.text(corpus, corpus.texts[rng.integers(len(corpus.texts))])
            elif kind == "image":
                answer = client.image(corpus, uploads[rng.integers(len(uploads))])
            elif kind == "similar":
                answer = client.similar(corpus, seen_ids[rng.integers(len(seen_ids))])
            else:
                client.thumb(thumbs[rng.integers(len(thumbs))])
                continue
            hits = hits_of(answer)
            if hits:
                seen_ids = [h["id"] for h in hits]
                thumbs = [h["thumb"] for h in hits if h["thumb"]] or thumbs
        client.close()

    threads = [threading.Thread(target=work, args=(n,), name=f"load-{n}") for n in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return [s for samples in per_thread for s in samples], time.perf_counter() - began


def text_only(port: int, corpus: Corpus, index: Path, seconds: float, seed: int, warm: int
              ) -> tuple[list[Sample], dict, float]:
    """One client, text queries one after another, each asked of the server and of a Searcher in this process.

    The two alternate query by query (which goes first alternates too), so both see the same load from
    whatever else runs on the machine; the server is idle while this process encodes, and the other
    way round. Returns the server's samples, the in-process figures, and the seconds the HTTP queries took.
    """
    from retrieval.searcher import Searcher  # the benchmark's client side needs none of it

    rng = np.random.default_rng([seed, 1000])
    order = [corpus.texts[i] for i in rng.permutation(len(corpus.texts))]
    samples: list[Sample] = []
    client = Client(port, samples)
    started = time.perf_counter()
    with Searcher.open(index, read_only=True) as searcher:
        for text in order[:warm]:
            searcher.answer_text(text, to="image", k=K)
            client.request("text", "POST", "/api/search", json.dumps({"index": corpus.index_name, "text": text,
                                                                       "k": K}).encode(),
                           {"Content-Type": "application/json"}, record=False)
        opened = time.perf_counter() - started
        local, stages = [], defaultdict(list)
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            text = order[len(local) % len(order)]
            for turn in ((0, 1) if len(local) % 2 == 0 else (1, 0)):
                if turn == 0:
                    client.text(corpus, text)
                    continue
                then = time.perf_counter()
                answer = searcher.answer_text(text, to="image", k=K)
                local.append(time.perf_counter() - then)
                for stage, value in answer.timings.items():
                    stages[stage].append(value * 1000)
    client.close()
    figures = {"count": len(local), "median_ms": float(np.median(local) * 1000),
               "p95_ms": float(np.percentile(local, 95) * 1000), "open_and_warm_s": round(opened, 3),
               "stages_median_ms": {s: float(np.median(v)) for s, v in stages.items()}}
    return samples, figures, sum(s.seconds for s in samples)


def scrape_metrics(port: int) -> dict:
    """Mean seconds per query stage and per route, from the server's Prometheus text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found: dict = defaultdict(dict)
    pattern = re.compile(r'^(crossmodal_\w+?)_(sum|count)\{(\w+)="([^"]*)"\} (\S+)$')
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            metric, part, _label, value, number = match.groups()
            found[(metric, value)][part] = float(number)
    means = defaultdict(dict)
    for (metric, value), parts in found.items():
        if parts.get("count"):
            means[metric][value] = {"count": int(parts["count"]), "mean_ms": parts["sum"] / parts["count"] * 1000}
    return dict(means)


# -- figures ---------------------------------------------------------------------------------------
def summary(samples: list[Sample], seconds: float) -> dict:
    latencies = np.array([s.seconds for s in samples if s.status == 200]) * 1000
    errors = sum(s.status != 200 for s in samples)
    figures = {"count": len(samples), "errors": errors, "503": sum(s.status == 503 for s in samples),
               "per_s": len(samples) / seconds if seconds > 0 else 0.0}
    for q in (50, 95, 99):
        figures[f"p{q}_ms"] = float(np.percentile(latencies, q)) if len(latencies) else float("nan")
    statuses: dict = defaultdict(int)
    for s in samples:
        if s.status != 200:
            statuses[str(s.status or "exception")] += 1
    figures["statuses"] = dict(statuses)
    return figures


def stage_split(samples: list[Sample]) -> dict:
    """Per kind: median client latency, the server's median stages, and what is left (HTTP, JSON, queue)."""
    split = {}
    for kind in SEARCH_KINDS:
        timed = [s for s in samples if s.kind == kind and s.status == 200 and s.timings]
        if not timed:
            continue
        row = {"client_ms": float(np.median([s.seconds * 1000 for s in timed]))}
        for stage in STAGES:
            row[stage] = float(np.median([s.timings.get(stage, 0.0) for s in timed]))
        left = [s.seconds * 1000 - sum(s.timings.get(st, 0.0) for st in STAGES) for s in timed]
        row["outside_ms"] = float(np.median(left))
        split[kind] = row
    return split


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, nproc {os.cpu_count()}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r}: use {', '.join(KINDS)}")
        mix[kind.strip()] = float(weight)
    return mix


def row(label: str, f: dict) -> str:
    return (f"{label:<26}{f['count']:>7}{f['p50_ms']:>9.1f}{f['p95_ms']:>9.1f}{f['p99_ms']:>9.1f}"
            f"{f['per_s']:>9.1f}{f['errors']:>7}{f['503']:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="Index to serve [default: build one in a temp dir].")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent clients in the mixed load.")
    parser.add_argument("--seconds", type=float, default=20, help="Length of the mixed load.")
    parser.add_argument("--single-seconds", type=float, default=10,
                        help="Length of the 1-client text-only run (server and in-process alternating).")
    parser.add_argument("--workers", type=int, default=None, help="The server's --workers [default: its own].")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("text=4,image=2,similar=2,thumb=4"),
                        help="Relative weights of the kinds of request in the mixed load.")
    parser.add_argument("--warmup", type=int, default=5, help="Warm-up rounds (one query of each kind per round).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=300, help="Images in the index built [default: 300].")
    parser.add_argument("--model", default="crossmodal-demo",
                        help="Model of the index built, e.g. ViT-B-32 with --pretrained none: a real model's "
                             "compute without its download [default: the bundled demo model].")
    parser.add_argument("--pretrained", default=None, help="Its weights (a tag, a file, or none).")
    args = parser.parse_args()

    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {machine()}; load average at start {load_average()}")

    with tempfile.TemporaryDirectory(prefix="crossmodal-serve-load-") as scratch:
        scratch = Path(scratch)
        index = (args.index or build_index(scratch, args.images, 77, run_cli, args.model, args.pretrained)).resolve()
        port = free_port()
        log_path = scratch / "serve.log"
        with open(log_path, "wb") as log:
            server = start_server(index, port, scratch, args.workers, log)
        exit_code = None
        try:
            ready_s = wait_healthy(port, server)
            corpus = discover(port)
            rng = np.random.default_rng(args.seed)
            warm_up(port, corpus, rng, args.warmup)
            cold, cached = thumbnail_passes(port, corpus)
            print(f"server ready after {ready_s:.1f}s; {len(corpus.images)} images, {len(corpus.texts)} captions; "
                  f"load average before the mixed load {load_average()}", flush=True)
            mixed, mixed_s = mixed_load(port, corpus, args.clients, args.seconds, args.seed, args.mix)
            single, local, single_s = text_only(port, corpus, index, args.single_seconds, args.seed, warm=20)
            metrics = scrape_metrics(port)
        finally:
            exit_code = stop_server(server)
            server_log = log_path.read_text(errors="replace")

    rows: dict[str, dict] = {}
    for kind in KINDS:
        rows[f"mixed {kind}"] = summary([s for s in mixed if s.kind == kind], mixed_s)
    rows["mixed searches"] = summary([s for s in mixed if s.kind in SEARCH_KINDS], mixed_s)
    rows["mixed all"] = summary(mixed, mixed_s)
    rows["thumb cold (1 client)"] = summary(cold, sum(s.seconds for s in cold))
    rows["thumb cached (1 client)"] = summary(cached, sum(s.seconds for s in cached))
    rows["text only (1 client)"] = summary(single, single_s)

    weights = f" ({args.pretrained})" if args.pretrained else ""
    where = index if args.index else (f"{args.images} generated images (seed 77), {args.model}{weights}, flat "
                                      "(built here, removed)")
    mix = ", ".join(f"{k} {v:g}" for k, v in args.mix.items())
    print(f"\nindex: {where}; server --workers {args.workers or 'default'}; k={K}")
    print(f"mixed load: {args.clients} clients for {mixed_s:.1f}s (mix {mix}); then text only, 1 client, "
          f"{len(single)} queries, each also answered in-process (alternating)")
    print(f"{'':<26}{'count':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>7}{'503s':>6}")
    for label, figures in rows.items():
        print(row(label, figures))
    print(f"{'in-process answer_text':<26}{local['count']:>7}{local['median_ms']:>9.1f}{local['p95_ms']:>9.1f}")
    bad = {label: f["statuses"] for label, f in rows.items() if f["statuses"]}
    if bad:
        print(f"non-200 answers: {bad}")

    print("\nwhere the time goes (medians, ms): client latency = server encode + search + catalog + outside "
          "(HTTP, JSON, form parsing, queue wait)")
    print(f"{'':<26}{'client':>8}{'encode':>8}{'search':>8}{'catalog':>8}{'outside':>8}")
    for label, samples in (("mixed", mixed), ("text only (1 client)", single)):
        for kind, split in stage_split(samples).items():
            name = f"{label} {kind}" if label == "mixed" else label
            print(f"{name:<26}{split['client_ms']:>8.2f}{split['encode']:>8.2f}{split['search']:>8.2f}"
                  f"{split['catalog']:>8.2f}{split['outside_ms']:>8.2f}")
    st = local["stages_median_ms"]
    print(f"{'in-process answer_text':<26}{local['median_ms']:>8.2f}{st.get('encode', 0):>8.2f}"
          f"{st.get('search', 0):>8.2f}{st.get('catalog', 0):>8.2f}")
    stages = metrics.get("crossmodal_query_stage_seconds", {})
    routes = metrics.get("crossmodal_request_seconds", {})
    print("/metrics means, whole run (ms): stages " +
          ", ".join(f"{s} {v['mean_ms']:.2f} (n={v['count']})" for s, v in sorted(stages.items())) +
          "; routes " + ", ".join(f"{r} {v['mean_ms']:.2f} (n={v['count']})" for r, v in sorted(routes.items())))

    server_p50 = rows["text only (1 client)"]["p50_ms"]
    ratio = server_p50 / local["median_ms"]
    qps = rows["mixed searches"]["per_s"]
    errors = sum(f["errors"] for f in rows.values())
    verdict = {"ratio": ratio <= TARGETS["ratio_server_to_in_process"], "qps": qps > CLIP_BACK_QPS,
               "errors": errors == 0, "exit": exit_code == 0}
    print(f"\nwarm text query p50 through the server {server_p50:.2f} ms vs in-process median {local['median_ms']:.2f} "
          f"ms: {ratio:.2f}x (target <= {TARGETS['ratio_server_to_in_process']}x) "
          f"{'met' if verdict['ratio'] else 'MISSED'}")
    print(f"search queries/s under the mixed load ({args.clients} clients, thumbnails not counted): {qps:.1f} vs "
          f"clip-back's published ~{CLIP_BACK_QPS:g} queries/s (target: ahead) "
          f"{'met' if verdict['qps'] else 'MISSED'}; "
          f"text only, 1 client: {rows['text only (1 client)']['per_s']:.1f}/s")
    print(f"errors: {errors} (target 0) {'met' if verdict['errors'] else 'MISSED'}; server stopped by SIGINT, "
          f"exit code {exit_code} {'(ok)' if verdict['exit'] else '(NOT 0)'}")
    if exit_code != 0 or errors:
        print("server log (end):\n" + server_log[-2000:], file=sys.stderr)
    print(json.dumps({
        "machine": machine(), "clients": args.clients, "seconds": round(mixed_s, 2), "workers": args.workers,
        "rows": {label: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in f.items()}
                 for label, f in rows.items()},
        "in_process": local, "server_text_p50_ms": server_p50, "ratio": ratio, "search_qps": qps,
        "errors": errors, "exit_code": exit_code, "targets": TARGETS, "met": verdict}))


if __name__ == "__main__":
    main()
