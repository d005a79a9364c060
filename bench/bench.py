#!/usr/bin/env python3
"""End-to-end benchmark of the classifier and its Python peers, against a loopback server.

Serves ../shared/fixtures over HTTP on 127.0.0.1 like a distant host: each
response waits --delay-ms before its first byte, then streams at --rate-mbps
megabytes per second per connection (0 = unthrottled); byte ranges are
honoured as static hosts do, and If-None-Match is answered with 304 Not
Modified. Each run is cold: model, labels and images are downloaded every
time (the classifier runs with --no-cache). Per run, in turn: the floor's
model download, the classifier, and each peer, so that all share the
machine's noise alike. With --cached, the classifier also runs with its
download cache primed, as a repeated run would.

Scenarios: task5 (the five task images), corpus (200 photos), scale (the
corpus under 10 distinct query strings: 2000 URLs).

Prints, per contender: median wall time (min, max), images per second, median
peak RSS, and the ratio to the floor: the model downloaded alone over one
connection, plus one batch of inference (the classifier's own stage time on a
local image). Then the medians of the classifier's model download and model
preparation over the runs (from its own stage summary: each run is a cold
process), and its stage summary of the last run.

    cargo build --release
    python3 bench/bench.py --scenario task5 --runs 7
"""
import argparse
import http.client
import http.server
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
TASK5 = ["phalacrocorax_varius.jpg", "galerida_cristata.jpg", "eumomota_superciliosa.jpg",
         "american_robin.jpg", "northern_cardinal.jpg"]


def make_handler(delay, rate):
    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # As static hosts do: with Nagle on, the end of each write on a kept-alive
        # connection waited up to 40 ms for the client's delayed ACK.
        disable_nagle_algorithm = True

        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(FIXTURES), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            path = Path(self.translate_path(self.path.split("?")[0]))
            try:
                body = path.read_bytes()
                stat = path.stat()
            except OSError:
                self.send_error(404)
                return
            etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
            if self.headers.get("If-None-Match") == etag:
                time.sleep(delay)
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            status, first, last = 200, 0, len(body) - 1
            # Byte ranges as static hosts serve them: one range, honoured
            # unless If-Range names another version.
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and self.headers.get("If-Range", etag) == etag:
                status, first = 206, int(ranged[1])
                last = min(int(ranged[2]), last) if ranged[2] else last
                if first >= len(body):
                    time.sleep(delay)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = body[first:last + 1]
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{stat.st_size}")
            self.end_headers()
            chunk = 64 * 1024
            start = time.monotonic()
            try:
                for off in range(0, len(body), chunk):
                    self.wfile.write(body[off:off + chunk])
                    if rate:
                        ahead = (off + chunk) / rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client had what it wanted

    return Handler


def serve(delay, rate):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(delay, rate))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_measured(cmd, stdin=None):
    """Runs cmd with stdin, returning (wall seconds, peak RSS in MB, stdout, stderr, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin:
        threading.Thread(target=lambda: (proc.stdin.write(stdin.encode()), proc.stdin.close())).start()
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    t_out.start(); t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    t_out.join(); t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, out_chunks[0].decode(), err_chunks[0].decode(), proc.returncode


def run_shards(cmd, shards, stdin):
    """Runs the shards at once; returns (wall of the slowest, largest peak RSS, stderr of shard 0)."""
    cpus = os.cpu_count()
    start = time.monotonic()
    results = [None] * shards

    def one(i):
        pinned = ["taskset", "-c", str(i % cpus), *cmd, "--shard", f"{i}/{shards}", "--threads", "1"]
        results[i] = run_measured(pinned, stdin)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    for i, (_, _, _, err, code) in enumerate(results):
        if code != 0:
            sys.exit(f"shard {i} exited {code}:\n{err}")
    return wall, max(r[1] for r in results), results[0][3]


def download_once(url):
    """Seconds to GET url over one fresh connection and read it all."""
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    conn.request("GET", parts.path)
    body = conn.getresponse().read()
    wall = time.monotonic() - start
    conn.close()
    assert len(body) > 0
    return wall


def one_batch(binary):
    """The classifier's inference time for one batch of one image, from its own stage summary."""
    birds = FIXTURES / "birds"
    times = []
    for _ in range(3):
        _, _, _, err, code = run_measured([binary, "--no-cache", "--model", str(birds / "model.tflite"), "--labels",
                                           str(birds / "labels.csv"), str(birds / "images" / TASK5[3])])
        if code != 0:
            sys.exit(f"classifier exited {code}:\n{err}")
        times.append(float(re.search(r"inference=([0-9.]+) s batches=1\b", strip_ansi(err))[1]))
    return statistics.median(times)


def strip_ansi(text):
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def check_output(name, out, count):
    records = [json.loads(line) for line in out.splitlines()]
    failed = [r for r in records if "error" in r]
    if len(records) != count or failed:
        sys.exit(f"{name}: {len(records)} records for {count} sources, {len(failed)} failed: {failed[:3]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["task5", "corpus", "scale"], default="task5")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--delay-ms", type=float, default=50)
    p.add_argument("--rate-mbps", type=float, default=20)
    p.add_argument("--concurrency", type=int, default=0,
                   help="downloads in flight, passed to the classifier (all its builds) and to the peers "
                        "alike; 0 leaves each at its own default")
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "classifier"))
    p.add_argument("--baseline", metavar="BINARY",
                   help="also run this build of the classifier (an earlier commit's, say), cold, as "
                        "classifier_baseline, alternating with the others in every run")
    p.add_argument("--peers", default="litert,sequential",
                   help="comma-separated peers to run beside the classifier: litert, sequential, or none "
                        "(sequential runs only in task5: it downloads the model once per image)")
    p.add_argument("--cached", action="store_true",
                   help="also run the classifier with its download cache primed (model and labels kept from "
                        "a run before the measured ones), as classifier_cached; the classifier itself "
                        "always runs cold, with --no-cache")
    p.add_argument("--shards", type=int, default=0,
                   help="scale-out: run N processes at once, process i with --shard i/N --threads 1, "
                        "pinned to CPU i mod (number of CPUs); compare with --shards 1")
    args = p.parse_args()
    if not FIXTURES.is_dir():
        sys.exit(f"{FIXTURES} is absent")
    server = serve(args.delay_ms / 1000, args.rate_mbps * 1e6)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    corpus = [f"{base}/birds/corpus/{n}" for n in sorted(os.listdir(FIXTURES / "birds" / "corpus"))]
    images = {
        "task5": [f"{base}/birds/images/{n}" for n in TASK5],
        "corpus": corpus,
        "scale": [f"{url}?copy={k}" for k in range(10) for url in corpus],
    }[args.scenario]
    model, labels = f"{base}/birds/model.tflite", f"{base}/birds/labels.csv"
    in_flight = ["--concurrency", str(args.concurrency)] if args.concurrency else []
    tool = [args.binary, "--model", model, "--labels", labels, "--format", "json", "--sources-file", "-", *in_flight]
    cache_dir = tempfile.mkdtemp(prefix="classifier-bench-cache-")
    cached_tool = [*tool, "--cache-dir", cache_dir]
    tool.append("--no-cache")
    peers = [name for name in args.peers.split(",") if name not in ("", "none")]
    if args.scenario != "task5" and "sequential" in peers:
        peers.remove("sequential")
    baseline = [args.baseline, *tool[1:]] if args.baseline else None
    contenders = {"classifier": None, **({"classifier_baseline": baseline} if baseline else {}),
                  **({"classifier_cached": cached_tool} if args.cached else {}), **{f"peer_{name}": [sys.executable, str(ROOT / "bench" / f"peer_{name}.py"),
                                                          "--model", model, "--labels", labels, *in_flight, *images]
                                         for name in peers}}
    batch = one_batch(args.binary)
    if args.cached:
        _, _, _, err, code = run_measured(cached_tool, "\n".join(images) + "\n")
        if code != 0:
            sys.exit(f"priming the cache: classifier exited {code}:\n{err}")
    sources = "\n".join(images) + "\n"
    walls = {name: [] for name in contenders}
    rss = {name: [] for name in contenders}
    floor_downloads = []
    stage_times = {"model_download": [], "model_prepare": []}
    for i in range(args.runs):
        floor_downloads.append(download_once(model))
        for name, cmd in contenders.items():
            if name == "classifier" and args.shards:
                wall, peak, err = run_shards(tool, args.shards, sources)
            elif name == "classifier":
                wall, peak, out, err, code = run_measured(tool, sources)
                if code != 0:
                    sys.exit(f"run {i}: classifier exited {code}:\n{err}")
                check_output(name, out, len(images))
                last_err = err
            elif name == "classifier_baseline":
                wall, peak, out, err, code = run_measured(cmd, sources)
                if code != 0:
                    sys.exit(f"run {i}: classifier_baseline exited {code}:\n{err}")
                check_output(name, out, len(images))
            elif name == "classifier_cached":
                wall, peak, out, err, code = run_measured(cmd, sources)
                if code != 0 or err.count("unchanged since it was cached") != 2:
                    sys.exit(f"run {i}: classifier_cached exited {code}, or its cache was not used:\n{err}")
                check_output(name, out, len(images))
            else:
                wall, peak, out, err, code = run_measured(cmd)
                if code != 0:
                    sys.exit(f"run {i}: {name} exited {code}:\n{err}")
                check_output(name, out, len(images))
            if name == "classifier" and args.shards:
                last_err = err
            if name == "classifier" and not args.shards:
                for stage, times in stage_times.items():
                    found = re.search(rf"{stage}=([0-9.]+) s", strip_ansi(err))
                    if found:
                        times.append(float(found[1]))
            walls[name].append(wall)
            rss[name].append(peak)
    shutil.rmtree(cache_dir, ignore_errors=True)
    n = len(images)
    floor = statistics.median(floor_downloads) + batch
    print(f"scenario {args.scenario}: {n} images, {args.runs} runs, delay {args.delay_ms:g} ms, "
          f"rate {args.rate_mbps:g} MB/s per connection, {os.cpu_count()} CPUs")
    if args.shards:
        print(f"classifier as {args.shards} shard process(es), one CPU and one inference thread each")
    print(f"floor {floor:.3f} s = model download alone {statistics.median(floor_downloads):.3f} s "
          f"(median of {args.runs}) + one batch of inference {batch:.3f} s")
    print()
    print("| | wall median (min-max) | images/s | peak RSS | wall / floor |")
    print("|---|---|---|---|---|")
    for name in contenders:
        w = statistics.median(walls[name])
        print(f"| {name} | {w:.3f} s ({min(walls[name]):.3f}-{max(walls[name]):.3f}) | {n / w:.1f} | "
              f"{statistics.median(rss[name]):.0f} MB | {w / floor:.2f} |")
    tool_wall = statistics.median(walls["classifier"])
    for name in contenders:
        if name != "classifier":
            print(f"classifier / {name}: {tool_wall / statistics.median(walls[name]):.2f}")
    print()
    for stage, times in stage_times.items():
        if times:
            print(f"classifier's {stage}, median of {len(times)} runs: {statistics.median(times):.3f} s "
                  f"({min(times):.3f}-{max(times):.3f})")
    for line in strip_ansi(last_err).splitlines():
        if "done:" in line or "stage times" in line:
            print("classifier's last run:", line.split(" INFO ")[-1].strip())


if __name__ == "__main__":
    main()
