"""Frozen MiniLM + LR (C=3) and LR+kNN trained on the same 80 % of TC train as the fine-tuning runs (fold 0), threshold on the same 20 % held-out."""
import numpy as np
from heads import *
Xtr, Xte, Xd = feats("mean")
tr, ho = list(StratifiedKFold(5, shuffle=True, random_state=0).split(Xtr, ytr))[0]
for auxw in [0.0, 0.05]:
    X = np.concatenate([Xtr[tr], Xd if auxw else Xd[:0]]); y = np.concatenate([ytr[tr], yd if auxw else yd[:0]]); w = np.concatenate([np.ones(len(tr)), np.full(len(y) - len(tr), auxw)])
    for name, f in [("LR C=3", fit_lr(X, y, w, 3)), ("LR C=3 + kNN k=10 a=1.0", fit_knn_lr(X, y, w, 3, k=10, alpha=1.0, ntc=len(tr)))]:
        report(f"fold0 frozen {name} aux={auxw}", f(Xte), yte, thr_at_recall(f(Xtr[ho]), ytr[ho]), "thr from 20% held-out fold 0 (same split as fine-tuning)")
