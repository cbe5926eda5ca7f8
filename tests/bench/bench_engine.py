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


def make_config(arch):
    """GPT-NeoX with 12 layers or GPT-J with 8, width 768, 50k vocabulary."""
    if arch == "neox":
        return transformers.GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25,
            max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)
    return transformers.GPTJConfig(
        vocab_size=50400, n_embd=768, n_layer=8, n_head=12, rotary_dim=32, n_positions=2048,
        activation_function="gelu_new", tie_word_embeddings=False)


def make_model(config, path):
    """Random weights for config, saved as transformers saves them, with the fixture
    tokenizer (the embedding has more rows than the tokenizer has ids, as Pythia's)."""
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().float()
    model.save_pretrained(path)
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.json"))
    os.sync()                   # no write-back competing with the timings
    return model


def dims(c):
    """(layers, width, MLP width, vocabulary rows) of a NeoX or GPT-J config."""
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


def run(cmd):
    """stdout of a command; exits with its stderr when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def build_tools(workdir):
    """Compile sgemm_peak (with the engine's OpenBLAS core choice, sysinfo.c) and membw."""
    flags = run(["pkg-config", "--cflags", "--libs", "openblas"]).split()
    engine = os.path.join(BENCH_DIR, "..", "..", "src", "engine")
    extra = {"sgemm_peak": ["-I" + engine, os.path.join(engine, "sysinfo.c")], "membw": []}
    tools = {}
    for name in ("sgemm_peak", "membw"):
        exe = os.path.join(workdir, name)
        run(["gcc", "-std=gnu11", "-O2", "-march=native", "-pthread",
             os.path.join(BENCH_DIR, name + ".c")] + extra[name] + ["-o", exe] + flags)
        tools[name] = exe
    return tools


def sgemm_peak(tools, dims_, prompt_tokens, threads):
    """cblas_sgemm on the prefill shapes: {shape: fields} with "total" for the layers."""
    layers, E, F, V = dims_
    out = {}
    for line in run([tools["sgemm_peak"], str(prompt_tokens), str(E), str(F), str(V),
                     str(layers), str(threads)]).splitlines():
        if line.startswith("blas "):
            out["blas"] = line[5:]
            continue
        f = parse_fields(line)
        out[f.get("shape", "total")] = f
    return out


def bandwidth(tools, threads):
    """memcpy GB/s (read + write) on a buffer far larger than the caches."""
    return parse_fields(run([tools["membw"], str(MEMBW_MB), str(threads)]))["memcpy_gbs"]


def ours(cli, path, args, batch, bf16=False):
    """dolly-cli bench's fields (bf16: matrices in bfloat16), or None when it fails."""
    p = subprocess.run([cli, "bench", "--model", path, "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
                        str(args.gen_tokens), "--batch", str(batch)] + (["--bf16"] if bf16 else []),
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("prefill_tok_s=")]
    if p.returncode != 0 or not lines:
        print(f"dolly-cli bench --batch {batch} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        return None
    return parse_fields(lines[-1])


def ours_gemm(cli, path, args):
    """dolly-cli bench-gemm's total line (our matmuls alone, and cblas beside them), or None."""
    p = subprocess.run([cli, "bench-gemm", "--model", path, "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens)],
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("gemm_total")]
    return parse_fields(lines[-1]) if p.returncode == 0 and lines else None


def best(values):
    """The largest of the measurements that exist (throughputs: noise only lowers them)."""
    values = [v for v in values if v is not None]
    return max(values) if values else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def bench_arch(arch, args, tools, workdir):
    """Measure one architecture and print its table."""
    config = make_config(arch)
    d = dims(config)
    layers, E, F, V = d
    P, G, R = args.prompt_tokens, args.gen_tokens, args.repeat

    # the ceilings first, before any model exists, and again at the end
    peaks = [sgemm_peak(tools, d, P, args.threads)]
    bws = [bandwidth(tools, args.threads)]

    path = os.path.join(workdir, arch)
    model = make_model(config, path)
    nparams = sum(p.numel() for p in model.parameters())
    # decode reads every weight but the input embedding once per step, plus each
    # sequence's KV cache (fp32 K and V, all layers) at its mean length
    weight_bytes = 4 * (nparams - model.get_input_embeddings().weight.numel())
    kv_bytes = 2 * layers * (P + G / 2) * E * 4

    hf = {"prefill": hf_prefill(model, V, P)}
    for b in args.batches:
        hf[b] = best(hf_decode(model, V, P, G, b) for _ in range(R))
    del model

    cli_ok = os.access(args.cli, os.X_OK)
    mine = {b: [ours(args.cli, path, args, b) for _ in range(R)] if cli_ok else []
            for b in args.batches}
    mine16 = {b: [ours(args.cli, path, args, b, bf16=True) for _ in range(R)] if cli_ok else []
              for b in args.batches}
    gemm = ours_gemm(args.cli, path, args) if cli_ok else None
    peaks.append(sgemm_peak(tools, d, P, args.threads))
    bws.append(bandwidth(tools, args.threads))

    def our(b, field, runs=mine):
        return best(m[field] for m in runs[b] if m)

    our_prefill = our(args.batches[0], "prefill_tok_s")
    peak = best([p["total"]["gflops"] for p in peaks] + [gemm and gemm["cblas_gflops"]])
    bw = best(bws)
    if gemm:
        our_gflops, gflops_note = gemm["ours_gflops"], "our matmuls alone (dolly-cli bench-gemm)"
    else:
        our_gflops = (2.0 * P * layers * (E * 3 * E + E * E + E * F + F * E) /
                      (P / our_prefill) * 1e-9 if our_prefill else None)
        gflops_note = "lower bound: layer matmul FLOPs / whole prefill time"

    print()
    print(f"== {model_name(arch)}: {layers} layers, width {E}, MLP {F}, vocabulary {V}, "
          f"{nparams / 1e6:.1f}M parameters (fp32), {P}-token prompts, {G} new tokens, "
          f"{args.threads} threads, best of {R}")
    if not cli_ok:
        print(f"   {args.cli} not found: build it with `make` for the 'ours' column")
    rows = [("metric", "ours", "transformers/peak", "ratio", "goal")]
    rows.append((f"prefill tok/s ({P} tokens, batch {args.batches[0]})", fmt(our_prefill),
                 fmt(hf["prefill"]), fmt(ratio(our_prefill, hf["prefill"]), 2), ">= 1"))
    for b in args.batches:
        o = our(b, "decode_tok_s")
        rows.append((f"decode tok/s, batch {b}", fmt(o), fmt(hf[b]), fmt(ratio(o, hf[b]), 2),
                     ">= 2"))
    rows.append(("prefill matmul GFLOP/s vs cblas_sgemm", fmt(our_gflops), fmt(peak) + " peak",
                 fmt(ratio(our_gflops, peak), 2), ">= 0.8"))
    for b in args.batches:
        o = our(b, "decode_tok_s")
        limit = b * bw * 1e9 / (weight_bytes + b * kv_bytes)
        rows.append((f"decode tok/s, batch {b}, vs bandwidth limit", fmt(o),
                     fmt(limit) + " limit", fmt(ratio(o, limit), 2), "<= 1"))
    for b in args.batches:
        o = our(b, "decode_tok_s", mine16)
        limit = b * bw * 1e9 / (weight_bytes / 2 + b * kv_bytes)
        rows.append((f"decode tok/s, batch {b}, bf16 matrices, vs limit", fmt(o),
                     fmt(limit) + " limit", fmt(ratio(o, limit), 2), "<= 1"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
    print(f"   ours GFLOP/s: {gflops_note}; peak: the best cblas_sgemm total seen "
          f"(sgemm_peak before and after, bench-gemm's own)")
    print(f"   bandwidth {bw:.1f} GB/s (memcpy, read + write); per decode step "
          f"{weight_bytes / 2**20:.0f} MiB of weights and {kv_bytes / 2**20:.1f} MiB of KV cache "
          f"per sequence")
    print("   cblas_sgemm GFLOP/s per shape: " + "; ".join(
        f"{name} {int(f['K'])}x{int(f['N'])} {best(p[name]['gflops'] for p in peaks):.1f}"
        for name, f in peaks[0].items() if name not in ("total", "blas")))
    print(f"   {peaks[0].get('blas', 'BLAS unknown')}")


def model_name(arch):
    return "GPT-NeoX" if arch == "neox" else "GPT-J"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--arch", choices=["neox", "gptj", "both"], default="neox")
    ap.add_argument("--repeat", type=int, default=1,
                    help="decode runs (ours and transformers) per figure; the best counts")
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    ap.add_argument("--workdir", help="where the random models go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the models afterwards")
    args = ap.parse_args()
    if args.gen_tokens < 2:
        ap.error("--gen-tokens must be at least 2 (decode is timed after the first token)")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dolly-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        tools = build_tools(workdir)
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
              f"{transformers.__version__}, models in {workdir}")
        for arch in (["neox", "gptj"] if args.arch == "both" else [args.arch]):
            bench_arch(arch, args, tools, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
