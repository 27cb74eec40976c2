"""Q1: end-to-end fine-tuning of MiniLM-L6 (mean-pool -> linear) on ToxicChat train (+ Davidson 6k aux).
usage: finetune.py MODE FOLD [EPOCHS] [AUXW]
  MODE: all | top2   (top2 = freeze embeddings + layers 0-3, train layers 4-5 + head)
  FOLD: 0..4 -> 5-fold stratified split of TC train, that fold held out (threshold set there at 99 % recall)
Writes cache/ft_{MODE}_f{FOLD}_{heldout,test}.npy (logits)."""
import sys, time, math, numpy as np, torch, torch.nn as nn
from common import *
from bert import *
torch.set_num_threads(1); torch.manual_seed(0)
MODE, FOLD = sys.argv[1], int(sys.argv[2])
EPOCHS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
AUXW = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
NDAV = int(sys.argv[5]) if len(sys.argv) > 5 else 6000
MAXSEQ, BS = 128, 16
from sklearn.model_selection import StratifiedKFold
Xtr, ytr = load_tc("train"); Xte, yte = load_tc("test"); Xd, yd = load_davidson6k(); _s = np.random.default_rng(1).permutation(len(Xd))[:NDAV]; Xd = [Xd[i] for i in _s]; yd = yd[_s]
tr_idx, ho_idx = list(StratifiedKFold(5, shuffle=True, random_state=0).split(Xtr, ytr))[FOLD]
texts = [Xtr[i] for i in tr_idx] + (Xd if AUXW > 0 else []); y = np.concatenate([ytr[tr_idx], yd if AUXW > 0 else []]).astype(np.float32)
w = np.concatenate([np.ones(len(tr_idx)), np.full(len(Xd), AUXW) if AUXW > 0 else []]).astype(np.float32)
# class balance by summed weights
wp, wn = w[y == 1].sum(), w[y == 0].sum(); w = np.where(y == 1, w * (wp + wn) / (2 * wp), w * (wp + wn) / (2 * wn)).astype(np.float32)

class M(nn.Module):
    def __init__(s):
        super().__init__(); s.bert = load_bert(); s.head = nn.Linear(384, 1)
    def forward(s, ids, m):
        e = mean_pool(s.bert(ids, m), m); e = e / e.norm(dim=-1, keepdim=True)
        return s.head(e * 10).squeeze(-1)   # x10: normalized embedding has tiny scale
model = M(); tk = tokenizer(MAXSEQ)
if MODE == "top2":
    for p in model.bert.parameters(): p.requires_grad = False
    for l in model.bert.layers[4:]:
        for p in l.parameters(): p.requires_grad = True
params = [{"params": [p for p in model.bert.parameters() if p.requires_grad], "lr": 5e-5 if MODE == "all" else 1e-4},
          {"params": model.head.parameters(), "lr": 1e-3}]
opt = torch.optim.AdamW(params, weight_decay=0.01)
lens = np.array([len(e.ids) for e in tk.encode_batch(texts)])
rng = np.random.default_rng(FOLD)
def batches():  # length-bucketed random batches
    perm = rng.permutation(len(texts)); chunks = [perm[i:i + BS * 50] for i in range(0, len(perm), BS * 50)]
    out = []
    for c in chunks:
        c = c[np.argsort(lens[c])]; out += [c[i:i + BS] for i in range(0, len(c), BS)]
    rng.shuffle(out); return out
nsteps = EPOCHS * math.ceil(len(texts) / BS); warm = int(0.06 * nsteps)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (nsteps - s) / (nsteps - warm))))
t0 = time.time(); step = 0
for ep in range(EPOCHS):
    model.train(); tot = 0
    for b in batches():
        ids, m = batch(tk, [texts[i] for i in b])
        logit = model(ids, m)
        loss = (nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(y[b]), reduction="none") * torch.from_numpy(w[b])).sum() / len(b)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        tot += loss.item(); step += 1
        if step % 20 == 0: print(f'  step {step}/{nsteps} {time.time()-t0:.0f}s loss {loss.item():.3f}', flush=True)
    print(f"epoch {ep} loss {tot/step:.4f} {time.time()-t0:.0f}s", flush=True)
train_time = time.time() - t0
def score(X):
    model.eval(); o = np.zeros(len(X), np.float32); L = np.array([len(e.ids) for e in tk.encode_batch(X)]); order = np.argsort(L)
    with torch.no_grad():
        for s in range(0, len(X), 64):
            idx = order[s:s + 64]; ids, m = batch(tk, [X[i] for i in idx]); o[idx] = model(ids, m).numpy()
    return o
t1 = time.time(); ho = score([Xtr[i] for i in ho_idx]); te = score(Xte); inf = (time.time() - t1) / (len(ho_idx) + len(Xte))
tag = f"ft_{MODE}_e{EPOCHS}_a{AUXW}_f{FOLD}"
np.save(f"{CACHE}/{tag}_heldout.npy", ho); np.save(f"{CACHE}/{tag}_test.npy", te); np.save(f"{CACHE}/ho_idx_f{FOLD}.npy", ho_idx)
thr = thr_at_recall(ho, ytr[ho_idx])
print(f"heldout AUC {auc(ho, ytr[ho_idx]):.3f}", flush=True)
report(tag, te, yte, thr, f"thr from 20% held-out fold {FOLD}; train {train_time:.0f}s; infer {1000*inf:.1f} ms/item (1 thread, batched 64)")
