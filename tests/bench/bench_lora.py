#!/usr/bin/env python3
"""The LoRA benchmark, in one run, on the CPU: fine-tuning an adapter against fine-tuning
the whole model (same model, records, batch and threads): parameters trained, peak memory
(goal: at most 0.4 of full fine-tuning's) and training tokens/s (goal: at least 1.2x); and
serving 4 adapters mixed in one batch of 16 sequences against the base alone (decode
tokens/s, goal: at least 0.8). Both sides train with activation checkpointing, as Dolly's
trainer does (gradient_checkpointing), so that memory is mostly what the two methods keep:
weights, and for full fine-tuning their gradients and AdamW's two moments. See
tests/bench/README.md.

    python3 tests/bench/bench_lora.py [--threads 2] [--repeat 2]

Run it from the repository root after `make`; it needs only build/dolly-cli. The random
model (GPT-NeoX, about 30M parameters, made by `dolly-cli init`), the records and the
adapters go to a temporary directory, deleted afterwards. Runs of the two sides alternate
and the median of the ratios is reported, as this machine's speed drifts.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tokenizer.json")


def run(cmd):
    """Run dolly-cli; its key=value figures from stdout."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", out)}


def make_records(path, n, seed):
    """n Dolly records of random words, about 100 tokens each."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": "Repeat: " + " ".join(word() for _ in range(6)),
                                "context": "", "response": " ".join(word() for _ in range(30))}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side, alternated")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    args = ap.parse_args()
    threads = ["--threads", str(args.threads)]

    with tempfile.TemporaryDirectory(prefix="dolly-bench-lora-") as work:
        base = os.path.join(work, "base")
        records = os.path.join(work, "records.jsonl")
        subprocess.run([args.cli, "init", "--arch", "gpt_neox", "--layers", str(args.layers),
                        "--hidden", str(args.hidden), "--heads", str(args.hidden // 64),
                        "--context", "256", "--tokenizer", TOKENIZER, "--seed", "1", "--out", base],
                       check=True, capture_output=True)
        make_records(records, args.records, 7)
        # both sides as Dolly's trainer runs: activation checkpointing on (its
        # gradient_checkpointing), activations sized for the batch
        train = [args.cli, "train", "--model", base, "--data", records, "--epochs", "1",
                 "--batch-size", "8", "--warmup", "0", "--eval-fraction", "0", "--checkpoint",
                 "--max-tokens", "1024"] + threads

        # training: the whole model against an adapter (PEFT's defaults), alternated
        full, lora, adapters = [], [], []
        for r in range(args.repeat):
            for side in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
                out = os.path.join(work, f"{side}-{r}")
                if side == "full":
                    full.append(run(train + ["--lr", "1e-5", "--out", out]))
                else:
                    lora.append(run(train + ["--lr", "2e-4", "--lora", "--seed", str(r), "--out", out]))
                    adapters.append(out)
                print(f"  {side:4} run {r + 1}: {(full if side == 'full' else lora)[-1]}", flush=True)
        # four adapters to serve: the ones trained above, and more of other targets
        for k in range(len(adapters), 4):
            out = os.path.join(work, f"serve-{k}")
            run(train + ["--lr", "2e-4", "--lora", "--seed", str(10 + k), "--out", out,
                         "--lora-targets", ["query_key_value,dense", "dense_h_to_4h,dense_4h_to_h"][k % 2]])
            adapters.append(out)

        # serving: 16 sequences, 13 of them with one of 4 adapters, against the base alone
        bench = [args.cli, "bench", "--model", base, "--batch", "16", "--prompt-tokens", "64",
                 "--gen-tokens", "32"] + threads
        alone, mixed = [], []
        for r in range(args.repeat + 1):
            for side in ("alone", "mixed") if r % 2 == 0 else ("mixed", "alone"):
                extra = [a for d in adapters[:4] for a in ("--adapter", d)] if side == "mixed" else []
                (mixed if side == "mixed" else alone).append(run(bench + extra)["decode_tok_s"])

    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b))
    params = (lora[0]["trained_params"], full[0]["trained_params"])
    rows = [
        ("parameters trained", "%d / %d" % params, params[0] / params[1], None),
        ("peak memory (MB)", "%.0f / %.0f" % (statistics.median(x["peak_rss_mb"] for x in lora),
                                             statistics.median(x["peak_rss_mb"] for x in full)),
         ratio([x["peak_rss_mb"] for x in lora], [x["peak_rss_mb"] for x in full]), "<= 0.4"),
        ("training tokens/s", "%.0f / %.0f" % (statistics.median(x["train_tokens_per_s"] for x in lora),
                                              statistics.median(x["train_tokens_per_s"] for x in full)),
         ratio([x["train_tokens_per_s"] for x in lora], [x["train_tokens_per_s"] for x in full]), ">= 1.2"),
        ("decode tokens/s, batch 16: 4 adapters mixed / base alone",
         "%.1f / %.1f" % (statistics.median(mixed), statistics.median(alone)), ratio(mixed, alone), ">= 0.8"),
    ]
    print(f"\nLoRA (rank 8, PEFT's default targets) against full fine-tuning, {args.threads} threads, "
          f"median of {args.repeat} alternated runs:")
    for name, figures, r, goal in rows:
        verdict = "" if goal is None else ("  goal %s: %s" % (goal, "met" if eval(f"{r} {goal}") else "NOT met"))
        print(f"  {name:58} {figures:>24}  ratio {r:.3f}{verdict}")


if __name__ == "__main__":
    sys.exit(main())
