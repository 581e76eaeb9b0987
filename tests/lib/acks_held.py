#!/usr/bin/env python3
"""Checks an owner node's stagerd log: each time an in-sync replica was lost, write
acknowledgements were held (engine: "write acknowledgements wait ... generation=N") until the
cluster thread had the record say which replicas are in sync and let them out ("the record says
replicas [...] are in sync (copies generation N); K held write acknowledgement(s) let out"; the
code lets them out only after that record is in etcd). Usage: acks_held.py LOG [MIN_HOLDS].
Prints one line: each hold, how long it lasted, how many writes waited, the replicas the record
named in sync then; exits 1 when a hold was never released or there were fewer than MIN_HOLDS."""
import re
import sys
from datetime import datetime

TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def at(line):
    m = TS.match(line)
    return datetime.fromisoformat(m.group(1)[:26]) if m else None


def main():
    path = sys.argv[1]
    want = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    held = {}  # generation -> when the hold began
    done = []
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    for line in lines:
        m = re.search(r"write acknowledgements wait until the cluster records .*generation=(\d+)", line)
        if m and int(m.group(1)) >= 2:
            held[int(m.group(1))] = at(line)
            continue
        m = re.search(r"replicas (\[.*\]) are in sync \(copies generation (\d+)\); (\d+) held write", line)
        if m and int(m.group(2)) in held:
            gen = int(m.group(2))
            t0 = held.pop(gen)
            done.append((gen, (at(line) - t0).total_seconds() * 1000, int(m.group(3)), m.group(1)))
    if held:
        print(f"never released: generations {sorted(held)}")
        return 1
    if len(done) < want:
        print(f"{len(done)} hold(s), expected at least {want}")
        return 1
    print(
        f"{len(done)} hold(s): "
        + ", ".join(f"{ms:.0f} ms ({n} writes waited; in sync then: {s})" for _, ms, n, s in done)
    )
    return 0


sys.exit(main())
