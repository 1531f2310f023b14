#!/usr/bin/env python3
"""Runs one command and prints {"label", "seconds", "peak_rss_gib", "rc"} as a JSON line: the
wall time and the child's peak resident memory (getrusage of the only child)."""
import json, resource, subprocess, sys, time

label, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
out = p.stdout.decode(errors="replace")
rec = {"label": label, "seconds": round(dt, 3), "peak_rss_gib": round(rss, 3), "rc": p.returncode}
try:  # reference scripts print their own JSON (inner timings) on the last line
    rec["inner"] = json.loads(out.strip().splitlines()[-1])
except Exception:
    try:  # nanscope's --json: one (indented) document
        rec["inner"] = json.loads(out)
    except Exception:
        pass
if p.returncode not in (0, 1):
    rec["stderr"] = p.stderr.decode(errors="replace")[-2000:]
print(json.dumps(rec), flush=True)
