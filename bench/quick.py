#!/usr/bin/env python3
"""Quick measurements for the core daemon (release build), printed as Markdown.

  cargo build --release --workspace && python3 bench/quick.py

1. First-byte latency: connect -> first byte from a freshly started guest
   (hello-guest --exit-after 1), portwake + exec plugin vs systemd-socket-activate
   starting the same binary, paired and alternating, N rounds each.
2. Idle cost: a daemon holding 1,000 listeners (100 units x 10): time to ready,
   RSS, CPU ticks and context switches over 10 s with no client.
Absolute times drift on shared machines: compare the two columns of one run.
"""
import os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
GUEST = os.path.join(BIN, "hello-guest")
PORTWAKE = os.path.join(BIN, "portwake")
ROUNDS = int(os.environ.get("ROUNDS", "30"))


def free_port():
    s = socket.socket(socket.AF_INET6)
    s.bind(("::", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def first_byte(port, timeout=10.0):
    """Seconds from connect() to the first byte of the answer."""
    start = time.perf_counter()
    deadline = start + timeout
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.001)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    c.recv(1)
    took = time.perf_counter() - start
    c.close()
    return took


def wait_for(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return False


def portwake_latencies(rounds):
    port = free_port()
    d = tempfile.mkdtemp()
    cfg = os.path.join(d, "host.ron")
    with open(cfg, "w") as f:
        f.write(f'(units: [(name: "b", plugin: "exec", options: (command: ["{GUEST}", "--exit-after", "1"]),'
                f' listen: [Stream(address: "127.0.0.1:{port}")])])')
    log = open(os.path.join(d, "log"), "w+")
    p = subprocess.Popen([PORTWAKE, "run", "--config", cfg, "--control-socket", os.path.join(d, "c.sock")],
                         stderr=log, stdout=subprocess.DEVNULL)
    wait_for(lambda: "ready" in open(log.name).read())
    out = []
    for i in range(rounds):
        out.append(first_byte(port))
        wait_for(lambda: open(log.name).read().count("guest stopped") >= i + 1)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    shutil.rmtree(d)
    return out


def ssa_latency():
    port = free_port()
    p = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", GUEST, "--exit-after", "1"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    # It prints "Listening on …" once the socket is bound.
    p.stderr.readline()
    took = first_byte(port)
    p.wait(timeout=10)
    return took


def idle_cost(units=100, per_unit=10, window=10.0):
    d = tempfile.mkdtemp()
    cfg = os.path.join(d, "host.ron")
    base = 20000
    with open(cfg, "w") as f:
        f.write("(units: [\n")
        for u in range(units):
            ls = ", ".join(f'Stream(address: "127.0.0.1:{base + u * per_unit + i}")' for i in range(per_unit))
            f.write(f'(name: "u{u}", plugin: "exec", options: (command: ["{GUEST}"]), listen: [{ls}]),\n')
        f.write("])\n")
    log = open(os.path.join(d, "log"), "w+")
    start = time.perf_counter()
    p = subprocess.Popen([PORTWAKE, "run", "--log-level", "warn", "--config", cfg, "--control-socket",
                          os.path.join(d, "c.sock")], stderr=log, stdout=subprocess.DEVNULL)
    ok = wait_for(lambda: os.path.exists(os.path.join(d, "c.sock")), 20)
    ready = time.perf_counter() - start
    time.sleep(0.5)

    def stat():
        fields = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
        status = dict(l.split(":", 1) for l in open(f"/proc/{p.pid}/status").read().splitlines() if ":" in l)
        return (int(fields[11]) + int(fields[12]),
                int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"]),
                int(status["VmRSS"].split()[0]))
    t0, c0, _ = stat()
    time.sleep(window)
    t1, c1, rss = stat()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    shutil.rmtree(d)
    return ok, ready, rss, t1 - t0, c1 - c0, units * per_unit


def main():
    if not os.path.exists(PORTWAKE):
        sys.exit("build first: cargo build --release --workspace")
    pw, ssa = [], []
    for _ in range(ROUNDS // 10 or 1):
        pw += portwake_latencies(10)
        ssa += [ssa_latency() for _ in range(10)]
    ms = lambda xs: statistics.median(xs) * 1000
    q = lambda xs, k: sorted(xs)[int(len(xs) * k)] * 1000
    print(f"## First byte from a freshly started guest ({len(pw)} rounds each)\n")
    print("| | median ms | p10 ms | p90 ms |\n|---|---|---|---|")
    print(f"| portwake + exec | {ms(pw):.2f} | {q(pw, .1):.2f} | {q(pw, .9):.2f} |")
    print(f"| systemd-socket-activate | {ms(ssa):.2f} | {q(ssa, .1):.2f} | {q(ssa, .9):.2f} |")
    print(f"\nratio portwake / systemd-socket-activate (medians): {ms(pw) / ms(ssa):.3f}\n")
    ok, ready, rss, ticks, switches, n = idle_cost()
    print(f"## Idle daemon holding {n} listeners\n")
    print(f"- ready (all bound, control socket up): {ready * 1000:.0f} ms")
    print(f"- RSS: {rss / 1024:.1f} MiB")
    print(f"- CPU over 10 s idle: {ticks} ticks ({ticks * 10} ms); context switches: {switches}")


if __name__ == "__main__":
    main()
