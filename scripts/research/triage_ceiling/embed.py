"""Frozen MiniLM features for TC train/test + Davidson 6k: mean-pool of every layer (7x384), max-pool and CLS of last layer. max_seq 256 (product default)."""
import sys, time, numpy as np, torch
from common import *
from bert import *
torch.set_num_threads(1)
MAXSEQ = int(sys.argv[1]) if len(sys.argv) > 1 else 256
model = load_bert().eval(); tk = tokenizer(MAXSEQ)
sets = {"tc_train": load_tc("train")[0], "tc_test": load_tc("test")[0], "dav6k": load_davidson6k()[0]}
for name, texts in sets.items():
    t0 = time.time(); n = len(texts)
    lens = np.array([len(e.ids) for e in tk.encode_batch(texts)]); order = np.argsort(lens)
    means = np.zeros((n, 7, 384), np.float32); mx = np.zeros((n, 384), np.float32); cls = np.zeros((n, 384), np.float32)
    with torch.no_grad():
        for s in range(0, n, 32):
            idx = order[s:s + 32]; ids, m = batch(tk, [texts[i] for i in idx])
            hs = model(ids, m, all_layers=True)
            for l, h in enumerate(hs): means[idx, l] = mean_pool(h, m).numpy()
            h = hs[-1].masked_fill(m[..., None] == 0, -1e9); mx[idx] = h.max(1).values.numpy(); cls[idx] = hs[-1][:, 0].numpy()
    np.save(f"{CACHE}/{name}_means.npy", means); np.save(f"{CACHE}/{name}_max.npy", mx); np.save(f"{CACHE}/{name}_cls.npy", cls)
    dt = time.time() - t0
    print(f"{name}: {n} items {dt:.1f}s  {1000*dt/n:.1f} ms/item (1 thread, sorted-length batches of 32)", flush=True)
