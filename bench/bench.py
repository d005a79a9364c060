#!/usr/bin/env python3
"""End-to-end benchmark of the classifier against a loopback server.

Serves ../shared/fixtures over HTTP on 127.0.0.1 like a distant host: each
response waits --delay-ms before its first byte, then streams at --rate-mbps
megabytes per second per connection (0 = unthrottled). Runs the release
binary --runs times, cold (model, labels and images downloaded each time),
and prints the median wall time, peak RSS and the tool's own stage summary.

    cargo build --release
    python3 bench/bench.py --scenario task5 --runs 7
"""
import argparse
import http.server
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
TASK5 = ["phalacrocorax_varius.jpg", "galerida_cristata.jpg", "eumomota_superciliosa.jpg",
         "american_robin.jpg", "northern_cardinal.jpg"]


def make_handler(delay, rate):
    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            status, first, last = 200, 0, len(body) - 1
            # Byte ranges as static hosts serve them: one range, honoured
            # unless If-Range names another version.
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and self.headers.get("If-Range", etag) == etag and int(ranged[1]) < len(body):
                status, first = 206, int(ranged[1])
                last = min(int(ranged[2]), last) if ranged[2] else last
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


def run_measured(cmd):
    """Runs cmd, returning (wall seconds, peak RSS in MB, stdout, stderr, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    t_out.start(); t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    t_out.join(); t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, out_chunks[0].decode(), err_chunks[0].decode(), proc.returncode


def run_shards(cmd, shards):
    """Runs the shards at once; returns (wall of the slowest, largest peak RSS, stderr of shard 0)."""
    cpus = os.cpu_count()
    start = time.monotonic()
    results = [None] * shards

    def one(i):
        pinned = ["taskset", "-c", str(i % cpus), *cmd, "--shard", f"{i}/{shards}", "--threads", "1"]
        results[i] = run_measured(pinned)

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["task5", "corpus"], default="task5")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--delay-ms", type=float, default=50)
    p.add_argument("--rate-mbps", type=float, default=20)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "classifier"))
    p.add_argument("--shards", type=int, default=0,
                   help="scale-out: run N processes at once, process i with --shard i/N --threads 1, "
                        "pinned to CPU i mod (number of CPUs); compare with --shards 1")
    args = p.parse_args()
    if not FIXTURES.is_dir():
        sys.exit(f"{FIXTURES} is absent")
    server = serve(args.delay_ms / 1000, args.rate_mbps * 1e6)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    if args.scenario == "task5":
        images = [f"{base}/birds/images/{n}" for n in TASK5]
    else:
        images = [f"{base}/birds/corpus/{n}" for n in sorted(os.listdir(FIXTURES / "birds" / "corpus"))]
    cmd = [args.binary, "--model", f"{base}/birds/model.tflite", "--labels", f"{base}/birds/labels.csv",
           "--format", "json", *images]
    walls, rss = [], []
    for i in range(args.runs):
        if args.shards:
            wall, peak, err = run_shards(cmd, args.shards)
        else:
            wall, peak, out, err, code = run_measured(cmd)
            if code != 0:
                sys.exit(f"run {i} exited {code}:\n{err}")
        walls.append(wall)
        rss.append(peak)
        last_err = err
    n = len(images)
    if args.shards:
        print(f"{args.shards} shard process(es), one CPU and one inference thread each")
    print(f"scenario {args.scenario}: {n} images, {args.runs} runs, delay {args.delay_ms} ms, "
          f"rate {args.rate_mbps} MB/s per connection")
    print(f"wall median {statistics.median(walls):.3f} s (min {min(walls):.3f}, max {max(walls):.3f}); "
          f"{n / statistics.median(walls):.1f} images/s; peak RSS median {statistics.median(rss):.0f} MB")
    for line in last_err.splitlines():
        if "done:" in line or "stage times" in line:
            print("last run:", re.sub(r"\x1b\[[0-9;]*m", "", line.split(" INFO ")[-1]).strip())


if __name__ == "__main__":
    main()
