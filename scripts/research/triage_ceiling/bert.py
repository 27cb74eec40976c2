"""Minimal BERT (MiniLM-L6) in torch; weights read from safetensors by hand (no transformers)."""
import json, struct, math
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import tokenizers
from common import MODEL_DIR

def load_safetensors(path):
    f = open(path, "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]; dt = {"F32": np.float32, "F16": np.float16, "I64": np.int64}[v["dtype"]]
        out[k] = torch.from_numpy(np.array(buf[base + a: base + b]).view(dt).reshape(v["shape"]).copy())
        if out[k].dtype == torch.float16: out[k] = out[k].float()
    return out

class Layer(nn.Module):
    def __init__(s, H=384, I=1536, nh=12):
        super().__init__(); s.nh = nh
        s.q = nn.Linear(H, H); s.k = nn.Linear(H, H); s.v = nn.Linear(H, H); s.o = nn.Linear(H, H)
        s.ln1 = nn.LayerNorm(H, eps=1e-12); s.i = nn.Linear(H, I); s.out = nn.Linear(I, H); s.ln2 = nn.LayerNorm(H, eps=1e-12)
        s.drop = nn.Dropout(0.1)
    def forward(s, x, bias):
        B, T, H = x.shape; d = H // s.nh
        sp = lambda t: t.view(B, T, s.nh, d).transpose(1, 2)
        q, k, v = sp(s.q(x)), sp(s.k(x)), sp(s.v(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1 if s.training else 0.0)
        a = a.transpose(1, 2).reshape(B, T, H)
        x = s.ln1(x + s.drop(s.o(a)))
        return s.ln2(x + s.drop(s.out(F.gelu(s.i(x)))))

class Bert(nn.Module):
    def __init__(s, L=6, H=384):
        super().__init__()
        s.we = nn.Embedding(30522, H); s.pe = nn.Embedding(512, H); s.te = nn.Embedding(2, H)
        s.ln = nn.LayerNorm(H, eps=1e-12); s.layers = nn.ModuleList([Layer() for _ in range(L)]); s.drop = nn.Dropout(0.1)
    def load(s, w):
        sd = {"we.weight": w["embeddings.word_embeddings.weight"], "pe.weight": w["embeddings.position_embeddings.weight"],
              "te.weight": w["embeddings.token_type_embeddings.weight"], "ln.weight": w["embeddings.LayerNorm.weight"],
              "ln.bias": w["embeddings.LayerNorm.bias"]}
        m = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense",
             "ln1": "attention.output.LayerNorm", "i": "intermediate.dense", "out": "output.dense", "ln2": "output.LayerNorm"}
        for i in range(len(s.layers)):
            for a, b in m.items():
                for p in ("weight", "bias"): sd[f"layers.{i}.{a}.{p}"] = w[f"encoder.layer.{i}.{b}.{p}"]
        s.load_state_dict(sd); return s
    def forward(s, ids, mask, all_layers=False):
        T = ids.shape[1]
        x = s.we(ids) + s.pe(torch.arange(T, device=ids.device)[None]) + s.te(torch.zeros_like(ids))
        x = s.drop(s.ln(x))
        bias = mask[:, None, None, :].bool()  # True = attend; a boolean mask also suits bf16 autocast
        hs = [x]
        for l in s.layers:
            x = l(x, bias); hs.append(x)
        return hs if all_layers else x

def tokenizer(max_seq):
    tk = tokenizers.Tokenizer.from_file(MODEL_DIR + "/tokenizer.json")
    tk.no_padding(); tk.enable_truncation(max_seq)
    return tk

def batch(tk, texts):
    enc = tk.encode_batch(texts); T = max(len(e.ids) for e in enc)
    ids = np.zeros((len(texts), T), np.int64); m = np.zeros((len(texts), T), np.int64)
    for j, e in enumerate(enc): ids[j, :len(e.ids)] = e.ids; m[j, :len(e.ids)] = 1
    return torch.from_numpy(ids), torch.from_numpy(m)

def mean_pool(h, m):
    mf = m[..., None].float(); return (h * mf).sum(1) / mf.sum(1).clamp(min=1)

def load_bert():
    return Bert().load(load_safetensors(MODEL_DIR + "/model.safetensors"))
