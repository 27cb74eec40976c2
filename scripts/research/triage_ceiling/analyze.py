"""Bootstrap 90 % CI of oracle skip@99 on TC test for saved score vectors; lowest-scored toxic items."""
import sys, glob, numpy as np
from common import *
Xte, yte = load_tc("test")
rng = np.random.default_rng(0)
P, N = np.where(yte == 1)[0], np.where(yte == 0)[0]
def oracle(s, y): return skip_recall(s, y, thr_at_recall(s, y))[0]
for f in sorted(glob.glob(f"{CACHE}/*_test.npy")):
    if "means" in f or "e5_tc" in f: continue
    s = np.load(f)
    if s.ndim != 1: continue
    bs = []
    for _ in range(300):
        idx = np.concatenate([rng.choice(P, len(P)), rng.choice(N, len(N))]); bs.append(oracle(s[idx], yte[idx]))
    lo = np.argsort(s[P])[:5]; rank = [f"{np.mean(s[N] < s[P][i]):.2f}" for i in lo]
    print(f"{f.split('/')[-1]:55s} oracle {oracle(s,yte):.3f}  boot90 [{np.percentile(bs,5):.3f}, {np.percentile(bs,95):.3f}]  5 lowest toxic at benign-quantile {rank}")
if len(sys.argv) > 1:
    s = np.load(sys.argv[1]); lo = np.argsort(s[P])[:6]
    for i in lo: print(f"  {np.mean(s[N] < s[P][i]):.3f}  {Xte[P[i]][:100]!r}")
