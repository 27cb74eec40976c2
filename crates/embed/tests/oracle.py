"""Reference oracles for crates/embed's tests.

  oracle.py tokenize MODEL_DIR   stdin: JSON list of strings  -> stdout: JSON list of id lists
                                 (Hugging Face `tokenizers` on MODEL_DIR/tokenizer.json, no truncation/padding)
  oracle.py forward MODEL_DIR    stdin: JSON list of id lists -> stdout: JSON list of embeddings
                                 (numpy BERT forward + mean pooling + L2 norm; needs only numpy)

The forward pass follows /work/emb-exp/minilm_np.py (validated against sentence-transformers'
published similarity for all-MiniLM-L6-v2), with safetensors parsed by hand so torch and the
`safetensors` package are not needed.
"""
import json
import math
import os
import struct
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def tokenize(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    texts = json.load(sys.stdin)
    return [tok.encode(t).ids for t in texts]


def load_safetensors(path):
    import numpy as np

    with open(path, "rb") as f:
        raw = f.read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    dtypes = {"F32": np.float32, "F16": np.float16}
    out = {}
    for name, meta in header.items():
        # Checkpoints also carry integer buffers (embeddings.position_ids) the forward pass never reads.
        if name == "__metadata__" or meta["dtype"] not in dtypes:
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(raw[base + start : base + end], dtype=dtypes[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"]).astype(np.float32)
    return out


def forward(model_dir):
    import numpy as np

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    W = load_safetensors(os.path.join(model_dir, "model.safetensors"))
    eps = cfg.get("layer_norm_eps", 1e-12)
    nh = cfg["num_attention_heads"]
    erf = np.vectorize(math.erf, otypes=[np.float64])

    def layer_norm(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    def linear(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    out = []
    for ids in json.load(sys.stdin):
        L = len(ids)
        h = (
            W["embeddings.word_embeddings.weight"][ids]
            + W["embeddings.position_embeddings.weight"][:L]
            + W["embeddings.token_type_embeddings.weight"][0][None]
        ).astype(np.float64)
        h = layer_norm(h, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
        H = h.shape[-1]
        dh = H // nh
        for l in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{l}."
            q = linear(h, p + "attention.self.query").reshape(L, nh, dh).transpose(1, 0, 2)
            k = linear(h, p + "attention.self.key").reshape(L, nh, dh).transpose(1, 2, 0)
            v = linear(h, p + "attention.self.value").reshape(L, nh, dh).transpose(1, 0, 2)
            s = (q @ k) / math.sqrt(dh)
            s = s - s.max(-1, keepdims=True)
            e = np.exp(s)
            a = e / e.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(1, 0, 2).reshape(L, H)
            h = layer_norm(linear(ctx, p + "attention.output.dense") + h, W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
            it = linear(h, p + "intermediate.dense")
            it = 0.5 * it * (1.0 + erf(it / math.sqrt(2.0)))
            h = layer_norm(linear(it, p + "output.dense") + h, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
        pooled = h.mean(0)
        pooled = pooled / max(np.linalg.norm(pooled), 1e-12)
        out.append([float(x) for x in pooled])
    return out


if __name__ == "__main__":
    mode, model_dir = sys.argv[1], sys.argv[2]
    result = {"tokenize": tokenize, "forward": forward}[mode](model_dir)
    json.dump(result, sys.stdout)
