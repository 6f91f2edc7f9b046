#!/usr/bin/env python3
"""portwake benchmark suite (issue 7). Run it through bench/run.sh, which builds the
release binaries, checks the tools and raises the fd limit first.

Every comparison runs its contenders as paired, alternating rounds on the same
machine, and quotes ratios against the peer measured in the same run: absolute
times on shared machines drift. Sections:

  latency   connect -> first byte from a freshly started guest: portwake + exec
            plugin vs systemd-socket-activate starting the same binary
  datapath  requests/s and latency of a running guest (wrk): activated by portwake
            vs the same guest binding its own port vs behind systemd-socket-proxyd
  scale     1,000 / 10,000 / 50,000 listeners: time to bind all (vs a C program that
            only binds them), RSS, CPU and wakeups over an idle window, dispatch
            time from readiness to the plugin call
  burst     1,000 concurrent connections to a unit whose guest takes 0.5 s to accept
  herd      200 units activated at once by a plugin taking 1 s each; another unit's
            first-byte latency meanwhile
  engines   first byte and stop times from the engine system tests

Writes the results as JSON (--json) and Markdown (--out, default BENCHMARKS.md).
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BIN = os.environ.get("PORTWAKE_BENCH_BIN", os.path.join(ROOT, "target", "bench", "bin"))
PORTWAKE = os.path.join(BIN, "portwake")
GUEST = os.path.join(BIN, "hello-guest")
FLOOR = next((p for p in (os.path.join(BIN, "bindfloor"), os.path.join(ROOT, "target", "bench", "bin", "bindfloor"))
              if os.path.exists(p)), os.path.join(BIN, "bindfloor"))
DIRECT = os.path.join(BENCH, "direct.py")
PROXYD = "/lib/systemd/systemd-socket-proxyd"
SSA = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
HTTP_GET = b"GET / HTTP/1.0\r\n\r\n"

# ---------------------------------------------------------------- processes

_children = []


def spawn(argv, **kw):
    """Starts a process this suite owns; `cleanup` ends it by its pid."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    p = subprocess.Popen(argv, **kw)
    _children.append(p)
    return p


def end(p, sig=signal.SIGTERM, timeout=30):
    """Ends one of our processes: `sig`, then SIGKILL after `timeout`."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass
    if p in _children:
        _children.remove(p)


def cleanup():
    for p in list(_children):
        end(p, timeout=15)


# ---------------------------------------------------------------- statistics


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """Median with the 10th and 90th percentiles."""
    return {"median": median(xs), "p10": quantile(xs, 0.10), "p90": quantile(xs, 0.90),
            "p99": quantile(xs, 0.99), "max": max(xs) if xs else float("nan"), "n": len(xs)}


# ---------------------------------------------------------------- machine load


def _proc_stat():
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in f[:8])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / hz, steal / hz


def thread_names(pid):
    """The names (comm) of a process's threads."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(open(f"/proc/{pid}/task/{tid}/comm").read().strip())
        except OSError:
            pass
    return names


def process_cpu_s(pid):
    """CPU seconds of a process's own threads, exited ones included (/proc/PID/stat
    utime + stime; its children's are not in it)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """CPU used on the machine by processes that are not this suite's, while it ran
    (user+system time of the whole machine minus ours and our reaped children's),
    in cores; plus hypervisor steal. Valid when every child was reaped at `stop`."""

    def __init__(self):
        self.t0 = time.time()
        self.busy0, self.steal0 = _proc_stat()
        self.own0 = _own_cpu()

    def stop(self):
        wall = max(time.time() - self.t0, 1e-6)
        busy, steal = _proc_stat()
        own = _own_cpu() - self.own0
        other = max(0.0, (busy - self.busy0) - own)
        return {"other_cores": other / wall, "steal_cores": (steal - self.steal0) / wall,
                "wall_s": wall, "loadavg": open("/proc/loadavg").read().split()[0]}


# ---------------------------------------------------------------- per-process counters


def proc_counters(pid):
    """CPU ns, times scheduled in, context switches (all threads) and RSS KiB."""
    cpu = runs = switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            a, _b, c = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
            cpu += int(a)
            runs += int(c)
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if "ctxt_switches" in line:
                    switches += int(line.split()[1])
        except (FileNotFoundError, ValueError):
            pass
    rss = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return {"cpu_ns": cpu, "runs": runs, "switches": switches, "rss_kib": rss, "threads": threads}


# ---------------------------------------------------------------- the daemon


def parse_ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class LogTail:
    """Follows the daemon's JSON log, counting messages per (message, unit)."""

    def __init__(self, path):
        self.f = open(path, "r")
        self.rest = ""
        self.counts = {}
        self.events = []

    def poll(self):
        data = self.f.read()
        if not data:
            return []
        data = self.rest + data
        lines = data.split("\n")
        self.rest = lines.pop()
        new = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            fields = e.get("fields", {})
            ev = (parse_ts(e["timestamp"]), fields.get("message", ""), fields.get("unit"), fields)
            key = (ev[1], ev[2])
            self.counts[key] = self.counts.get(key, 0) + 1
            self.events.append(ev)
            new.append(ev)
        return new

    def count(self, message, unit=None):
        self.poll()
        return self.counts.get((message, unit), 0)

    def wait_count(self, message, unit, n, timeout=10.0):
        deadline = time.time() + timeout
        while self.count(message, unit) < n:
            if time.time() > deadline:
                raise TimeoutError(f"no {n}x {message!r} for {unit!r} in the log")
            time.sleep(0.0005)

    def find(self, message, unit=None, after=0.0):
        self.poll()
        return [e for e in self.events if e[1] == message and (unit is None or e[2] == unit) and e[0] >= after]


def ron_unit(name, plugin, options, listen, extra=""):
    ls = ", ".join(listen)
    return f'(name: "{name}", plugin: "{plugin}", options: {options}, listen: [{ls}]{extra}),\n'


def cmd_opts(argv, more=""):
    return "(command: [" + ", ".join(json.dumps(a) for a in argv) + "]" + more + ")"


HIGH_TRIGGER = ', trigger_limit: (interval: "1s", burst: 100000)'


class Daemon:
    def __init__(self, work, name, units_ron, level="info"):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "host.ron")
        self.control = os.path.join(self.dir, "control.sock")
        self.logpath = os.path.join(self.dir, "log")
        with open(self.config, "w") as f:
            f.write("(units: [\n")
            f.write(units_ron)
            f.write("])\n")
        self.log = open(self.logpath, "w")
        self.t_spawn = time.perf_counter()
        self.proc = spawn([PORTWAKE, "run", "--config", self.config, "--control-socket", self.control,
                           "--log-level", level, "--log-format", "json"], stderr=self.log)
        self.tail = LogTail(self.logpath)
        self.ready_s = None

    def wait_ready(self, timeout=120.0):
        """Seconds from spawn until the control socket exists (every listener bound)."""
        deadline = time.perf_counter() + timeout
        while not os.path.exists(self.control):
            if self.proc.poll() is not None:
                raise RuntimeError(f"portwake exited: {open(self.logpath).read()[-2000:]}")
            if time.perf_counter() > deadline:
                raise TimeoutError("portwake not ready")
            time.sleep(0.0002)
        self.ready_s = time.perf_counter() - self.t_spawn
        return self.ready_s

    def stop(self):
        end(self.proc, signal.SIGTERM, timeout=60)
        self.log.close()


# ---------------------------------------------------------------- clients


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def first_byte(host, port, timeout=10.0, retry_refused=False):
    """Seconds from connect() to the first byte of the answer."""
    start = time.perf_counter()
    while True:
        try:
            c = socket.create_connection((host, port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if not retry_refused or time.perf_counter() - start > timeout:
                raise
            time.sleep(0.0005)
    c.sendall(HTTP_GET)
    first = c.recv(1)
    took = time.perf_counter() - start
    c.close()
    if not first:
        raise RuntimeError(f"{host}:{port}: connection closed without an answer")
    return took


def fetch(host, port, timeout=10.0):
    c = socket.create_connection((host, port), timeout=timeout)
    c.sendall(HTTP_GET)
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.close()
    return data


# ================================================================ 1. latency


def sec_latency(work, rounds):
    port = free_port()
    d = Daemon(work, "latency", ron_unit("lat", "exec", cmd_opts([GUEST, "--exit-after", "1"]),
                                         [f'Stream(address: "127.0.0.1:{port}")'], HIGH_TRIGGER))
    d.wait_ready()

    def pw():
        n = d.tail.count("guest stopped", "lat")
        t = first_byte("127.0.0.1", port)
        d.tail.wait_count("guest stopped", "lat", n + 1)
        return t

    def ssa():
        p_port = free_port()
        p = spawn([SSA, "-l", f"127.0.0.1:{p_port}", GUEST, "--exit-after", "1"], stderr=subprocess.PIPE)
        p.stderr.readline()  # "Listening on 127.0.0.1:P as 3." once bound
        t = first_byte("127.0.0.1", p_port)
        p.wait(timeout=10)
        _children.remove(p)
        p.stderr.close()
        return t

    for _ in range(3):  # warm-up, not recorded
        pw(), ssa()
    out = {"portwake": [], "ssa": [], "ratio": []}
    for i in range(rounds):
        r = {}
        for who in (("portwake", "ssa") if i % 2 == 0 else ("ssa", "portwake")):
            time.sleep(0.01)  # both start from an idle unit / a fresh socket
            r[who] = pw() if who == "portwake" else ssa()
        out["portwake"].append(r["portwake"])
        out["ssa"].append(r["ssa"])
        out["ratio"].append(r["portwake"] / r["ssa"])
    d.stop()
    return {"rounds": rounds, "portwake": spread(out["portwake"]), "ssa": spread(out["ssa"]),
            "ratio_of_medians": median(out["portwake"]) / median(out["ssa"]),
            "paired_ratio": spread(out["ratio"])}


# ================================================================ 2. data path

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _dur(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def pin(pid, cpus):
    """Pins every thread of a process (affinity is per thread once they exist)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def wrk(port, secs, conns, threads, cpu=None):
    taskset = ["taskset", "-c", str(cpu)] if cpu is not None else []
    out = subprocess.run(taskset + ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=secs + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _dur(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat.get("50"), "p90": lat.get("90"), "p99": lat.get("99"),
            "errors": (errors.group(1) if errors else "") + (f" non2xx {non2xx.group(1)}" if non2xx else "")}


def wrk_together(ports, secs, conns, threads, cpu):
    """Runs one wrk per port at the same time. Both servers share CPU time fairly, so
    a contender that costs more per request serves fewer; drift of the machine hits
    both alike and cancels in their ratio."""
    out = {}

    def one(port):
        out[port] = wrk(port, secs, conns, threads, cpu)

    runners = [threading.Thread(target=one, args=(port,)) for port in ports]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    return [out[port] for port in ports]


def sec_datapath(work, rounds, secs, conns, threads):
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    p_pw, p_direct, p_proxy = free_port(), free_port(), free_port()
    d = Daemon(work, "datapath", ron_unit("web", "exec", cmd_opts([GUEST]),
                                          [f'Stream(address: "127.0.0.1:{p_pw}")']))
    d.wait_ready()
    p_direct2 = free_port()
    direct = spawn([sys.executable, DIRECT, "127.0.0.1", str(p_direct), str(somaxconn), "direct", GUEST])
    # A second, identical direct guest: the A/A control that shows the noise floor.
    direct2 = spawn([sys.executable, DIRECT, "127.0.0.1", str(p_direct2), str(somaxconn), "direct2", GUEST])
    proxy = spawn([SSA, "-l", f"127.0.0.1:{p_proxy}", PROXYD, f"127.0.0.1:{p_direct}"],
                  stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    ports = {"portwake": p_pw, "direct": p_direct, "proxyd": p_proxy, "direct2": p_direct2}
    for who, port in ports.items():  # activates portwake's guest and starts the proxy
        first_byte("127.0.0.1", port, retry_refused=True)
    d.tail.wait_count("guest started", "web", 1)
    # The load generator on one CPU, every server process on the other: the same
    # placement for every contender, instead of the scheduler's varying one.
    ncpu = os.cpu_count() or 1
    client_cpu, server_cpus = (0, set(range(1, ncpu))) if ncpu > 1 else (None, {0})
    guest_pid = d.tail.find("guest started", "web")[0][3].get("pid")
    for pid in (guest_pid, direct.pid, direct2.pid, proxy.pid):
        if pid:
            pin(pid, server_cpus)
    for port in ports.values():
        wrk(port, 1, conns, threads, client_cpu)  # warm-up
    # The thread that ran the plugin call must be gone (the counters below sum the
    # live threads), so they see only the load.
    deadline = time.time() + 20
    while any(n.startswith("activate-") for n in thread_names(d.proc.pid)) and time.time() < deadline:
        time.sleep(0.05)
    daemon0 = proc_counters(d.proc.pid)
    res = {k: [] for k in ports}
    ratio = {"portwake": [], "proxyd": [], "direct2": []}
    together = {"portwake": [], "direct2": []}
    names = list(ports)
    k = len(names)
    for i in range(rounds):
        order = names[i % k:] + names[:i % k]
        if (i // k) % 2:
            order.reverse()
        r = {who: wrk(ports[who], secs, conns, threads, client_cpu) for who in order}
        for who in names:
            res[who].append(r[who])
        ratio["portwake"].append(r["portwake"]["rps"] / r["direct"]["rps"])
        ratio["proxyd"].append(r["proxyd"]["rps"] / r["direct"]["rps"])
        ratio["direct2"].append(r["direct2"]["rps"] / r["direct"]["rps"])
        for who in ("portwake", "direct2") if i % 2 else ("direct2", "portwake"):
            a, b = wrk_together([ports[who], ports["direct"]], secs, conns, threads, client_cpu)
            together[who].append(a["rps"] / b["rps"])
    daemon1 = proc_counters(d.proc.pid)
    end(proxy)
    end(direct)
    end(direct2)
    d.stop()

    def agg(who):
        xs = res[who]
        return {"rps": spread([x["rps"] for x in xs]), "p50_ms": median([x["p50"] * 1e3 for x in xs]),
                "p99_ms": median([x["p99"] * 1e3 for x in xs]),
                "errors": sorted({x["errors"] for x in xs if x["errors"]})}

    return {"rounds": rounds, "wrk_secs": secs, "conns": conns, "threads": threads, "backlog": somaxconn,
            "portwake": agg("portwake"), "direct": agg("direct"), "proxyd": agg("proxyd"),
            "direct2": agg("direct2"), "ratio_direct2": spread(ratio["direct2"]),
            "ratio_portwake": spread(ratio["portwake"]), "ratio_proxyd": spread(ratio["proxyd"]),
            "together_portwake": spread(together["portwake"]), "together_direct2": spread(together["direct2"]),
            "daemon_cpu_ms": (daemon1["cpu_ns"] - daemon0["cpu_ns"]) / 1e6,
            "daemon_runs": daemon1["runs"] - daemon0["runs"], "client_cpu": client_cpu,
            "server_cpus": sorted(server_cpus),
            "load_s": rounds * (len(names) + 2) * secs}


# ================================================================ 3. scale


def scale_layout(n, second):
    """Units of 1..10 listeners (cycling), on 127.<second>.x.y x ports 10000-19999."""
    units, i, u = [], 0, 0
    while i < n:
        k = min(u % 10 + 1, n - i)
        addrs = []
        for j in range(i, i + k):
            a = j // 10000
            addrs.append((f"127.{second}.{a // 250}.{a % 250 + 1}", 10000 + j % 10000))
        units.append(addrs)
        i += k
        u += 1
    return units


def scale_files(work, n, second):
    units = scale_layout(n, second)
    ron = "".join(ron_unit(f"u{u}", "exec", cmd_opts([GUEST, "--exit-after", "1"]),
                           [f'Stream(address: "{a}:{p}")' for a, p in addrs], HIGH_TRIGGER)
                  for u, addrs in enumerate(units))
    addr_file = os.path.join(work, f"floor-{n}.txt")
    with open(addr_file, "w") as f:
        for addrs in units:
            for a, p in addrs:
                f.write(f"{a} {p}\n")
    return units, ron, addr_file


def floor_run(addr_file):
    t0 = time.perf_counter()
    p = spawn([FLOOR, addr_file], stdout=subprocess.PIPE)
    line = p.stdout.readline()
    took = time.perf_counter() - t0
    if not line.startswith(b"ready"):
        raise RuntimeError("bindfloor failed")
    rss = proc_counters(p.pid)["rss_kib"]
    end(p)
    p.stdout.close()
    return took, rss


def probe_one(d, units, rng):
    """One activation of a random unit of 5 listeners (the same work per start at
    every size). The daemon's own measure (`dispatch_us` of `guest started`: the
    loop's wake-up for the ready listener to the plugin call beginning on its
    worker) gives what is portwake's; our connect() time to the `starting guest`
    log line adds the kernel's part (the handshake and the epoll wake-up); the
    first byte of the fresh guest is what a client sees."""
    name = rng.choice([u for u in range(len(units)) if len(units[u]) == 5])
    addr = rng.choice(units[name])
    unit = f"u{name}"
    n = d.tail.count("guest stopped", unit)
    t0 = time.time()
    fb = first_byte(*addr)
    d.tail.wait_count("guest stopped", unit, n + 1)
    starting = d.tail.find("starting guest", unit, t0)[0][0]
    started = d.tail.find("guest started", unit, t0)[0][3]
    return {"dispatch_us": started["dispatch_us"], "connect_to_start_us": (starting - t0) * 1e6,
            "first_byte_ms": fb * 1e3}


def burst_one(d, units, burst, rng):
    """`burst` units of 5 listeners connected at once: the slowest one's dispatch,
    and the daemon's span from the first to the last `starting guest`."""
    five = [u for u in range(len(units)) if len(units[u]) == 5]
    chosen = rng.sample(five, min(burst, len(five)))
    stopped0 = {name: d.tail.count("guest stopped", f"u{name}") for name in chosen}
    socks = []
    t0 = time.time()
    for name in chosen:
        s = socket.socket()
        s.connect(units[name][0])
        socks.append(s)
    for s in socks:
        s.sendall(HTTP_GET)
    for s in socks:
        s.settimeout(10)
        while s.recv(4096):
            pass
        s.close()
    starting, dispatch = [], []
    for name in chosen:
        d.tail.wait_count("guest stopped", f"u{name}", stopped0[name] + 1, timeout=10)
        starting.append(d.tail.find("starting guest", f"u{name}", t0)[0][0])
        dispatch.append(d.tail.find("guest started", f"u{name}", t0)[0][3]["dispatch_us"])
    return {"n": len(chosen), "span_us": (max(starting) - min(starting)) * 1e6, "max_dispatch_us": max(dispatch)}


def sec_scale(work, sizes, rounds, idle_secs, probes, burst):
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    results = []
    keep = []
    rng = random.Random(7)
    for idx, wanted in enumerate(sizes):
        n = wanted
        note = ""
        if n + 256 > limit:
            n = (limit - 256) // 1000 * 1000
            note = (f"{wanted:,} listeners do not fit in this machine's fd limit "
                    f"(RLIMIT_NOFILE {limit}, not raisable here); measured at {n:,}")
        second = 20 + idx
        units, ron, addr_file = scale_files(work, n, second)
        pw_ready, pw_rss, fl_ready, fl_rss, ratios = [], [], [], [], []
        d = None
        for r in range(rounds):
            res = {}
            # Alternating, and the last round ends with portwake, whose daemon stays
            # up for the idle window.
            for who in (("floor", "portwake") if (rounds - 1 - r) % 2 == 0 else ("portwake", "floor")):
                if who == "portwake":
                    d = Daemon(work, f"scale-{n}-{r}", ron, level="warn")
                    res[who] = d.wait_ready()
                    time.sleep(0.3)
                    pw_rss.append(proc_counters(d.proc.pid)["rss_kib"])
                    if r < rounds - 1:
                        d.stop()
                else:
                    took, rss = floor_run(addr_file)
                    res[who] = took
                    fl_rss.append(rss)
            pw_ready.append(res["portwake"])
            fl_ready.append(res["floor"])
            ratios.append(res["portwake"] / res["floor"])
        keep.append(d)
        results.append({"wanted": wanted, "listeners": n, "units": len(units), "note": note,
                        "ready_s": spread(pw_ready), "floor_ready_s": spread(fl_ready),
                        "ready_ratio": spread(ratios), "rss_kib": median(pw_rss),
                        "floor_rss_kib": median(fl_rss)})
    # Idle window: every kept daemon at once, no client.
    time.sleep(1.0)
    before = [proc_counters(d.proc.pid) for d in keep]
    time.sleep(idle_secs)
    after = [proc_counters(d.proc.pid) for d in keep]
    for r, b, a, d in zip(results, before, after, keep):
        r["idle"] = {"secs": idle_secs, "cpu_ms": (a["cpu_ns"] - b["cpu_ns"]) / 1e6,
                     "runs": a["runs"] - b["runs"], "switches": a["switches"] - b["switches"],
                     "threads": a["threads"], "rss_kib": a["rss_kib"]}
        d.stop()
    # Dispatch: one daemon per size (info log level), all up at once and probed in
    # turn, so drift over the run cannot pass for growth with the listener count.
    daemons = []
    for idx, r in enumerate(results):
        units, ron, _ = scale_files(work, r["listeners"], 20 + idx)
        d = Daemon(work, f"dispatch-{r['listeners']}", ron, level="info")
        d.wait_ready()
        daemons.append((d, units))
    time.sleep(0.3)
    seqs = [[] for _ in results]
    bursts = [[] for _ in results]
    order = list(range(len(results)))
    for i in range(probes):
        for idx in (order if i % 2 == 0 else order[::-1]):
            seqs[idx].append(probe_one(*daemons[idx], rng))
    for i in range(3):
        for idx in (order if i % 2 == 0 else order[::-1]):
            bursts[idx].append(burst_one(*daemons[idx], burst, rng))
            time.sleep(0.2)
    for (d, _), r, seq, b in zip(daemons, results, seqs, bursts):
        d.stop()
        r["dispatch_us"] = spread([x["dispatch_us"] for x in seq])
        r["dispatch_connect_us"] = spread([x["connect_to_start_us"] for x in seq])
        r["first_byte_ms"] = spread([x["first_byte_ms"] for x in seq])
        r["burst"] = {"n": b[0]["n"], "span_us": median([x["span_us"] for x in b]),
                      "max_dispatch_us": median([x["max_dispatch_us"] for x in b])}
    return {"rounds": rounds, "fd_limit": limit, "sizes": results}


# ================================================================ 4. cold-start burst


async def _burst_clients(port, n, timeout):
    t_start = time.perf_counter()

    async def one():
        t0 = time.perf_counter()
        w = None
        try:
            async def go():
                nonlocal w
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(HTTP_GET)
                await w.drain()
                return await r.read()
            data = await asyncio.wait_for(go(), timeout - (t0 - t_start))
            ok = data.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.TimeoutError):
            ok = False
        finally:
            if w is not None:
                w.close()
        return ok, time.perf_counter() - t0

    return await asyncio.gather(*(one() for _ in range(n)))


def burst_run(port, n, timeout):
    res = asyncio.run(_burst_clients(port, n, timeout))
    lat = [t for ok, t in res if ok]
    served = len(lat)
    # An initial SYN dropped for a full accept queue is retried after 1 s (TCP's
    # initial RTO); the guest accepts from 0.5 s on. Served in < 1 s: first try.
    return {"served": served, "first_try": sum(1 for t in lat if t < 1.0),
            "p50_s": median(lat), "p99_s": quantile(lat, 0.99), "max_s": max(lat) if lat else float("nan")}


def sec_burst(work, rounds, n, delay_ms, backlogs, timeout):
    guest = [GUEST, "--startup-delay-ms", str(delay_ms), "--exit-after", str(n)]
    configs = [f"portwake backlog {b}" for b in backlogs] + ["portwake default", "ssa default"]
    res = {c: [] for c in configs}
    for r in range(rounds):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for c in order:
            port = free_port()
            if c.startswith("portwake"):
                backlog = "" if c.endswith("default") else f", backlog: {c.split()[-1]}"
                d = Daemon(work, f"burst-{r}", ron_unit(
                    "burst", "exec", cmd_opts(guest),
                    [f'Stream(address: "127.0.0.1:{port}"{backlog})']))
                d.wait_ready()
                res[c].append(burst_run(port, n, timeout))
                d.stop()
            else:
                p = spawn([SSA, "-l", f"127.0.0.1:{port}"] + guest, stderr=subprocess.PIPE)
                p.stderr.readline()
                res[c].append(burst_run(port, n, timeout))
                end(p)
                p.stderr.close()
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    out = []
    for c in configs:
        xs = res[c]
        out.append({"config": c, "served_min": min(x["served"] for x in xs),
                    "first_try_min": min(x["first_try"] for x in xs),
                    "p50_s": median([x["p50_s"] for x in xs]), "p99_s": median([x["p99_s"] for x in xs]),
                    "max_s": max(x["max_s"] for x in xs)})
    return {"rounds": rounds, "clients": n, "delay_ms": delay_ms, "timeout_s": timeout,
            "somaxconn": somaxconn,
            "tcp_max_syn_backlog": int(open("/proc/sys/net/ipv4/tcp_max_syn_backlog").read()),
            "syncookies": int(open("/proc/sys/net/ipv4/tcp_syncookies").read()), "configs": out}


# ================================================================ 5. herd


def _herd_clients(addrs, out):
    socks = []
    for a in addrs:
        s = socket.socket()
        s.connect(a)
        s.sendall(HTTP_GET)
        s.setblocking(False)
        socks.append(s)
    out["connected"] = time.time()
    pending = {s: b"" for s in socks}
    deadline = time.time() + 15
    served = 0
    while pending and time.time() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 0.5)
        for s in ready:
            chunk = s.recv(4096)
            if chunk:
                pending[s] += chunk
            else:
                served += pending.pop(s).startswith(b"HTTP/1.1 200")
                s.close()
    for s in pending:
        s.close()
    out["served"] = served


def sec_herd(work, rounds, units, delay_ms, window):
    addrs = [("127.30.0.1", 10000 + i) for i in range(units)]
    p_probe, p_run = free_port(), free_port()
    ron = "".join(ron_unit(f"h{i}", "testkit",
                           cmd_opts([GUEST, "--exit-after", "1"], f", activate_delay_ms: {delay_ms}"),
                           [f'Stream(address: "{a}:{p}")'], HIGH_TRIGGER)
                  for i, (a, p) in enumerate(addrs))
    ron += ron_unit("probe", "exec", cmd_opts([GUEST, "--exit-after", "1"]),
                    [f'Stream(address: "127.0.0.1:{p_probe}")'], HIGH_TRIGGER)
    ron += ron_unit("running", "exec", cmd_opts([GUEST]), [f'Stream(address: "127.0.0.1:{p_run}")'])
    d = Daemon(work, "herd", ron, level="info")
    d.wait_ready()
    first_byte("127.0.0.1", p_run)  # the "running" unit's guest stays up

    def probe_once(fresh, running, parts=None):
        n = d.tail.count("guest stopped", "probe")
        t0 = time.time()
        fb = first_byte("127.0.0.1", p_probe)
        fresh.append(fb)
        d.tail.wait_count("guest stopped", "probe", n + 1)
        if parts is not None:
            # Where this probe's time went: the daemon (connect -> hand-off to a
            # worker, and its own dispatch measure), then the worker, spawn and guest.
            starting = d.tail.find("starting guest", "probe", t0)[0]
            started = d.tail.find("guest started", "probe", t0)[0]
            parts.append({"first_byte_ms": fb * 1e3, "connect_to_handoff_ms": (starting[0] - t0) * 1e3,
                          "dispatch_ms": started[3]["dispatch_us"] / 1e3,
                          "handoff_to_first_byte_ms": (t0 + fb - starting[0]) * 1e3})
        running.append(first_byte("127.0.0.1", p_run))

    for _ in range(5):
        probe_once([], [])
    base_fresh, base_run, herd_fresh, herd_run, all_run, served = [], [], [], [], [], []
    base_parts, herd_parts, herd_cpu = [], [], []
    for r in range(rounds):
        for phase in (("base", "herd") if r % 2 == 0 else ("herd", "base")):
            if phase == "base":
                t_end = time.time() + window
                while time.time() < t_end:
                    probe_once(base_fresh, base_run, base_parts)
                continue
            done0 = {i: d.tail.count("guest stopped", f"h{i}") for i in range(units)}
            out = {}
            machine0, daemon0 = _proc_stat()[0], process_cpu_s(d.proc.pid)
            t0 = time.time()
            th = threading.Thread(target=_herd_clients, args=(addrs, out))
            th.start()
            deadline = t0 + 10
            while time.time() < deadline:
                probe_once(herd_fresh, herd_run, herd_parts)
                if len([e for e in d.tail.find("guest started", None, t0) if e[2].startswith("h")]) >= units:
                    break
            started = [e[0] for e in d.tail.find("guest started", None, t0) if e[2].startswith("h")]
            all_run.append((max(started) - t0) if len(started) >= units else float("inf"))
            th.join()
            served.append(out.get("served", 0))
            for i in range(units):
                d.tail.wait_count("guest stopped", f"h{i}", done0[i] + 1, timeout=15)
            herd_cpu.append({"wall_s": time.time() - t0, "machine_s": _proc_stat()[0] - machine0,
                             "daemon_s": process_cpu_s(d.proc.pid) - daemon0})
            time.sleep(0.2)
    d.stop()
    ms = lambda xs: [x * 1e3 for x in xs]

    def slowest(parts):
        """The slowest 1 % of probes (at least 3): the median of each part of their time."""
        worst = sorted(parts, key=lambda p: p["first_byte_ms"])[-max(3, len(parts) // 100):]
        return {k: median([p[k] for p in worst]) for k in worst[0]} | {"n": len(worst)}

    return {"slowest_base": slowest(base_parts), "slowest_herd": slowest(herd_parts),
            "herd_cpu": {k: median([c[k] for c in herd_cpu]) for k in herd_cpu[0]},
            "dispatch_herd_ms": spread([p["dispatch_ms"] for p in herd_parts]),
            "dispatch_base_ms": spread([p["dispatch_ms"] for p in base_parts]),
            "rounds": rounds, "units": units, "delay_ms": delay_ms,
            "all_running_s": spread(all_run), "served_min": min(served),
            "fresh_base_ms": spread(ms(base_fresh)), "fresh_herd_ms": spread(ms(herd_fresh)),
            "running_base_ms": spread(ms(base_run)), "running_herd_ms": spread(ms(herd_run))}


# ================================================================ 6. engines


def sec_engines(timeout):
    env = dict(os.environ)
    t0 = time.time()
    try:
        p = subprocess.run(["cargo", "test", "-p", "portwake-engine-tests", "--", "--nocapture",
                            "--test-threads", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout, env=env)
        out = p.stdout + p.stderr
        ok = p.returncode == 0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() + (e.stderr or b"").decode() if isinstance(e.stdout, bytes) else ""
        ok = False
    rows = [{"engine": m.group(1), "what": m.group(2), "ms": int(m.group(3))}
            for m in re.finditer(r"MEASURED ([\w-]+): (.*?) = (\d+) ms", out)]
    skipped = re.findall(r"(?i)skip\w*[: ].*", out)[:10]
    return {"ok": ok, "secs": time.time() - t0, "rows": rows, "skipped": skipped,
            "failures": re.findall(r"^test (\S+) \.\.\. FAILED", out, re.M)}


# ================================================================ machine and versions


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def machine():
    mem = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
    os_name = re.search(r'PRETTY_NAME="(.*)"', open("/etc/os-release").read())
    return {
        "cpu": sh("lscpu | sed -n 's/^Model name:\\s*//p' | head -1"),
        "cores": os.cpu_count(), "mem_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(), "os": os_name.group(1) if os_name else "",
        "virt": sh("systemd-detect-virt 2>/dev/null") or "unknown",
        "portwake": sh(f"{PORTWAKE} --version"),
        "git": sh(f"git -C {ROOT} rev-parse --short HEAD") + (" (+ uncommitted changes)" if sh(
            f"git -C {ROOT} status --porcelain --untracked-files=no -- core plugins plugin-api examples") else ""),
        "rustc": sh("rustc --version"),
        "systemd": sh("systemd-socket-activate --version | head -1"),
        "wrk": sh("wrk -v 2>&1 | head -1").split(" Copyright")[0],
        "python": platform.python_version(),
        "somaxconn": int(open("/proc/sys/net/core/somaxconn").read()),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ================================================================ main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="latency,datapath,scale,burst,herd,engines")
    ap.add_argument("--quick", action="store_true", help="few rounds, short windows (a smoke run)")
    ap.add_argument("--rounds", type=float, default=1.0, help="multiply every section's rounds")
    ap.add_argument("--idle-secs", type=float, default=30.0)
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--retry-disturbed", type=float, default=0.6,
                    help="repeat a section once when other processes used more than this many cores")
    args = ap.parse_args()
    m = args.rounds * (0.25 if args.quick else 1.0)
    R = lambda n, lo=2: max(lo, int(round(n * m)))
    idle = 5.0 if args.quick else args.idle_secs
    only = args.only.split(",")
    work = tempfile.mkdtemp(prefix="portwake-bench-")
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = {
        "latency": lambda: sec_latency(work, R(150, 10)),
        "datapath": lambda: sec_datapath(work, R(12, 4), 2, 8, 1),
        "scale": lambda: sec_scale(work, sizes, R(3, 1), idle, R(60, 15), 20),
        "burst": lambda: sec_burst(work, R(2, 1), 1000, 500, [128, 512, 1024], 10.0),
        "herd": lambda: sec_herd(work, R(4, 2), 200, 1000, 1.5),
        "engines": lambda: sec_engines(600),
    }
    results = {"machine": machine(), "args": vars(args), "sections": {}}
    t_all = time.time()
    try:
        for name in plan:
            if name not in only:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            attempts = []
            for attempt in range(2):
                meter = LoadMeter()
                t0 = time.time()
                res = plan[name]()
                res["load"] = meter.stop()
                res["secs"] = time.time() - t0
                attempts.append(res)
                disturbed = res["load"]["other_cores"] + res["load"]["steal_cores"]
                print(f"   {res['secs']:.0f} s, other load {disturbed:.2f} cores", file=sys.stderr, flush=True)
                if name in ("engines", "scale") or disturbed <= args.retry_disturbed or attempt == 1:
                    break
                print("   disturbed by other processes: repeating once", file=sys.stderr, flush=True)
            best = min(attempts, key=lambda r: r["load"]["other_cores"] + r["load"]["steal_cores"])
            best["attempts"] = len(attempts)
            results["sections"][name] = best
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    results["total_secs"] = time.time() - t_all
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    sys.path.insert(0, BENCH)
    sys.dont_write_bytecode = True
    import report
    text = report.render(results)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    def _stop(signum, _frame):
        cleanup()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    main()
