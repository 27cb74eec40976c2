#!/usr/bin/env python3
"""Cross-checks for crates/gguf against independent implementations (run by hand; not part of CI).

    python3.11 scripts/oracle/gguf_oracle.py

1. Writes tiny models with the Rust writer (cargo example `write_tiny`): seed S with F32 weights, and seed S
   with MXFP4 experts + Q8_0 dense weights.
2. Reads them with PyPI `gguf` (GGUFReader): architecture, hyper-parameter keys, tensor names/shapes/types
   as llama.cpp's gpt-oss loader wants them, vocabulary against the o200k_base.tiktoken ranks.
3. Quantizes the F32 model's tensors with gguf-py's numpy MXFP4/Q8_0 and requires byte equality with what the
   Rust quantizers wrote.
4. Builds scripts/oracle/gguf_llama_check.cpp against the static llama.cpp that llama-cpp-sys-2 built in target/,
   loads both models, and requires finite logits, harmony EOG ids, and llama.cpp's own BPE tokenization to equal
   openai-harmony's ids on a set of texts.

openai-harmony reads its vocabulary from $TIKTOKEN_ENCODINGS_BASE; we point it at the copy inside the
tiktoken-rs crate source (no download).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import quants

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SEED = 42
TEXTS = [
    "Hello world!",
    " leading space and  double  spaces\n\nnew paragraphs\r\n",
    "日本語のテキスト, emojis 🤖🔥, Ünïcödé",
    "fn main() { let x = 42; println!(\"{x}\"); }",
    "Numbers 1234567 and 3.14159, URLs http://x.co/a?b=c",
    "I'M SHOUTING don't won't they're",
    "\t\ttabs\tand trailing   ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def tiktoken_file() -> str:
    hits = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/tiktoken-rs-0.12.1/assets/o200k_base.tiktoken"))
    if not hits:
        fail("tiktoken-rs 0.12.1 source not found in ~/.cargo/registry (run a cargo build first)")
    return hits[0]


def harmony_encoding(vocab_path: str):
    tmp = tempfile.mkdtemp()
    os.symlink(vocab_path, os.path.join(tmp, "o200k_base.tiktoken"))
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = tmp
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def write_tiny(path: str, experts: str, dense: str) -> None:
    subprocess.run(
        ["cargo", "run", "-q", "-p", "safeguard-gguf", "--example", "write_tiny", "--", path, str(SEED), experts, dense],
        cwd=ROOT,
        check=True,
    )


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        fail(f"missing key {key}")
    return f.contents()


def check_metadata(reader: gguf.GGUFReader) -> None:
    expect = {
        "general.architecture": "gpt-oss",
        "gpt-oss.block_count": 2,
        "gpt-oss.embedding_length": 64,
        "gpt-oss.attention.head_count": 4,
        "gpt-oss.attention.head_count_kv": 2,
        "gpt-oss.attention.key_length": 16,
        "gpt-oss.expert_count": 4,
        "gpt-oss.expert_used_count": 2,
        "gpt-oss.expert_feed_forward_length": 64,
        "gpt-oss.attention.sliding_window": 128,
        "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.original_context_length": 4096,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.bos_token_id": 199998,
        "tokenizer.ggml.eos_token_id": 200002,
        "tokenizer.ggml.padding_token_id": 199999,
    }
    for k, v in expect.items():
        got = field(reader, k)
        if got != v:
            fail(f"{k} = {got!r}, expected {v!r}")
    for k, v in {"gpt-oss.rope.freq_base": 150000.0, "gpt-oss.rope.scaling.factor": 32.0,
                 "gpt-oss.attention.layer_norm_rms_epsilon": 1e-5}.items():
        if abs(field(reader, k) - v) > 1e-9 * max(1.0, v):
            fail(f"{k} = {field(reader, k)}")
    # every tensor the gpt-oss arch declares must be present with llama.cpp's shapes
    names = {t.name: t for t in reader.tensors}
    want = {"token_embd.weight": (64, 201088), "output_norm.weight": (64,), "output.weight": (64, 201088)}
    for i in range(2):
        b = f"blk.{i}."
        want.update({
            b + "attn_norm.weight": (64,), b + "post_attention_norm.weight": (64,),
            b + "attn_q.weight": (64, 64), b + "attn_q.bias": (64,),
            b + "attn_k.weight": (64, 32), b + "attn_k.bias": (32,),
            b + "attn_v.weight": (64, 32), b + "attn_v.bias": (32,),
            b + "attn_output.weight": (64, 64), b + "attn_output.bias": (64,),
            b + "attn_sinks.weight": (4,),
            b + "ffn_gate_inp.weight": (64, 4), b + "ffn_gate_inp.bias": (4,),
            b + "ffn_gate_exps.weight": (64, 64, 4), b + "ffn_gate_exps.bias": (64, 4),
            b + "ffn_up_exps.weight": (64, 64, 4), b + "ffn_up_exps.bias": (64, 4),
            b + "ffn_down_exps.weight": (64, 64, 4), b + "ffn_down_exps.bias": (64, 4),
        })
    if set(names) != set(want):
        fail(f"tensor names differ: extra {set(names) - set(want)}, missing {set(want) - set(names)}")
    for n, shape in want.items():
        if tuple(int(x) for x in names[n].shape) != shape:
            fail(f"{n}: shape {tuple(names[n].shape)}, expected {shape}")
    gguf_arch_tensors = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT_OSS]}
    for n in names:
        base = n.split(".")
        stem = "blk.{bid}." + base[2] if base[0] == "blk" else base[0]
        if stem not in gguf_arch_tensors:
            fail(f"{n} is not a gpt-oss tensor in gguf-py's table")
    print(f"ok: metadata and {len(names)} tensors match llama.cpp's gpt-oss layout")


def check_vocab(reader: gguf.GGUFReader, vocab_path: str) -> None:
    byte_map = {}
    n = 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            byte_map[b] = chr(b)
        else:
            byte_map[b] = chr(256 + n)
            n += 1
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    if len(tokens) != 201088:
        fail(f"{len(tokens)} tokens")
    with open(vocab_path, "rb") as fh:
        for line in fh:
            raw, rank = line.split()
            text = "".join(byte_map[b] for b in base64.b64decode(raw))
            if tokens[int(rank)] != text:
                fail(f"token {int(rank)}: {tokens[int(rank)]!r} != {text!r}")
    if tokens[200006] != "<|start|>" or tokens[200002] != "<|return|>" or tokens[200500] != "<|reserved_200500|>":
        fail("special token texts")
    if any(t != 3 for t in types[199998:]) or any(t != 1 for t in types[:199998]):
        fail("token types")
    merges = field(reader, "tokenizer.ggml.merges")
    if len(merges) != 199998 - 256:
        fail(f"{len(merges)} merges")
    known = set(tokens)
    for m in merges:
        a, b = m.split(" ")
        if a + b not in known:
            fail(f"merge {m!r} produces no token")
    print(f"ok: {len(tokens)} tokens match o200k_base ranks, specials are CONTROL, {len(merges)} merges")


def check_quantizers(f32: gguf.GGUFReader, quant: gguf.GGUFReader) -> None:
    qt = {t.name: t for t in quant.tensors}
    checked = 0
    for t in f32.tensors:
        other = qt[t.name]
        if other.tensor_type == Q.F32:
            if not np.array_equal(np.asarray(t.data), np.asarray(other.data)):
                fail(f"{t.name}: F32 tensors differ between the two files")
            continue
        values = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        ours = np.asarray(other.data).reshape(-1)
        ref = quants.quantize(values, other.tensor_type).reshape(-1)
        if not np.array_equal(ours, ref):
            bad = int(np.argmax(ours != ref))
            fail(f"{t.name} ({other.tensor_type.name}): byte {bad} differs from gguf-py ({ours[bad]} vs {ref[bad]})")
        deq = quants.dequantize(np.asarray(other.data), other.tensor_type).reshape(values.shape)
        rel = np.abs(deq - values).max() / np.abs(values).max()
        if rel > (0.25 if other.tensor_type == Q.MXFP4 else 0.01):
            fail(f"{t.name}: dequantized error {rel}")
        checked += 1
    print(f"ok: {checked} quantized tensors are byte-identical to gguf-py's MXFP4/Q8_0 quantizers")


def build_checker() -> str:
    outs = sorted(glob.glob(os.path.join(ROOT, "target/debug/build/llama-cpp-sys-2-*/out/lib/libllama.a")), key=os.path.getmtime)
    if not outs:
        fail("no llama.cpp static build under target/debug/build (build safeguard-engine with --features llama first)")
    out = os.path.dirname(os.path.dirname(outs[-1]))
    exe = os.path.join(tempfile.mkdtemp(), "gguf_llama_check")
    subprocess.run(
        ["g++", "-O1", "-std=c++17", os.path.join(ROOT, "scripts/oracle/gguf_llama_check.cpp"), "-I", f"{out}/include",
         "-L", f"{out}/lib", "-lllama", "-lggml", "-lggml-cpu", "-lggml-base", "-lpthread", "-fopenmp", "-ldl", "-o", exe],
        check=True,
    )
    return exe


def check_llama(exe: str, path: str, enc) -> None:
    prompt = enc.encode("<|start|>user<|message|>Is this spam? Buy now!<|end|><|start|>assistant", allowed_special="all")
    run = subprocess.run([exe, path, ",".join(map(str, prompt)), *TEXTS], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"llama.cpp check failed: {run.stdout}{run.stderr}")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    head = lines[0]
    if not head.get("loaded") or head["n_vocab"] != 201088 or head["bos"] != 199998 or head["eos"] != 200002:
        fail(f"llama.cpp model info {head}")
    for line in lines:
        if "text" in line:
            want = enc.encode(TEXTS[line["text"]], allowed_special=set())
            if line["ids"] != want:
                fail(f"llama.cpp tokenizes {TEXTS[line['text']]!r} as {line['ids']}, harmony as {want}")
        if "eog" in line and sorted(line["eog"]) != [199999, 200002, 200012]:
            fail(f"EOG ids {line['eog']} (want endoftext, return, call; not end)")
        if "pos" in line and not line["finite"]:
            fail(f"non-finite logits at position {line['pos']}")
    n_pos = sum(1 for line in lines if "pos" in line)
    if n_pos != len(prompt):
        fail(f"{n_pos} logit rows for {len(prompt)} tokens")
    print(f"ok: llama.cpp loads {os.path.basename(path)}, {len(TEXTS)} texts tokenize like harmony, {n_pos} finite logit rows")


def main() -> None:
    vocab_path = tiktoken_file()
    enc = harmony_encoding(vocab_path)
    tmp = tempfile.mkdtemp()
    f32_path, quant_path = os.path.join(tmp, "tiny_f32.gguf"), os.path.join(tmp, "tiny_quant.gguf")
    write_tiny(f32_path, "f32", "f32")
    write_tiny(quant_path, "mxfp4", "q8_0")
    f32, quant = gguf.GGUFReader(f32_path), gguf.GGUFReader(quant_path)
    check_metadata(f32)
    check_metadata(quant)
    check_vocab(f32, vocab_path)
    check_quantizers(f32, quant)
    exe = build_checker()
    check_llama(exe, f32_path, enc)
    check_llama(exe, quant_path, enc)
    print("all gguf oracle checks passed")


if __name__ == "__main__":
    main()
