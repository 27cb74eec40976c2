"""Q3 partial: e5-small-q4 vs MiniLM, TC train only, 5-fold OOF (no Davidson, no test: e5 encoding of TC test did not fit the time budget)."""
import numpy as np
from heads import *
E = nrm(np.load(f"{CACHE}/e5_tc_train.npy")); M = nrm(np.load(f"{CACHE}/tc_train_means.npy")[:, 6])
for name, X in [("MiniLM mean", M), ("e5-small-q4", E), ("concat MiniLM+e5", np.concatenate([M, E], 1))]:
    for C in [1, 3, 10]:
        oof = np.zeros(len(ytr))
        for tr, ho in StratifiedKFold(5, shuffle=True, random_state=0).split(X, ytr):
            oof[ho] = fit_lr(X[tr], ytr[tr], np.ones(len(tr)), C)(X[ho])
        t = thr_at_recall(oof, ytr); print(f"{name:18s} LR C={C:<3} TC-only OOF AUC {auc(oof, ytr):.3f}  OOF skip@99 {skip_recall(oof, ytr, t)[0]:.3f}  skip@97 {skip_recall(oof, ytr, thr_at_recall(oof, ytr, 0.97))[0]:.3f}", flush=True)
