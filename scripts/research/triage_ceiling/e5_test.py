"""Q3 on test (session 13): multilingual-e5-small (4-bit) alone and concatenated with MiniLM, the product's
recipe (LR C, Davidson 6k at aux weight 0.05, balance by summed weights), 5-fold OOF threshold on TC train at
0.99 and 0.995, refit on all, scored on TC test. Needs embed.py and embed_e5.py caches in CACHE."""
import numpy as np
from heads import *
E = [nrm(np.load(f"{CACHE}/e5_{s}.npy")) for s in ("tc_train", "tc_test", "dav6k")]
M = [nrm(np.load(f"{CACHE}/{s}_means.npy")[:, 6]) for s in ("tc_train", "tc_test", "dav6k")]
C_ = [np.concatenate([m, e], 1) for m, e in zip(M, E)]
for name, (Xtr, Xte, Xd) in [("MiniLM mean", M), ("e5-small-q4", E), ("concat MiniLM+e5", C_)]:
    for C in (1, 3):
        def fit(tr):
            X = np.concatenate([Xtr[tr], Xd]); y = np.concatenate([ytr[tr], yd])
            w = np.concatenate([np.ones(len(tr)), np.full(len(yd), 0.05)])
            return fit_lr(X, y, w, C)
        oof = np.zeros(len(ytr))
        for tr, ho in StratifiedKFold(5, shuffle=True, random_state=0).split(Xtr, ytr):
            oof[ho] = fit(tr)(Xtr[ho])
        test = fit(np.arange(len(ytr)))(Xte)
        for target in (0.99, 0.995):
            report(f"{name} LR C={C} + Dav6k@0.05 (OOF target {target})", test, yte, thr_at_recall(oof, ytr, target),
                   f"OOF AUC {auc(oof, ytr):.3f} OOF skip {skip_recall(oof, ytr, thr_at_recall(oof, ytr, target))[0]:.3f}")
