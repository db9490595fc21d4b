#!/usr/bin/env python3
"""Atomic read-modify-writes per request, from a callgrind profile with counts per
instruction: how often a proxy executed a `lock`-prefixed instruction (or an `xchg` with
memory, which locks without the prefix). Each costs tens of cycles even uncontended, so a
proxy can execute fewer instructions than another and still spend more time.

    CALLGRIND_ARGS="--dump-instr=yes --compress-pos=no --compress-strings=no" \\
      KEEP_DIR=/tmp/cg VARIANTS="plain haproxy nginx" REQUESTS=5000 bash benches/instructions.sh
    python3 benches/atomics.py 5000 /tmp/cg/plain.callgrind /tmp/cg/haproxy.callgrind ...

Addresses in such a profile are relative to each object, as objdump prints them. Needs
objdump (binutils)."""

import collections
import re
import subprocess
import sys

LOCKED = re.compile(r"^\s*([0-9a-f]+):\s+(lock\b|xchg\s+\S+,\s*\S*\()")


def locked_addresses(obj, cache={}):
    if obj not in cache:
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj],
                             capture_output=True, text=True).stdout
        cache[obj] = {int(m.group(1), 16) for m in map(LOCKED.match, out.splitlines()) if m}
    return cache[obj]


def profile(path):
    """{(object, function): {address: count}} of each instruction's own count."""
    counts = collections.defaultdict(collections.Counter)
    ob = fn = None
    skip = False
    for line in open(path):
        if line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("fn="):
            fn = line[3:].strip()
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
        elif line.startswith("0x"):
            if skip:
                skip = False
                continue
            parts = line.split()
            counts[(ob, fn)][int(parts[0], 16)] += int(parts[-1])
    return counts


def main():
    requests = int(sys.argv[1])
    for path in sys.argv[2:]:
        per_fn = collections.Counter()
        total = 0
        for (ob, fn), addrs in profile(path).items():
            if not ob or not ob.startswith("/"):
                continue
            locked = locked_addresses(ob)
            n = sum(c for a, c in addrs.items() if a in locked)
            if n:
                per_fn[fn] += n
                total += n
        print(f"{path}: {total / requests:.1f} atomic read-modify-writes per request")
        for fn, n in per_fn.most_common(15):
            print(f"  {n / requests:6.2f}  {fn[:150]}")


if __name__ == "__main__":
    main()
