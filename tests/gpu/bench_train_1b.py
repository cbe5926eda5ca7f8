#!/usr/bin/env python3
"""The training benchmark, in one run on one GPU: random weights of a GPT-NeoX of about
1B parameters (Pythia-1B's shapes), made on the machine; our bench_train (mixed mode:
float32 master weights, bfloat16 products) on them, saved as transformers saves them, first
and streamed, so that a run cut short keeps our figures; then a plain torch training loop
on the same weights (float32 master weights, bf16 autocast, AdamW, clipping: what
transformers' Trainer does with bf16=True); one table with tokens/s and model FLOPs
utilisation (PaLM's count: 6 N + 12 L d T per token, N without the input embedding;
recomputation is not counted). --jsonl appends every figure to a JSON-lines file as it is
measured.

    python3 tests/gpu/bench_train_1b.py --bench build/gpu/bench_train [--workdir DIR]
        [--batch 8] [--seq 1024] [--steps 8] [--jsonl FILE]

Goal (the CUDA readiness issue): at least 1x torch's tokens/s and at least 45% MFU. --shape tiny
runs the same steps on a tiny model (a check of the script; on the CPU without a GPU).
"""

import argparse
import shutil
import time

import torch
import transformers

from bench_util import record, run_keyvalues

SEED = 1234

# dense bf16 tensor-core peaks, FLOP/s, by the name the driver reports
PEAKS = [("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100", 989.4e12),
         ("A100", 312e12), ("L40S", 362e12)]


def make_config(shape):
    """Pythia-1B (EleutherAI/pythia-1b's config.json), or a tiny GPT-NeoX of the same kind."""
    if shape == "tiny":
        return transformers.GPTNeoXConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, rotary_pct=0.25, max_position_embeddings=512,
            use_parallel_residual=True, tie_word_embeddings=False)
    return transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
        intermediate_size=8192, rotary_pct=0.25, max_position_embeddings=2048,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu")


def peak_flops(name):
    for key, flops in PEAKS:
        if key in name:
            return flops
    return None


def torch_loop(model, config, args, device):
    """Median step seconds, the first and last timed losses, peak memory (GB) of the loop."""
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    model.train()
    times, losses = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(-2, args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 0:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    times.sort()
    return times[len(times) // 2], losses[0], losses[-1], peak


def ours(args, path, steps, profile=False):
    """bench_train's key=value lines as a dict (numbers as floats); exits when it fails.
    With profile, the plugin's table of where the GPU time went is printed too."""
    cmd = [args.bench, "--model", path, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(steps), "--plugin", args.plugin,
           "--device", "0" if torch.cuda.is_available() else "-1"]
    if args.checkpoint:
        cmd.append("--checkpoint")
    return run_keyvalues(cmd, {"DOLLY_CUDA_PROFILE": "1"} if profile else None, profile,
                         None if profile else args.jsonl)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="bench_train binary")
    ap.add_argument("--plugin", default="./dolly_cuda.so")
    ap.add_argument("--workdir", default="/tmp/dolly-neox1b")
    ap.add_argument("--shape", choices=["pythia-1b", "tiny"], default="pythia-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--checkpoint", action="store_true", help="ours with activation checkpointing")
    ap.add_argument("--jsonl", help="append every figure to this JSON-lines file as it comes")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = make_config(args.shape)

    # float32 weights that bf16 holds exactly, so both sides start from the same model
    t = time.perf_counter()
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    shutil.rmtree(args.workdir, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(args.workdir)
    model.float()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * (n_params - n_embed) + \
        12 * config.num_hidden_layers * config.hidden_size * args.seq
    print(f"model of {n_params / 1e9:.3f}B parameters made and saved in "
          f"{time.perf_counter() - t:.1f} s", flush=True)

    # ours while torch's copy of the weights waits on the GPU (4 GB: room to spare)
    o = ours(args, args.workdir, args.steps)

    hf = (None, None, None, None)
    try:
        hf = torch_loop(model, config, args, device)
        print(f"torch: step {hf[0]:.3f} s, loss {hf[1]:.4f} -> {hf[2]:.4f}", flush=True)
        record(args.jsonl, "torch", "step_s", hf[0])
        record(args.jsonl, "torch", "tokens_per_s", args.batch * args.seq / hf[0])
        record(args.jsonl, "torch", "peak_memory_gb", hf[3])
    except Exception as e:      # our figures are in; the table says n/a
        print(f"torch loop failed: {e!r}", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    gpu = o.get("gpu", "cpu")
    peak = peak_flops(gpu)
    tokens = args.batch * args.seq
    ours_tps = o["tokens_per_s"]
    hf_tps = tokens / hf[0] if hf[0] else None

    def mfu(tps):
        return f"{100 * tps * flops_per_token / peak:.1f}%" if tps and peak else "n/a"

    def fmt(x, digits=1):
        return "n/a" if x is None else f"{x:,.{digits}f}"

    rows = [
        ("tokens/s", fmt(ours_tps), fmt(hf_tps),
         f"{ours_tps / hf_tps:.2f}x" if hf_tps else ""),
        ("step, s", fmt(o["step_s"], 3), fmt(hf[0], 3), ""),
        ("model FLOPs utilisation", mfu(ours_tps), mfu(hf_tps), ""),
        ("loss, first -> last timed step", f"{o['loss_first']:.4f} -> {o['loss_last']:.4f}",
         f"{hf[1]:.4f} -> {hf[2]:.4f}" if hf[1] else "n/a", ""),
        ("peak memory (torch allocator), GB", "", fmt(hf[3], 1), ""),
    ]
    print()
    print(f"training, GPT-NeoX {n_params / 1e9:.2f}B ({args.shape}), batch {args.batch} x "
          f"{args.seq} tokens, AdamW, clip 1.0; GPU: {gpu}; peak {fmt(peak and peak / 1e12)} "
          f"TFLOP/s; {flops_per_token / 1e9:.2f} GFLOP per token"
          f"{'; ours with checkpointing' if args.checkpoint else ''}")
    print(f"{'':36} {'ours':>22} {'torch (autocast)':>18} {'ours/torch':>10}")
    for name, a, b, r in rows:
        print(f"{name:36} {a:>22} {b:>18} {r:>10}")
    print("goals: >= 1x torch's tokens/s, MFU >= 45%")
    record(args.jsonl, "bench_train_1b", "flops_per_token", flops_per_token)
    if peak:
        record(args.jsonl, "bench_train_1b", "ours_mfu_pct", 100 * ours_tps * flops_per_token / peak)
    if peak and hf_tps:
        record(args.jsonl, "bench_train_1b", "torch_mfu_pct", 100 * hf_tps * flops_per_token / peak)
    if hf_tps:
        record(args.jsonl, "bench_train_1b", "ours_over_torch", ours_tps / hf_tps)
    if torch.cuda.is_available():
        print("\nwhere our GPU time goes (a second run of 2 steps, every operation timed):")
        ours(args, args.workdir, 2, profile=True)


if __name__ == "__main__":
    main()
