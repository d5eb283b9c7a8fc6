#!/usr/bin/env python3
"""What Redis itself spends per number, whatever the service does: the floors issue 31's Redis
targets are measured against. Each figure is redis-server's own CPU (user + system ticks from
/proc) divided by the numbers it served; the client is this script, whose speed does not enter.

  reads:   the CPU of one lookup of a "maybe" number (90% opted out, 10% a filter false
           positive, 50 per batch as at 5% of a 1,000-number batch) under four key layouts:
             hash-buckets   the service's layout: 65,536 hashes (number % 65,536), a HEXISTS a
                            number, in MULTI/EXEC with a GET, as the service sends them;
             intset-buckets the same buckets as sets of integers, a SISMEMBER a number;
             one-set        every number in one set, one SMISMEMBER a batch;
             string-keys    a key per number, one MGET a batch;
             service-meta   no maybe: what the service's own reads in each lookup transaction
                            (the dataset marker, version, generations, continuity entry) and
                            its round trip add, spread over the 50 maybes of a batch.
  staging: the CPU of staging one number of an import (a multi-field HSET per bucket, in
           MULTI/EXEC pieces of --piece numbers, as crates/optout-store-redis/src/import.rs
           sends them, `appendfsync always`) by how many numbers one staging call carries; then of the import's diff, which reads every
           bucket back; and the import rate Redis alone would allow at that cost (one core).

  python3 scripts/redis-floors.py reads --numbers 5000000
  python3 scripts/redis-floors.py staging --numbers 5000000 --chunks 10000,50000,250000,1000000

A redis-server is started on a free loopback port in a scratch directory, and stopped by its PID.
Standard library only.
"""
import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BUCKETS = 65536
VALUE = b"1764806400000,1"  # what the service stores per number: the ms it was added, a source id
MAYBES = 50
TICK = os.sysconf("SC_CLK_TCK")


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of its own, and one connection that sends pipelines and waits them out."""

    def __init__(self, *config):
        self.dir = tempfile.mkdtemp(prefix="redis-floors-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *config])
        deadline = time.time() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"redis-server did not start (log: {self.dir}/redis.log)")
                time.sleep(0.05)

    def send(self, payload):
        """Sends a pipeline and reads until its replies are all in: an ECHO of a marker goes last,
        and Redis answers in order."""
        self.sock.sendall(payload + resp("ECHO", "redis-floors-end"))
        tail = b""
        while not tail.endswith(b"redis-floors-end\r\n"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("redis-server closed the connection")
            if b"-ERR" in chunk or b"-WRONGTYPE" in chunk:
                raise SystemExit(f"redis-server refused a command: {chunk[:200]!r}")
            tail = (tail + chunk)[-64:]

    def reply(self, *args):
        """One command's reply: an int, bytes, None, or a list of those."""
        self.sock.sendall(resp(*args))
        buf = bytearray()

        def line():
            while b"\r\n" not in buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise SystemExit("redis-server closed the connection")
                buf.extend(chunk)
            i = buf.index(b"\r\n")
            out = bytes(buf[:i])
            del buf[:i + 2]
            return out

        def value():
            head = line()
            kind, rest = head[:1], head[1:]
            if kind == b":":
                return int(rest)
            if kind == b"$":
                size = int(rest)
                if size < 0:
                    return None
                while len(buf) < size + 2:
                    buf.extend(self.sock.recv(1 << 16))
                out = bytes(buf[:size])
                del buf[:size + 2]
                return out
            if kind == b"*":
                return [value() for _ in range(int(rest))]
            raise SystemExit(f"redis-server answered {head!r}")

        return value()

    def used_memory_mb(self):
        for line in self.reply("INFO", "memory").split(b"\r\n"):
            if line.startswith(b"used_memory:"):
                return int(line.split(b":")[1]) / 1e6
        raise SystemExit("INFO memory has no used_memory")

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        self.sock.close()
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def numbers_of(count, seed=7):
    return random.Random(seed).sample(range(1_000_000_000, 10_000_000_000), count)


def key_of(layout, n):
    """The key holding `n` in a layout: loads, checks and lookups all name keys through this."""
    return {"hash-buckets": f"d:{n % BUCKETS}", "intset-buckets": f"s:{n % BUCKETS}",
            "one-set": "all", "string-keys": f"n:{n}"}[layout]


def load(r, layout, numbers):
    batch = []
    for n in numbers:
        if layout == "hash-buckets":
            batch.append(resp("HSET", key_of(layout, n), n, VALUE))
        elif layout == "string-keys":
            batch.append(resp("SET", key_of(layout, n), VALUE))
        else:
            batch.append(resp("SADD", key_of(layout, n), n))
        if len(batch) == 20000:
            r.send(b"".join(batch))
            batch = []
    r.send(b"".join(batch))


def held(r, layout, n):
    """Whether `n` is held, asked the way the layout's lookups ask."""
    if layout == "hash-buckets":
        return r.reply("HEXISTS", key_of(layout, n), n) == 1
    if layout == "intset-buckets":
        return r.reply("SISMEMBER", key_of(layout, n), n) == 1
    if layout == "one-set":
        return r.reply("SMISMEMBER", key_of(layout, n), n) == [1]
    return r.reply("MGET", key_of(layout, n)) == [VALUE]


def check_loaded(r, layout, numbers):
    """The lookups measured must find what was loaded and not what was not, or the figures
    measure misses of a wrong key."""
    for n in numbers[:: max(1, len(numbers) // 20)]:
        if not held(r, layout, n):
            raise SystemExit(f"{layout}: a loaded number is not found; the layout is wrong")
    loaded = set(numbers)
    absent = next(n for n in range(10**9, 10**10) if n not in loaded)
    if held(r, layout, absent):
        raise SystemExit(f"{layout}: a number never loaded is found; the layout is wrong")


def lookups(layout, numbers, batches, rng):
    out = []
    for _ in range(batches):
        maybes = [rng.choice(numbers) if rng.random() < 0.9 else rng.randrange(10**9, 10**10)
                  for _ in range(MAYBES)]
        if layout == "service-meta":
            # The service's own reads around any layout's: its transaction with the dataset
            # marker, the version, both generations and the continuity entry, and no maybe.
            out.append(resp("MULTI") + resp("HGET", "marker", "dataset_id") + resp("GET", "version")
                       + resp("GET", "gen:1") + resp("GET", "gen:2")
                       + resp("HGET", "ids", "1764806400000-0") + resp("EXEC"))
            continue
        cmds = [resp("MULTI"), resp("GET", "version")]
        if layout == "hash-buckets":
            cmds += [resp("HEXISTS", key_of(layout, n), n) for n in maybes]
        elif layout == "intset-buckets":
            cmds += [resp("SISMEMBER", key_of(layout, n), n) for n in maybes]
        elif layout == "one-set":
            cmds.append(resp("SMISMEMBER", "all", *maybes))
        else:
            cmds.append(resp("MGET", *[key_of(layout, n) for n in maybes]))
        cmds.append(resp("EXEC"))
        out.append(b"".join(cmds))
    return out


def reads(args):
    numbers = numbers_of(args.numbers)
    rng = random.Random(11)
    print(f"| layout | Redis used_memory | Redis CPU per maybe, {args.numbers:,} numbers "
          f"(median of {args.rounds}; the rounds) |")
    print("|---|---|---|")
    for layout in args.layouts.split(","):
        r = Redis("--appendonly", "no")
        try:
            if layout == "service-meta":
                load(r, "hash-buckets", numbers)
                r.send(resp("HSET", "marker", "dataset_id", "d") + resp("SET", "version", "1-0")
                       + resp("SET", "gen:1", 1) + resp("SET", "gen:2", 1)
                       + resp("HSET", "ids", "1764806400000-0", 1))
            else:
                load(r, layout, numbers)
                check_loaded(r, layout, numbers)
            mb = r.used_memory_mb()
            batches = lookups(layout, numbers, args.batches, rng)
            rounds = []
            for _ in range(args.rounds):
                before = r.cpu()
                # The service's transactions each in a round trip of its own, as the service's
                # lookups mostly are; the layouts' 40 to a write, so that only their reads count.
                per_send = 1 if layout == "service-meta" else 40
                for i in range(0, len(batches), per_send):
                    r.send(b"".join(batches[i:i + per_send]))
                rounds.append((r.cpu() - before) * 1e6 / (args.batches * MAYBES))
        finally:
            r.stop()
        median = sorted(rounds)[len(rounds) // 2]
        print(f"| {layout} | {mb:.0f} MB | **{median:.2f} us** "
              f"({', '.join('%.2f' % x for x in rounds)}) |", flush=True)


def diff_reads(r, buckets):
    """The import's diff (crates/optout-store-redis/src/import.rs `diff_group`): per bucket, the
    current generation's HGETALL, the staged one's HKEYS and the other type's HKEYS, a pipeline a
    group of 256 buckets. A first seed's current and other generations are empty."""
    for first in range(0, buckets, 256):
        r.send(b"".join(
            resp("HGETALL", f"old:{b}") + resp("HKEYS", f"d:{b}") + resp("HKEYS", f"other:{b}")
            for b in range(first, min(first + 256, buckets))))


def staging(args):
    numbers = numbers_of(args.numbers)
    print(f"| numbers per staging call | numbers per HSET | Redis CPU per number: staging | "
          f"the diff's reads | both | the rate Redis alone allows "
          f"({args.numbers:,} numbers, `appendfsync always`) |")
    print("|---|---|---|---|---|---|")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r = Redis("--appendonly", "yes", "--appendfsync", "always")
        try:
            before = r.cpu()
            commands = 0
            for i in range(0, len(numbers), chunk):
                by_bucket = {}
                for n in numbers[i:i + chunk]:
                    by_bucket.setdefault(n % BUCKETS, []).append(n)
                commands += len(by_bucket)
                # One multi-field HSET a bucket (every number of `ns` shares its key), in
                # MULTI/EXEC pieces of about `--piece` numbers as the service sends them (0: a
                # plain pipeline).
                out, in_piece = [], 0
                for ns in by_bucket.values():
                    if args.piece and in_piece == 0:
                        out.append(resp("MULTI"))
                    out.append(resp("HSET", key_of("hash-buckets", ns[0]),
                                    *[x for n in ns for x in (n, VALUE)]))
                    in_piece += len(ns)
                    if args.piece and in_piece >= args.piece:
                        out.append(resp("EXEC"))
                        in_piece = 0
                if args.piece and in_piece:
                    out.append(resp("EXEC"))
                r.send(b"".join(out))
            staged = r.cpu() - before
            before = r.cpu()
            diff_reads(r, BUCKETS)
            diffed = r.cpu() - before
            check_loaded(r, "hash-buckets", numbers)
        finally:
            r.stop()
        per = [x * 1e6 / len(numbers) for x in (staged, diffed, staged + diffed)]
        print(f"| {chunk:,} | {len(numbers) / commands:.1f} | **{per[0]:.2f} us** | {per[1]:.2f} us "
              f"| {per[2]:.2f} us | {f'{1e3 / per[2]:.0f} k/s' if per[2] else 'too fast to time'} |",
              flush=True)


def main():
    global BUCKETS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    rd = sub.add_parser("reads", help="CPU per maybe by key layout")
    rd.add_argument("--numbers", type=int, default=5_000_000)
    rd.add_argument("--layouts",
                    default="hash-buckets,intset-buckets,one-set,string-keys,service-meta")
    rd.add_argument("--batches", type=int, default=10_000)
    rd.add_argument("--buckets", type=int, default=BUCKETS,
                    help="buckets of the hash- and intset-bucket layouts")
    rd.add_argument("--rounds", type=int, default=3)
    st = sub.add_parser("staging", help="CPU per staged number by staging call size")
    st.add_argument("--numbers", type=int, default=5_000_000)
    st.add_argument("--chunks", default="10000,50000,250000,1000000")
    st.add_argument("--piece", type=int, default=4096,
                    help="numbers per MULTI/EXEC, as the service stages (0: a plain pipeline)")
    args = p.parse_args()
    BUCKETS = getattr(args, "buckets", None) or BUCKETS
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is missing: bash scripts/test.sh installs it")
    reads(args) if args.what == "reads" else staging(args)


if __name__ == "__main__":
    main()
