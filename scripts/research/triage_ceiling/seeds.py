"""Deployed-threshold stability: the same heads with 5-fold OOF thresholds from 4 different fold shuffles (the refit model is identical; only the threshold moves). The OOF recall target is argv[1], default 0.99 (e.g. 0.995)."""
import numpy as np
import heads
from heads import *
import sys; TARGET = float(sys.argv[1]) if len(sys.argv) > 1 else 0.99
Xtr, Xte, Xd = feats("mean")
for name, fitter, kw in [("LR C=3 [mean]", fit_lr, dict(C=3)), ("LR C=3 + kNN k=10 a=0.5", fit_knn_lr, dict(C=3, k=10, alpha=0.5)),
                         ("LR C=3 + kNN k=10 a=1.0", fit_knn_lr, dict(C=3, k=10, alpha=1.0))]:
    X = np.concatenate([Xtr, Xd]); y = np.concatenate([ytr, yd]); w = np.concatenate([np.ones(len(ytr)), np.full(len(yd), 0.05)])
    if fitter is fit_knn_lr: kw["ntc"] = len(ytr)
    te = fitter(X, y, w, **kw)(Xte); res = []
    for seed in [0, 1, 2, 3]:
        oof = np.zeros(len(ytr))
        for tr, ho in StratifiedKFold(5, shuffle=True, random_state=seed).split(Xtr, ytr):
            X = np.concatenate([Xtr[tr], Xd]); y = np.concatenate([ytr[tr], yd]); w = np.concatenate([np.ones(len(tr)), np.full(len(yd), 0.05)])
            if fitter is fit_knn_lr: kw["ntc"] = len(tr)
            oof[ho] = fitter(X, y, w, **kw)(Xtr[ho])
        t = thr_at_recall(oof, ytr, TARGET); sk, rc = skip_recall(te, yte, t); res.append(f"seed{seed}: OOF skip {skip_recall(oof, ytr, t)[0]:.3f} -> test rec {rc:.3f} skip {sk:.3f}")
    print(name, " | ".join(res), flush=True)
