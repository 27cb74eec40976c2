#!/usr/bin/env python3
"""Reference logits from Hugging Face transformers for the engine's fidelity oracle.

Chain under test (crates/engine/tests/hf_oracle.rs):
    tiny HF checkpoint (written by Rust from a seed) -> safeguard_gguf::convert_hf -> GGUF -> llama.cpp engine
Reference (this script):
    the same checkpoint -> transformers GptOssForCausalLM (float32, eager attention, CPU) -> logits

The checkpoint is not committed: the Rust test's ignored `write_hf_checkpoints` writes it byte for byte
from a seed (the recipe is the Rust code plus the seed; the sha256 recorded here ties fixture and recipe).
Two variants: f32 experts, and HF-layout MXFP4 experts (`*_blocks`/`*_scales`, dequantized by
transformers on CPU). Prompts are real harmony prompts from crates/harmony/tests/fixtures/render.json.

Outputs in crates/engine/tests/fixtures/ (<name> = hf_f32, hf_mxfp4, hf_f32_exact_yarn):
    <name>.json         recipe, prompts, vocab subset, per-position argmax/max/top-2 gap/logsumexp
    <name>_logits.bin   little-endian f32 [total positions, len(vocab_subset)], prompts in order
hf_f32/hf_mxfp4 use YaRN with truncated ramp bounds (what ggml implements); hf_f32_exact_yarn is the
model as configured (truncate=false, OpenAI's reference) and records how far truncation alone moves it.

Needs: torch, transformers (5.x; tested 5.24.0), safetensors, numpy; a cargo toolchain for the checkpoint.
    pip install torch transformers safetensors
    python3 scripts/oracle/hf_logits.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates/engine/tests/fixtures"
RENDER = ROOT / "crates/harmony/tests/fixtures/render.json"
VARIANTS = ("f32", "mxfp4")
SUBSET_SEED = 20261128
SUBSET_SIZE = 512
# (policy, effort, date, content) picked from render.json: both longer than the 128-token sliding
# window, so the sliding layers' masking is exercised, with different policies, efforts and dates.
PROMPT_CASES = [
    ("spam", "low", None, "plain"),
    ("json_unicode", "high", "2025-11-01", "inject_end_start_developer"),
]
MXFP4_LUT = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def write_checkpoints(work: Path) -> None:
    env = dict(os.environ, SAFEGUARD_HF_ORACLE_DIR=str(work))
    cmd = ["cargo", "test", "-p", "safeguard-engine", "--test", "hf_oracle", "--",
           "--ignored", "--exact", "write_hf_checkpoints"]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def harmony_prompts() -> list[dict]:
    render = json.loads(RENDER.read_text())
    out = []
    for policy, effort, date, content in PROMPT_CASES:
        matches = [c for c in render["cases"] if (c["policy"], c["effort"], c["date"], c["content"]) ==
                   (policy, effort, date, content)]
        # render.json may list the same case twice; it must render to one token sequence.
        if len({tuple(c["tokens"]) for c in matches}) != 1:
            sys.exit(f"render.json: expected one case {policy}/{effort}/{date}/{content}, found {len(matches)}")
        name = f"{policy}/{effort}/{date or 'nodate'}/{content}"
        out.append({"name": name, "tokens": [int(t) for t in matches[0]["tokens"]]})
    return out


def dequantize_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, out, in/32, 16] u8 + [E, out, in/32] u8 -> [E, in, out] f32 (HF's unquantized layout).
    Independent of transformers, to check that it read our MXFP4 layout the same way."""
    lo, hi = blocks & 0x0F, blocks >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # element 2k low, 2k+1 high
    values = MXFP4_LUT[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    e, out_dim = blocks.shape[:2]
    return values.reshape(e, out_dim, -1).transpose(0, 2, 1)


def load_model(ckpt: Path, variant: str, truncate: bool):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, GptOssForCausalLM, Mxfp4Config

    config = AutoConfig.from_pretrained(ckpt)
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0, rope
    assert rope["original_max_position_embeddings"] == 4096 and rope["beta_fast"] == 32.0, rope
    assert rope["beta_slow"] == 1.0 and rope["truncate"] is False, rope
    assert config.layer_types[0] == "sliding_attention" and config.layer_types[1] == "full_attention"
    # truncate=True floors/ceils the YaRN ramp bounds, which is what ggml always does.
    config.rope_parameters = {**rope, "truncate": truncate}
    kwargs = {"config": config, "dtype": torch.float32, "attn_implementation": "eager"}
    if variant == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = GptOssForCausalLM.from_pretrained(ckpt, **kwargs).eval()
    # Dequantized experts may come back as bf16 (exact for MXFP4 values); run everything in f32.
    model = model.to(torch.float32)
    assert model.config.rope_parameters["truncate"] is truncate

    # Every tensor transformers uses must be the checkpoint's, bit for bit (after MXFP4 dequantization).
    raw = load_file(str(ckpt / "model.safetensors"))
    for name, p in model.named_parameters():
        ours = p.detach().float().numpy()
        if name.endswith(("gate_up_proj", "down_proj")) and f"{name}_blocks" in raw:
            expected = dequantize_hf_mxfp4(raw[f"{name}_blocks"], raw[f"{name}_scales"])
        else:
            expected = raw[name]
        if ours.shape != expected.shape or not np.array_equal(ours, expected):
            sys.exit(f"{variant}: transformers holds {name} differently from the checkpoint "
                     f"({ours.shape} vs {expected.shape})")
    return model


def run_prompts(model, prompts: list[dict]) -> list[np.ndarray]:
    import torch
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p["tokens"]])).logits[0].float().numpy() for p in prompts]


def summarize(logits: np.ndarray) -> dict:
    wide = logits.astype(np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    m = wide.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(wide - m).sum(axis=1))
    return {
        "argmax": [int(i) for i in logits.argmax(axis=1)],
        "max": [float(v) for v in top2[:, 1]],
        "top2_gap": [float(v) for v in top2[:, 1] - top2[:, 0]],
        "logsumexp": [float(v) for v in lse],
    }


def oracle_delta(a: list[np.ndarray], b: list[np.ndarray], subset: np.ndarray) -> float:
    """The Rust test's metric: max |Δ| over the subset's logits, each row's max and its logsumexp."""
    a, b = np.concatenate(a), np.concatenate(b)
    sa, sb = summarize(a), summarize(b)
    return float(max(np.abs(a[:, subset] - b[:, subset]).max(),
                     np.abs(np.subtract(sa["max"], sb["max"])).max(),
                     np.abs(np.subtract(sa["logsumexp"], sb["logsumexp"])).max()))


def write_fixture(name: str, variant: str, truncate: bool, ckpt: Path, prompts: list[dict],
                  logits: list[np.ndarray], subset: np.ndarray, out_dir: Path, extra: dict) -> None:
    import torch
    import transformers

    block = np.concatenate([l[:, subset] for l in logits]).astype("<f4")
    logits_file = f"{name}_logits.bin"
    (out_dir / logits_file).write_bytes(block.tobytes())
    max_abs = float(max(np.abs(l).max() for l in logits))
    meta = {
        "generator": "scripts/oracle/hf_logits.py",
        "recipe": "checkpoint: crates/engine/tests/hf_oracle.rs write_hf_checkpoints (seed and shapes in TINY); "
                  "rerun scripts/oracle/hf_logits.py to regenerate every hf_* fixture",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "experts": variant,
        "rope_truncate": truncate,
        "checkpoint_sha256": hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest(),
        "config": json.loads((ckpt / "config.json").read_text()),
        "max_abs_logit": max_abs,
        **extra,
        "logits_file": logits_file,
        "vocab_subset_seed": SUBSET_SEED,
        "vocab_subset": [int(i) for i in subset],
        "prompts": [{**p, **summarize(l)} for p, l in zip(prompts, logits)],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    print(f"{name}: {block.shape[0]} positions, max |logit| {max_abs:.3f}, {block.nbytes} bytes {extra}",
          file=sys.stderr)


def vocab_subset(prompts: list[dict], vocab: int) -> np.ndarray:
    """Every prompt token, the harmony specials, the rest seeded-random: a fixed, order-sorted subset."""
    chosen = {t for p in prompts for t in p["tokens"]} | set(range(199998, 200013))
    rng = np.random.default_rng(SUBSET_SEED)
    for t in rng.permutation(vocab):
        if len(chosen) >= SUBSET_SIZE:
            break
        chosen.add(int(t))
    return np.array(sorted(chosen)[:SUBSET_SIZE], dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=FIXTURES)
    ap.add_argument("--checkpoints", type=Path,
                    help="directory already holding f32/ and mxfp4/ checkpoints (skips cargo)")
    args = ap.parse_args()

    import torch
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompts = harmony_prompts()
    subset = vocab_subset(prompts, 201088)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.checkpoints or Path(tmp)
        if args.checkpoints is None:
            write_checkpoints(work)
        # ggml floors/ceils the YaRN ramp bounds; gpt-oss's config (and OpenAI's reference) does not.
        # The primary fixtures use the truncated ramp so the rest of the chain is held to f32 exactness;
        # hf_f32_exact_yarn keeps the true reference and the size of that one known deviation.
        for variant in VARIANTS:
            ckpt = work / variant
            truncated = run_prompts(load_model(ckpt, variant, truncate=True), prompts)
            write_fixture(f"hf_{variant}", variant, True, ckpt, prompts, truncated, subset, args.out_dir, {})
            if variant == "f32":
                exact = run_prompts(load_model(ckpt, variant, truncate=False), prompts)
                effect = {
                    "truncation_effect_max_abs_delta": oracle_delta(exact, truncated, subset),
                    "truncation_effect_argmax_changes": int(sum((e.argmax(1) != t.argmax(1)).sum()
                                                                for e, t in zip(exact, truncated))),
                }
                write_fixture("hf_f32_exact_yarn", variant, False, ckpt, prompts, exact, subset, args.out_dir,
                              effect)

if __name__ == "__main__":
    main()
