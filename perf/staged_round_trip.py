#!/usr/bin/env python3
"""Where a staged chunk's round trip goes, from two KVF_CUDA_IPC_TRACE=2 logs of one sender and
its receiver (both print "cuda_ipc timeline: <steady-clock us> <mark>"; the clock is the host's,
shared by both processes). The k-th chunk the sender launched (L) is the k-th Scatter the receiver
took (R); the k-th answer it sent (W) is the k-th the sender took (A): one sender, messages in order.
Usage: staged_round_trip.py SENDER_LOG RECEIVER_LOG"""
import re
import sys


def marks(path, kinds):
    out = {k: [] for k in kinds}
    for t, k in re.findall(r"cuda_ipc timeline: ([0-9.]+) (\w)", open(path, errors="replace").read()):
        if k in out:
            out[k].append(float(t))
    return {k: sorted(v) for k, v in out.items()}


def stats(xs):
    if not xs:
        return "none"
    xs = sorted(xs)
    return f"median {xs[len(xs) // 2]:.1f} us, p90 {xs[len(xs) * 9 // 10]:.1f}, max {xs[-1]:.1f} ({len(xs)})"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    s = marks(sys.argv[1], "LA")
    r = marks(sys.argv[2], "RW")
    n = min(len(s["L"]), len(r["R"]))
    m = min(len(r["W"]), len(s["A"]))
    print("staged round trip: Scatter sent -> received (L->R):", stats([r["R"][i] - s["L"][i] for i in range(n)]))
    print("staged round trip: received -> answered (R->W, the GPU copy and scatter):",
          stats([r["W"][i] - r["R"][i] for i in range(min(len(r["R"]), len(r["W"])))]))
    print("staged round trip: answer sent -> taken (W->A):", stats([s["A"][i] - r["W"][i] for i in range(m)]))
    print("staged round trip: launched -> answer taken (L->A):",
          stats([s["A"][i] - s["L"][i] for i in range(min(len(s["L"]), len(s["A"])))]))


main()
