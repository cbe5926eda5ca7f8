#!/usr/bin/env python3
"""The engine benchmark, in one run: our dolly-cli against transformers on the same
random GPT-2-small-sized weights, OpenBLAS's own sgemm on the prefill's matrix
shapes, and the memory-bandwidth ceiling for decode. See tests/bench/README.md.

    python3 tests/bench/bench_engine.py [--threads 2] [--arch neox|gptj|both]

Run it from the repository root after `make`. The random models go to a temporary
directory (or --workdir) and are deleted afterwards unless --keep.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tokenizer.json")
BENCH_DIR = os.path.join(ROOT, "tests", "bench")
SEED = 1234
MEMBW_MB = 512


def make_model(arch, workdir):
    """A random GPT-NeoX (12 layers) or GPT-J (8 layers), width 768, 50k vocabulary,
    saved as transformers saves it, with the fixture tokenizer (the embedding has more
    rows than the tokenizer has ids, as Pythia's does)."""
    torch.manual_seed(SEED)
    if arch == "neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25,
            max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.GPTJConfig(
            vocab_size=50400, n_embd=768, n_layer=8, n_head=12, rotary_dim=32, n_positions=2048,
            activation_function="gelu_new", tie_word_embeddings=False)
        model = transformers.GPTJForCausalLM(config)
    model = model.eval().float()
    path = os.path.join(workdir, arch)
    model.save_pretrained(path)
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.json"))
    return model, path


def dims(model):
    """(layers, width, MLP width, vocabulary rows) of a NeoX or GPT-J model."""
    c = model.config
    if c.model_type == "gpt_neox":
        return c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    return c.n_layer, c.n_embd, c.n_inner or 4 * c.n_embd, c.vocab_size


class StepClock(LogitsProcessor):
    """Notes the time of each generation step (called once after each forward pass)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def random_ids(vocab, batch, length, seed):
    """Seeded random prompt ids (the content does not change the cost)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def hf_prefill(model, vocab, prompt_tokens, reps=3):
    """Prompt tokens/s of one forward over one prompt with the logits of its last token
    only (as generate asks for them), best of reps after a warm-up."""
    ids = random_ids(vocab, 1, prompt_tokens, SEED)
    best = float("inf")
    with torch.inference_mode():
        for r in range(reps + 1):
            t = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            t = time.perf_counter() - t
            if r:
                best = min(best, t)
    return prompt_tokens / best


def hf_decode(model, vocab, prompt_tokens, gen_tokens, batch):
    """Aggregate decode tokens/s of model.generate, greedy, exactly gen_tokens new tokens
    for each of batch prompts: the steps after the first (which is the prefill)."""
    ids = random_ids(vocab, batch, prompt_tokens, SEED + batch)
    clock = StepClock()
    with torch.inference_mode():
        warm = ids[:, :16]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4,
                       min_new_tokens=4, do_sample=False, pad_token_id=0)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens,
                       min_new_tokens=gen_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))
    return batch * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def parse_fields(line):
    """key=value fields of one output line as floats where they parse."""
    out = {}
    for k, v in re.findall(r"(\w+)=(\S+)", line):
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def run(cmd, env=None):
    """stdout of a command; exits with its stderr when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def build_tools(workdir):
    """Compile sgemm_peak and membw (OpenBLAS through pkg-config)."""
    flags = run(["pkg-config", "--cflags", "--libs", "openblas"]).split()
    tools = {}
    for name in ("sgemm_peak", "membw"):
        exe = os.path.join(workdir, name)
        run(["gcc", "-std=gnu11", "-O2", "-march=native", "-pthread",
             os.path.join(BENCH_DIR, name + ".c"), "-o", exe] + flags)
        tools[name] = exe
    return tools


def ours(cli, path, args, batch):
    """dolly-cli bench's fields, or None when it fails."""
    p = subprocess.run([cli, "bench", "--model", path, "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
                        str(args.gen_tokens), "--batch", str(batch)],
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("prefill_tok_s=")]
    if p.returncode != 0 or not lines:
        print(f"dolly-cli bench --batch {batch} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        return None
    return parse_fields(lines[-1])


def ours_gemm(cli, path, args):
    """dolly-cli bench-gemm's total line (our matmuls alone), or None."""
    p = subprocess.run([cli, "bench-gemm", "--model", path, "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens)],
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("gemm_total")]
    return parse_fields(lines[-1]) if p.returncode == 0 and lines else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def bench_arch(arch, args, tools, bandwidth, workdir):
    """Measure one architecture and print its table."""
    model, path = make_model(arch, workdir)
    layers, E, F, V = dims(model)
    P, G = args.prompt_tokens, args.gen_tokens
    nparams = sum(p.numel() for p in model.parameters())

    # the same product shapes as our prefill: qkv, attention output, MLP in and out
    layer_flops = 2.0 * P * layers * (E * 3 * E + E * E + E * F + F * E)
    peak_lines = run([tools["sgemm_peak"], str(P), str(E), str(F), str(V), str(layers),
                      str(args.threads)]).splitlines()
    peak = parse_fields(peak_lines[-1])["gflops"]

    # decode reads every weight but the input embedding once per step, plus each
    # sequence's KV cache (fp32 K and V, all layers) at its mean length
    emb = model.get_input_embeddings().weight.numel()
    weight_bytes = 4 * (nparams - emb)
    kv_bytes = 2 * layers * (P + G / 2) * E * 4

    hf = {"prefill": hf_prefill(model, V, P)}
    for b in args.batches:
        hf[b] = hf_decode(model, V, P, G, b)
    del model

    cli_ok = os.access(args.cli, os.X_OK)
    mine = {b: ours(args.cli, path, args, b) if cli_ok else None for b in args.batches}
    gemm = ours_gemm(args.cli, path, args) if cli_ok else None
    first = mine[args.batches[0]]
    our_prefill = first["prefill_tok_s"] if first else None
    if gemm:
        our_gflops, gflops_note = gemm["ours_gflops"], "our matmuls alone (bench-gemm)"
    else:
        our_gflops = layer_flops / (P / our_prefill) * 1e-9 if our_prefill else None
        gflops_note = "lower bound: layer matmul FLOPs / whole prefill time"

    print()
    print(f"== {model_name(arch)}: {layers} layers, width {E}, MLP {F}, vocabulary {V}, "
          f"{nparams / 1e6:.1f}M parameters (fp32), {P}-token prompts, {G} new tokens, "
          f"{args.threads} threads")
    if not cli_ok:
        print(f"   {args.cli} not found: build it with `make` for the 'ours' column")
    rows = [("metric", "ours", "transformers/peak", "ratio", "goal")]
    rows.append((f"prefill tok/s ({P} tokens, batch {args.batches[0]})", fmt(our_prefill),
                 fmt(hf["prefill"]), fmt(ratio(our_prefill, hf["prefill"]), 2), ">= 1"))
    for b in args.batches:
        o = mine[b]["decode_tok_s"] if mine[b] else None
        rows.append((f"decode tok/s, batch {b}", fmt(o), fmt(hf[b]), fmt(ratio(o, hf[b]), 2),
                     ">= 2"))
    rows.append(("prefill matmul GFLOP/s vs cblas_sgemm", fmt(our_gflops), fmt(peak) + " peak",
                 fmt(ratio(our_gflops, peak), 2), ">= 0.8"))
    for b in args.batches:
        o = mine[b]["decode_tok_s"] if mine[b] else None
        limit = b * bandwidth * 1e9 / (weight_bytes + b * kv_bytes)
        rows.append((f"decode tok/s, batch {b}, vs bandwidth limit", fmt(o), fmt(limit) + " limit",
                     fmt(ratio(o, limit), 2), "<= 1"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"   ours GFLOP/s: {gflops_note}; bandwidth {bandwidth:.1f} GB/s (memcpy, read + write), "
          f"{weight_bytes / 2**20:.0f} MiB of weights and {kv_bytes / 2**20:.1f} MiB of KV cache "
          f"per sequence read per decode step")
    print("   cblas_sgemm per shape: " + "; ".join(
        f"{f['shape']} {int(f['K'])}x{int(f['N'])} {f['gflops']:.1f}"
        for f in map(parse_fields, peak_lines[:-1])))


def model_name(arch):
    return "GPT-NeoX" if arch == "neox" else "GPT-J"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--arch", choices=["neox", "gptj", "both"], default="neox")
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    ap.add_argument("--workdir", help="where the random models go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the models afterwards")
    args = ap.parse_args()
    if args.gen_tokens < 2:
        ap.error("--gen-tokens must be at least 2 (decode is timed after the first token)")

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dolly-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        tools = build_tools(workdir)
        bandwidth = parse_fields(run([tools["membw"], str(MEMBW_MB), str(args.threads)]))["memcpy_gbs"]
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
              f"{transformers.__version__}, models in {workdir}")
        for arch in (["neox", "gptj"] if args.arch == "both" else [args.arch]):
            bench_arch(arch, args, tools, bandwidth, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
