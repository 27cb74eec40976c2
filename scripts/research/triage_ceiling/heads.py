"""Q2 (and Q3): cheap heads on frozen features. Threshold = 5-fold OOF on TC train at 99 % recall, refit on all, apply to TC test.
Davidson 6k sample is auxiliary data (weight AUXW, class balance by summed weights) in every fit."""
import sys, time, numpy as np, torch
from common import *
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
torch.set_num_threads(1)
_, ytr = load_tc("train"); _, yte = load_tc("test"); _, yd = load_davidson6k()
nrm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)

def feats(kind, pre=""):
    out = []
    for s in ("tc_train", "tc_test", "dav6k"):
        if kind.startswith("e5"):
            out.append(nrm(np.load(f"{CACHE}/e5_{s}.npy")) if s != "dav6k" else np.zeros((0, 384), np.float32)); continue
        me = np.load(f"{CACHE}/{s}_means.npy")
        parts = {"mean": [nrm(me[:, 6])], "mean+max": [nrm(me[:, 6]), nrm(np.load(f"{CACHE}/{s}_max.npy"))],
                 "mean+cls": [nrm(me[:, 6]), nrm(np.load(f"{CACHE}/{s}_cls.npy"))],
                 "mean L5+L6": [nrm(me[:, 5]), nrm(me[:, 6])], "mean L4+L5+L6": [nrm(me[:, 4]), nrm(me[:, 5]), nrm(me[:, 6])],
                 "mean all 7": [nrm(me[:, l]) for l in range(7)],
                 "mean+max+L5": [nrm(me[:, 6]), nrm(np.load(f"{CACHE}/{s}_max.npy")), nrm(me[:, 5])]}[kind]
        out.append(np.concatenate(parts, 1))
    return out

def weights(y, w):
    wp, wn = w[y == 1].sum(), w[y == 0].sum()
    return np.where(y == 1, w * (wp + wn) / (2 * wp), w * (wp + wn) / (2 * wn))

def fit_lr(X, y, w, C):
    m = LogisticRegression(C=C, max_iter=3000, tol=1e-6); m.fit(X, y, sample_weight=weights(y, w)); return m.decision_function

def fit_mlp(X, y, w, hidden=128, epochs=60, wd=1e-3, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    Xt = torch.tensor(X, dtype=torch.float32); yt = torch.tensor(y, dtype=torch.float32); wt = torch.tensor(weights(y, w), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        for b in torch.randperm(len(X), generator=g).split(64):
            l = (torch.nn.functional.binary_cross_entropy_with_logits(net(Xt[b]).squeeze(-1), yt[b], reduction="none") * wt[b]).mean()
            opt.zero_grad(); l.backward(); opt.step()
    net.eval()
    return lambda Z: net(torch.tensor(Z, dtype=torch.float32)).squeeze(-1).detach().numpy()

def fit_knn_lr(X, y, w, C, k=10, alpha=2.0, ntc=None):
    lr = fit_lr(X, y, w, C); Xtc, ytc = X[:ntc], y[:ntc]   # kNN over TC-train rows only
    def f(Z):
        s = Z @ Xtc.T; nn_ = np.argpartition(-s, k, axis=1)[:, :k]
        return lr(Z) + alpha * 10 * (ytc[nn_].mean(1) - 0.137)
    return f

def run(name, kind, fitter, auxw=0.05, **kw):
    global yd
    Xtr, Xte, Xd = feats(kind); t0 = time.time(); n = min(len(Xd), len(yd)); Xd = Xd[:n]; yd = yd[:n]
    oof = np.zeros(len(ytr))
    for tr, ho in StratifiedKFold(5, shuffle=True, random_state=0).split(Xtr, ytr):
        X = np.concatenate([Xtr[tr], Xd]); y = np.concatenate([ytr[tr], yd]); w = np.concatenate([np.ones(len(tr)), np.full(len(yd), auxw)])
        if fitter is fit_knn_lr: kw["ntc"] = len(tr)
        oof[ho] = fitter(X, y, w, **kw)(Xtr[ho])
    thr = thr_at_recall(oof, ytr); osk = skip_recall(oof, ytr, thr)[0]
    X = np.concatenate([Xtr, Xd]); y = np.concatenate([ytr, yd]); w = np.concatenate([np.ones(len(ytr)), np.full(len(yd), auxw)])
    if fitter is fit_knn_lr: kw["ntc"] = len(ytr)
    f = fitter(X, y, w, **kw); t1 = time.time(); te = f(Xte); inf = (time.time() - t1) / len(Xte)
    np.save(f"{CACHE}/head_{name.replace(' ', '_')}_test.npy", te)
    return report(name, te, yte, thr, f"dim {Xtr.shape[1]}; OOF skip {osk:.3f} AUC {auc(oof, ytr):.3f}; train+5fold {t0 and time.time()-t0:.0f}s; head {1e6*inf:.0f} us/item")

if __name__ == "__main__":
    which = sys.argv[1]
    if which == "lr":
        for kind in ["mean", "mean+max", "mean+cls", "mean L5+L6", "mean L4+L5+L6", "mean all 7", "mean+max+L5"]:
            for C in ([1, 3, 10] if kind == "mean" else [3]):
                run(f"LR C={C} [{kind}]", kind, fit_lr, C=C)
    elif which == "mlp":
        for kind in ["mean", "mean+max"]:
            for h, wd in [(128, 1e-2)]:
                run(f"MLP h={h} wd={wd} ep=30 [{kind}]", kind, fit_mlp, hidden=h, wd=wd, epochs=30)
    elif which == "knn":
        for k, a in [(10, 1.0), (10, 2.0), (25, 2.0)]:
            run(f"LR C=3 + kNN k={k} a={a} [mean]", "mean", fit_knn_lr, C=3, k=k, alpha=a)
    elif which == "knn2":
        for kind in ["mean", "mean+max", "mean L5+L6"]:
            for k, a in ([(5, 1.0), (10, 0.5), (10, 1.0), (5, 0.5)] if kind == "mean" else [(10, 1.0)]):
                run(f"LR C=3 + kNN k={k} a={a} [{kind}]", kind, fit_knn_lr, C=3, k=k, alpha=a)
    elif which == "e5":
        for C in [1, 3, 10]: run(f"e5-small-q4 LR C={C} (TC only)", "e5", fit_lr, C=C)
        run("e5-small-q4 LR C=3 + kNN k=10 a=1.0 (TC only)", "e5", fit_knn_lr, C=3, k=10, alpha=1.0)
    elif which == "noaux":  # MiniLM baseline without Davidson, comparable to the e5 rows
        yd = yd[:0]
        for C in [1, 3]: run(f"LR C={C} [mean] (TC only)", "mean", fit_lr, C=C)
