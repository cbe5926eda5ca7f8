#!/usr/bin/env python3
"""The CUDA benchmark, in one run on one GPU: random weights of GPT-J-6B's exact shapes in
bfloat16, made on the machine and saved as transformers saves them; our bench_cuda on
the saved directory first, its output streamed, so that a run cut short keeps our figures;
then transformers' `generate` on the same weights (bf16, same GPU, same prompts); one
table. --jsonl appends every figure to a JSON-lines file as it is measured.

    python3 tests/gpu/bench_gptj6b.py --bench build/gpu/bench_cuda [--workdir DIR]
        [--prompt-tokens 128] [--gen-tokens 128] [--batch 64] [--jsonl FILE]

Goals (the CUDA readiness issue): batch-1 decode at least 80% of the bandwidth limit (bytes
per token over the measured device-to-device copy bandwidth; moonshot 90%) and 2x
transformers; 64 sequences decoding together at least 30x batch 1. --shape tiny runs the same steps on a
tiny GPT-J (a check of the script itself; on the CPU when there is no GPU).
"""

import argparse
import os
import shutil
import time

import torch
import transformers

from bench_util import record, run_keyvalues
from transformers import LogitsProcessor, LogitsProcessorList

SEED = 1234


def make_config(shape):
    """GPT-J-6B (EleutherAI/gpt-j-6b's config.json), or a tiny GPT-J of the same kind."""
    if shape == "tiny":
        return transformers.GPTJConfig(
            vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
            activation_function="gelu_new", tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=0)
    return transformers.GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
        activation_function="gelu_new", tie_word_embeddings=False, bos_token_id=50256,
        eos_token_id=50256)


def make_model(config, device):
    """Random bf16 weights (transformers' init, normal(0, 0.02)), built on the device."""
    torch.manual_seed(SEED)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except TypeError:       # transformers before 4.56 spells it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    return model.eval()


class StepClock(LogitsProcessor):
    """Notes the time of each generation step, once the GPU has finished it."""

    def __init__(self, device):
        self.device = device
        self.times = []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model, ids, gen_tokens, device):
    """transformers' greedy generate of exactly gen_tokens new tokens for the rows of ids:
    (prefill tokens/s, aggregate decode tokens/s over the steps after the first, the first
    row's first 16 new tokens)."""
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    clock = StepClock(device)
    with torch.inference_mode():
        model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=4,
                       min_new_tokens=4, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_tokens,
                             min_new_tokens=gen_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock]))
    prefill = ids.numel() / (clock.times[0] - t0)
    decode = ids.shape[0] * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return prefill, decode, out[0, ids.shape[1]:ids.shape[1] + 16].tolist()


def ours(bench, path, prompts, args):
    """bench_cuda's key=value lines as a dict (numbers as floats); exits when it fails."""
    cmd = [bench, "--model", path, "--prompts", prompts, "--gen", str(args.gen_tokens),
           "--batch", str(args.batch), "--plugin", args.plugin]
    return run_keyvalues(cmd, jsonl=args.jsonl)


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return "" if a is None or not b else f"{a / b:.2f}x"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="bench_cuda binary")
    ap.add_argument("--plugin", default="./dolly_cuda.so")
    ap.add_argument("--workdir", default="/tmp/dolly-gptj6b")
    ap.add_argument("--shape", choices=["gptj-6b", "tiny"], default="gptj-6b")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--jsonl", help="append every figure to this JSON-lines file as it comes")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = make_config(args.shape)

    # the model, saved where bench_cuda reads it, and the prompts both sides use
    t = time.perf_counter()
    model = make_model(config, device)
    shutil.rmtree(args.workdir, ignore_errors=True)
    model.save_pretrained(args.workdir)
    print(f"model made and saved in {time.perf_counter() - t:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_tokens), generator=gen)
    prompts = os.path.join(args.workdir, "prompts.txt")
    with open(prompts, "w") as f:
        for row in ids.tolist():
            f.write(" ".join(map(str, row)) + "\n")

    # ours while transformers' copy of the weights waits on the GPU (12 GB: room to spare)
    o = ours(args.bench, args.workdir, prompts, args)

    hf1 = hfn = (None, None, [])
    try:
        hf1 = hf_generate(model, ids[:1], args.gen_tokens, device)
        print(f"transformers batch 1: prefill {hf1[0]:.1f} tok/s, decode {hf1[1]:.1f} tok/s",
              flush=True)
        record(args.jsonl, "transformers", "b1_prefill_tok_s", hf1[0])
        record(args.jsonl, "transformers", "b1_decode_tok_s", hf1[1])
        hfn = hf_generate(model, ids, args.gen_tokens, device)
        print(f"transformers batch {args.batch}: prefill {hfn[0]:.1f} tok/s, decode "
              f"{hfn[1]:.1f} tok/s", flush=True)
        record(args.jsonl, "transformers", "bN_prefill_tok_s", hfn[0])
        record(args.jsonl, "transformers", "bN_decode_tok_s", hfn[1])
    except Exception as e:      # our figures are in; the table says n/a
        print(f"transformers generate failed: {e!r}", flush=True)

    limit = o["limit_tok_s"]
    b1, bn = o["b1_decode_tok_s"], o.get("bN_decode_tok_s")
    rows = [
        ("copy bandwidth, GB/s (read + write)", fmt(o["copy_gbs"]), "", ""),
        ("bytes read per decode step, GB", fmt(o["weight_bytes"] / 1e9, 2), "", ""),
        ("decode limit, tok/s (bandwidth / bytes)", fmt(limit), "", ""),
        ("batch 1 prefill, tok/s", fmt(o["b1_prefill_tok_s"]), fmt(hf1[0]),
         ratio(o["b1_prefill_tok_s"], hf1[0])),
        ("batch 1 decode, tok/s", f"{fmt(b1)} ({100 * b1 / limit:.0f}% of limit)", fmt(hf1[1]),
         ratio(b1, hf1[1])),
        (f"batch {args.batch} decode, tok/s (aggregate)",
         f"{fmt(bn)} ({bn / b1:.1f}x batch 1)" if bn else "n/a", fmt(hfn[1]), ratio(bn, hfn[1])),
    ]
    print()
    print(f"GPT-J-6B shapes ({args.shape}), random bf16 weights, {args.prompt_tokens}-token "
          f"prompts, {args.gen_tokens} new tokens, greedy; GPU: {o.get('gpu', '?')}")
    print(f"{'':44} {'ours':>30} {'transformers':>14} {'ours/hf':>8}")
    for name, a, b, r in rows:
        print(f"{name:44} {a:>30} {b:>14} {r:>8}")
    print("goals: batch-1 decode >= 80% of the limit and >= 2x transformers; "
          f"batch {args.batch} >= 30x batch 1")
    # random weights give nearly flat logits, so bf16 roundings may part the two early
    print(f"first greedy tokens, ours:         {o['b1_tokens']}")
    print(f"first greedy tokens, transformers: {','.join(map(str, hf1[2]))}")
    record(args.jsonl, "bench_gptj6b", "b1_decode_pct_of_limit", 100 * b1 / limit)
    if hf1[1]:
        record(args.jsonl, "bench_gptj6b", "b1_decode_ours_over_hf", b1 / hf1[1])
    if bn:
        record(args.jsonl, "bench_gptj6b", "bN_over_b1", bn / b1)
    if bn and hfn[1]:
        record(args.jsonl, "bench_gptj6b", "bN_decode_ours_over_hf", bn / hfn[1])

if __name__ == "__main__":
    main()
