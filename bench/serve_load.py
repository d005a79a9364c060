#!/usr/bin/env python3
"""Load benchmark of `classifier serve` beside its Python peer (bench/peer_service.py).

Each run starts the server afresh (its time to ready is measured: from the
start of the process to the first 200 of /readyz), loads it from concurrent
clients on 127.0.0.1, reads the peak RSS of its whole process tree (the sum
of VmHWM over its processes, and the largest sum of RSS sampled every 25 ms)
and the CPU time the tree spent per image answered (user and system, over
the measured requests: a figure the machine's other loads change less than
wall time), and stops it. Contenders alternate run by run (classifier, peer, classifier,
peer...), so that both share the machine's noise alike; the tables give
medians over the runs.

Scenarios:
  A  --clients (16) concurrent clients upload the 200 photos of
     birds/corpus, one multipart request per photo, each photo once per pass
     (--passes): images/s, latency p50/p95/p99.
  B  the same photos by URL ({"sources": [url]}), served by bench.py's
     throttled loopback file server (--delay-ms before the first byte, then
     --rate-mbps per connection) from a process of its own; the classifier
     runs with --allow-address 127.0.0.0/8 to reach it.
  C  --burst-clients (200) concurrent clients upload photos against a small
     queue (the classifier with --queue 4 --max-in-flight 32; the peer as it
     ships, uvicorn having no such limit): statuses counted, each 200 checked.
     The classifier must answer only 200 or 503 (this script exits 1 if not).

The classifier runs with the model and labels of ../shared/fixtures/birds as
local files, --no-cache, and --cache-entries 0 when it has a result cache,
so that every figure is the engine's. Every 200 of scenarios A and B must
hold one record with predictions, else the run stops. The top-1 class of
each photo is compared between the contenders.

    cargo build --release
    python3 bench/serve_load.py --scenario A,B,C --runs 5
"""
import argparse
import asyncio
import collections
import http.client
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
BIRDS = FIXTURES / "birds"
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root):
    """The pids of root and all its descendants."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: the fields
            # after it are counted from its closing parenthesis.
            children[int(stat[stat.rindex(")") + 2:].split()[1])].append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cpu_seconds(pids):
    """User and system CPU time of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def status_kb(pid, field):
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found[1]) if found else 0


class Memory:
    """Samples the RSS of a process tree until stopped; its pids are looked up again twice a second."""

    def __init__(self, root):
        self.root, self.peak, self.pids = root, 0, [root]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        last_scan = 0.0
        while not self.done.is_set():
            if time.monotonic() - last_scan > 0.5:
                self.pids, last_scan = tree(self.root), time.monotonic()
            total = 0
            for pid in self.pids:
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
                except (OSError, IndexError, ValueError):
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(0.025)

    def finish(self):
        """(sum of VmHWM over the tree, largest sampled sum of RSS), in MB; read while the tree runs."""
        hwm = sum(status_kb(pid, "VmHWM") for pid in tree(self.root)) / 1024
        self.done.set()
        self.thread.join()
        return hwm, self.peak / 2**20


class Server:
    """A contender's server process: started, waited for, measured, stopped."""

    def __init__(self, cmd, port, ready_path):
        self.port = port
        self.log = tempfile.TemporaryFile()
        start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        self.memory = Memory(self.proc.pid)
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{cmd[0]} exited {self.proc.returncode} before it was ready:\n{self.output()}")
            if time.monotonic() - start > 120:
                self.stop()
                sys.exit(f"{cmd[0]} not ready after 120 s:\n{self.output()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", ready_path)
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.01)
        self.ready = time.monotonic() - start

    def cpu(self):
        """CPU seconds used so far by the server's processes."""
        return cpu_seconds(tree(self.proc.pid))

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self):
        """Stops the server; returns its peak RSS figures (see Memory.finish)."""
        rss = self.memory.finish()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return rss


def file_server(delay, rate, conn):
    """In a process of its own, so that its threads never wait for the load clients' interpreter."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench
    server = bench.serve(delay, rate)
    conn.send(server.server_address[1])
    conn.recv()  # until the parent closes its end or says stop


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def load(port, jobs, clients, make_request):
    """Sends the jobs from `clients` concurrent clients; returns (wall, [(job, status, latency, body)])."""
    queue = collections.deque(jobs)
    answers = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector, timeout=timeout) as session:
        async def client():
            while queue:
                job = queue.popleft()
                start = time.perf_counter()
                try:
                    async with session.post("/v1/classify", **make_request(job)) as resp:
                        body = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # No answer read: named by the client's error, without the URL.
                    reason = re.sub(r" for http://\S+", "", str(exc))
                    status, body = f"{type(exc).__name__}: {reason}", b""
                answers.append((job, status, time.perf_counter() - start, body))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start, answers


def top1(body):
    """The top-1 class index of a one-record answer, or None when it is not one."""
    try:
        results = json.loads(body)["results"]
        return results[0]["predictions"][0]["index"] if len(results) == 1 else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def is_error_body(body):
    try:
        return isinstance(json.loads(body).get("error"), str)
    except (ValueError, AttributeError):
        return False


def machine():
    cpus_in_ps = len(set(subprocess.run(["ps", "-eLo", "psr="], capture_output=True, text=True).stdout.split()))
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return (f"CPUs: os.cpu_count() {os.cpu_count()}, nproc {nproc}, affinity {len(os.sched_getaffinity(0))}, "
            f"distinct processors in `ps -eLo psr` {cpus_in_ps}")


def busy():
    """The load averages and the processes using the most CPU besides this one."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    top = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm", "--sort=-pcpu"], capture_output=True,
                         text=True).stdout.splitlines()[1:6]
    others = [" ".join(line.split()) for line in top if int(line.split()[0]) != os.getpid()]
    return f"load averages {' '.join(load)}; top CPU (pid %cpu elapsed name): " + "; ".join(others)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="A,B,C", help="comma-separated: A, B, C")
    p.add_argument("--runs", type=int, default=3, help="runs per contender and scenario")
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "classifier"))
    p.add_argument("--contenders", default="classifier,peer_service",
                   help="comma-separated, run in this order in every run: classifier, peer_service")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in A and B")
    p.add_argument("--passes", type=int, default=2, help="times each photo is sent in A and B")
    p.add_argument("--warmup", type=int, default=32,
                   help="requests sent before the measured ones in A and B, not counted")
    p.add_argument("--burst-clients", type=int, default=200, help="concurrent clients in C")
    p.add_argument("--burst-requests", type=int, default=3, help="requests per client in C")
    p.add_argument("--burst-by", choices=["upload", "url"], default="upload",
                   help="what C's requests carry: a photo (multipart), or its URL on the throttled server")
    p.add_argument("--delay-ms", type=float, default=50)
    p.add_argument("--rate-mbps", type=float, default=20)
    args = p.parse_args()
    scenarios = [s.strip().upper() for s in args.scenario.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"A", "B", "C"}:
        sys.exit(f"--scenario takes A, B and C, comma-separated, not {args.scenario!r}")
    if not BIRDS.is_dir():
        sys.exit(f"{BIRDS} is absent")

    names = sorted(os.listdir(BIRDS / "corpus"))
    photos = {n: (BIRDS / "corpus" / n).read_bytes() for n in names}
    model, labels = str(BIRDS / "model.tflite"), str(BIRDS / "labels.csv")
    result_cache = False
    if "classifier" in args.contenders:
        if not Path(args.binary).is_file():
            sys.exit(f"{args.binary} is absent: cargo build --release, or name one with --binary")
        help_text = subprocess.run([args.binary, "serve", "--help"], capture_output=True, text=True).stdout
        result_cache = "--cache-entries" in help_text
    ours_base = [args.binary, "serve", "--model", f"birds={model}", "--labels", f"birds={labels}",
                 "--no-cache", "-q", *(["--cache-entries", "0"] if result_cache else [])]
    commands = {
        "classifier": lambda port, extra: (
            [*ours_base, "--listen", f"127.0.0.1:{port}", *extra.get("classifier", [])], "/readyz"),
        "peer_service": lambda port, extra: (
            [sys.executable, str(ROOT / "bench" / "peer_service.py"), "--model", model, "--labels", labels,
             "--listen", f"127.0.0.1:{port}"], "/readyz"),
    }
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not wanted or set(wanted) - set(commands):
        sys.exit(f"--contenders takes {', '.join(commands)}, comma-separated, not {args.contenders!r}")
    contenders = {name: commands[name] for name in wanted}

    print(machine())
    print("before:", busy())
    if "classifier" in contenders:
        cache = "result cache off: --cache-entries 0" if result_cache else "no result cache in this build"
        print(f"classifier: {args.binary} ({cache})")
    print()

    files_conn = files_proc = None
    if "B" in scenarios or ("C" in scenarios and args.burst_by == "url"):
        files_conn, child_conn = multiprocessing.Pipe()
        files_proc = multiprocessing.get_context("fork").Process(
            target=file_server, args=(args.delay_ms / 1000, args.rate_mbps * 1e6, child_conn), daemon=True)
        files_proc.start()
        files_port = files_conn.recv()
        files_base = f"http://127.0.0.1:{files_port}/birds/corpus"

    def upload(name):
        form = aiohttp.FormData()
        form.add_field("file", photos[name], filename=name, content_type="image/jpeg")
        return {"data": form}

    def by_url(name):
        return {"json": {"sources": [f"{files_base}/{name}"]}}

    violations = []
    for scenario in scenarios:
        clients = args.burst_clients if scenario == "C" else args.clients
        passes = args.burst_requests * clients if scenario == "C" else args.passes * len(names)
        jobs = [names[i % len(names)] for i in range(passes)]
        extra = {"B": {"classifier": ["--allow-address", "127.0.0.0/8"]},
                 "C": {"classifier": ["--queue", "4", "--max-in-flight", "32", "--allow-address", "127.0.0.0/8"]},
                 }.get(scenario, {})
        make_request = by_url if scenario == "B" or (scenario == "C" and args.burst_by == "url") else upload
        figures = {name: collections.defaultdict(list) for name in contenders}
        tops = {name: {} for name in contenders}
        for run in range(args.runs):
            for name, command in contenders.items():
                port = free_port()
                cmd, ready_path = command(port, extra)
                if run == 0:
                    print(f"{scenario} {name}: {' '.join(cmd)}")
                server = Server(cmd, port, ready_path)
                if scenario != "C" and args.warmup:
                    warm = [names[-1 - i % len(names)] for i in range(args.warmup)]
                    asyncio.run(load(port, warm, clients, make_request))
                server_cpu, client_cpu = server.cpu(), sum(os.times()[:2])
                wall, answers = asyncio.run(load(port, jobs, clients, make_request))
                server_cpu, client_cpu = server.cpu() - server_cpu, sum(os.times()[:2]) - client_cpu
                hwm, sampled = server.stop()
                statuses = collections.Counter(a[1] for a in answers)
                if scenario != "C":
                    bad = [(job, status, body[:200]) for job, status, _, body in answers
                           if status != 200 or top1(body) is None]
                    if bad:
                        sys.exit(f"{scenario} run {run}: {name} gave {len(bad)} bad answers of {len(answers)}, "
                                 f"such as {bad[:3]}\n{server.output()}")
                ok = [a for a in answers if a[1] == 200]
                for job, _, _, body in ok:
                    tops[name].setdefault(job, top1(body))
                f = figures[name]
                f["images/s"].append(len(ok) / wall)
                f["ready"].append(server.ready)
                f["hwm"].append(hwm)
                f["sampled"].append(sampled)
                # Per image answered: CPU time is what the machine's other
                # loads do not change much, unlike wall time.
                f["cpu"].append(server_cpu / max(len(ok), 1))
                f["client cpu"].append(client_cpu / max(len(ok), 1))
                lat = sorted(a[2] for a in ok)
                for q in (50, 95, 99):
                    f[f"p{q}"].append(percentile(lat, q))
                if scenario == "C":
                    f["statuses"].append(statuses)
                    shed = sorted(a[2] for a in answers if a[1] == 503)
                    f["p99 503"].append(percentile(shed, 99))
                    f["bad 200"].append(sum(1 for a in ok if top1(a[3]) is None))
                    f["bad 503"].append(sum(1 for a in answers if a[1] == 503 and not is_error_body(a[3])))
                    others = {s: n for s, n in statuses.items() if s not in (200, 503)}
                    if name == "classifier" and (others or f["bad 200"][-1] or f["bad 503"][-1]):
                        violations.append(f"C run {run}: {others or ''} {f['bad 200'][-1]} bad 200 bodies, "
                                          f"{f['bad 503'][-1]} 503s without an error body")
                print(f"  run {run} {name}: {len(ok)}/{len(answers)} ok in {wall:.2f} s, "
                      f"{len(ok) / wall:.1f} images/s, p99 {f['p99'][-1] * 1000:.0f} ms, ready {server.ready:.2f} s, "
                      f"RSS {hwm:.0f} MB (sampled {sampled:.0f}), server CPU {f['cpu'][-1] * 1000:.1f} ms/image "
                      f"(client {f['client cpu'][-1] * 1000:.1f}), statuses {dict(statuses)}", flush=True)
        report(scenario, figures, tops, clients, len(jobs), args)
    if files_conn:
        files_conn.send("stop")
        files_proc.join(5)
    print("after:", busy())
    if violations:
        sys.exit("the classifier answered other than 200 or 503 (or with a bad body) in C: " + "; ".join(violations))


def med(values):
    return statistics.median(values)


def ms1(values):
    return f"{med(values) * 1000:.1f} ms"


def ms(values):
    return f"{med(values) * 1000:.0f} ms"


def report(scenario, figures, tops, clients, requests, args):
    print()
    what = {"A": "uploads (multipart, one photo a request)",
            "B": f"URLs from the throttled loopback server ({args.delay_ms:g} ms, {args.rate_mbps:g} MB/s)",
            "C": f"{'URLs' if args.burst_by == 'url' else 'uploads'} against a small queue"}[scenario]
    print(f"scenario {scenario}: {what}, {clients} clients, {requests} requests a run, "
          f"medians of {args.runs} runs")
    print()
    if scenario == "C":
        print("| | 200 | 503 | other | images/s (200s) | p50 / p99 of 200s | p99 of 503s | peak RSS (tree) | ready |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, f in figures.items():
            total = collections.Counter()
            for s in f["statuses"]:
                total.update(s)
            other = {s: n for s, n in total.items() if s not in (200, 503)}
            shed = [v for v in f["p99 503"] if v == v]
            print(f"| {name} | {total[200]} | {total[503]} | {sum(other.values())} {other or ''} | "
                  f"{med(f['images/s']):.1f} | {ms(f['p50'])} / {ms(f['p99'])} | {ms(shed) if shed else '-'} | "
                  f"{med(f['hwm']):.0f} MB (max {max(f['hwm']):.0f}) | {med(f['ready']):.2f} s |")
        print("(counts summed over the runs)")
    else:
        print("| | images/s median (min-max) | p50 | p95 | p99 | peak RSS (tree) | ready | server CPU per image |")
        print("|---|---|---|---|---|---|---|---|")
        for name, f in figures.items():
            print(f"| {name} | {med(f['images/s']):.1f} ({min(f['images/s']):.1f}-{max(f['images/s']):.1f}) | "
                  f"{ms(f['p50'])} | {ms(f['p95'])} | {ms(f['p99'])} | {med(f['hwm']):.0f} MB "
                  f"(sampled {med(f['sampled']):.0f}) | {med(f['ready']):.2f} s | {ms1(f['cpu'])} |")
    if "classifier" in figures and "peer_service" in figures:
        ours, peer = figures["classifier"], figures["peer_service"]
        print()
        print(f"classifier / peer_service: images/s {med(ours['images/s']) / med(peer['images/s']):.2f}x, "
              f"p99 {med(ours['p99']) / med(peer['p99']):.2f}x, p50 {med(ours['p50']) / med(peer['p50']):.2f}x, "
              f"peak RSS {med(ours['hwm']) / med(peer['hwm']):.2f}x, ready {med(ours['ready']) / med(peer['ready']):.2f}x, "
              f"server CPU per image {med(ours['cpu']) / med(peer['cpu']):.2f}x")
        print(f"the load client's own CPU per image: {ms1(ours['client cpu'])} (classifier runs), "
              f"{ms1(peer['client cpu'])} (peer runs)")
        shared = [job for job in tops["classifier"] if job in tops["peer_service"]]
        same = sum(1 for job in shared if tops["classifier"][job] == tops["peer_service"][job])
        print(f"top-1 class equal for {same} of the {len(shared)} photos both classified")
    print(flush=True)


if __name__ == "__main__":
    main()
