#!/usr/bin/env python3
"""The training benchmark, in one run: `dolly-cli train` against a plain torch training loop
(AdamW, same model, batch and sequence length, same number of threads) on the same records,
and our peak memory against parameters + gradients + AdamW state + activations.
See tests/bench/README.md.

    python3 tests/bench/bench_train.py [--threads 2] [--arch neox|gptj] [--steps 8]

Run it from the repository root after `make`. The random model (about 19M parameters,
made by `dolly-cli init`) and the records go to a temporary directory, deleted afterwards.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tokenizer.json")
BLURB = ("Below is an instruction that describes a task. Write a response that appropriately "
         "completes the request.")
RESPONSE_KEY = "### Response:\n"


def training_text(instruction, response):
    """Dolly's training text of a record without context (training/trainer.py)."""
    return f"{BLURB}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_KEY}{response}\n\n### End"


def make_records(tok, n, length, seed):
    """n records whose training text is exactly `length` tokens, so that both sides train on
    [batch, length] with no padding: random words are added to the response, then one-token
    words fill the last few positions."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = [w for w in ("a", "I", "the", "to", "of", "in", "is", "it", "and")
               if len(tok(" " + w).input_ids) == 1]
    if not fillers:
        sys.exit("bench_train: the tokenizer has no one-token filler word")
    records = []
    while len(records) < n:
        instruction = "Write down the words: " + " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(3))
        words = []
        size = lambda: len(tok(training_text(instruction, " ".join(words))).input_ids)
        while size() < length - 8:
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))))
        while size() < length:
            words.append(rng.choice(fillers))
        if size() == length:
            records.append({"instruction": instruction, "context": "", "response": " ".join(words)})
    return records


def count_parameters(path):
    """Elements of the tensors of a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    count = 0
    for name, t in header.items():
        if name != "__metadata__":
            n = 1
            for d in t["shape"]:
                n *= d
            count += n
    return count


def peak_rss_mb():
    """This process's peak resident memory (VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def torch_child(args):
    """The torch side, run in its own process so that its peak memory is its own: the
    transformers model from the same directory, AdamW with the same settings, batches of the
    same records with Dolly's completion-only labels, one warm-up step, then timed steps.
    Prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    with open(args.data) as f:
        records = [json.loads(line) for line in f]
    key = tok.convert_tokens_to_ids(RESPONSE_KEY)
    ids = torch.tensor([tok(training_text(r["instruction"], r["response"])).input_ids
                        for r in records])
    labels = ids.clone()
    for i in range(len(ids)):
        first = (ids[i] == key).nonzero()[0].item()
        labels[i, :first + 1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    B = args.batch_size
    steps = len(ids) // B

    def step(s):
        loss = model(input_ids=ids[s * B:(s + 1) * B], labels=labels[s * B:(s + 1) * B]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.item()

    step(0)
    t0 = time.perf_counter()
    for s in range(1, steps):
        loss = step(s)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": (steps - 1) * B * ids.shape[1] / elapsed,
                      "loss": loss, "peak_rss_mb": peak_rss_mb()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", choices=["neox", "gptj"], default="neox")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        return torch_child(args)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="dolly-bench-train-") as work:
        model = os.path.join(work, "model")
        data = os.path.join(work, "records.jsonl")
        arch = "gpt_neox" if args.arch == "neox" else "gptj"
        subprocess.run([args.cli, "init", "--arch", arch, "--layers", str(args.layers),
                        "--hidden", str(args.hidden), "--heads", str(args.heads),
                        "--context", str(max(2048, args.seq_len + 1)), "--tokenizer", TOKENIZER,
                        "--seed", "1", "--out", model], check=True)
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        params = count_parameters(os.path.join(model, "model.safetensors"))
        tok = AutoTokenizer.from_pretrained(model)
        # one epoch of `steps` optimizer steps, plus torch's untimed warm-up step
        records = make_records(tok, args.batch_size * (args.steps + 1), args.seq_len, 7)
        with open(data, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--torch-child", "--model", model,
             "--data", data, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr)], check=True, capture_output=True, text=True)
        hf = json.loads(child.stdout.strip().splitlines()[-1])

        ours_run = subprocess.run(
            [args.cli, "train", "--model", model, "--data", data, "--out", os.path.join(work, "out"),
             "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--warmup", "0", "--eval-fraction", "0", "--threads", str(args.threads),
             "--max-tokens", str(args.batch_size * args.seq_len)],
            check=True, capture_output=True, text=True)
        ours = dict(re.findall(r"(\w+)=(\S+)", ours_run.stdout))

    E = args.hidden
    L = args.layers
    F = 4 * E
    V = cfg["vocab_size"]
    T = args.batch_size * args.seq_len
    # what a backward pass keeps per token and layer: the layer's input, the norms' outputs,
    # q|k|v, the attention output and the MLP hidden before and after GELU; then the logits
    per_token = L * ((7 if arch == "gpt_neox" else 6) * E + 2 * F) + V
    mb = 1 / 2**20
    budget = {"parameters": 4 * params * mb, "gradients": 4 * params * mb,
             "AdamW state": 8 * params * mb, "activations": 4 * T * per_token * mb}
    ours_tps = float(ours["train_tokens_per_s"])
    print(f"model: {arch}, {L} layers, width {E}, {args.heads} heads, vocabulary {V}, "
          f"{params / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.steps} steps, {args.threads} threads")
    print(f"{'':28} {'ours':>12} {'torch':>12} {'ratio':>8}")
    print(f"{'training tokens/s':28} {ours_tps:12.0f} {hf['tokens_per_s']:12.0f} "
          f"{ours_tps / hf['tokens_per_s']:8.2f}")
    print(f"{'peak RSS (MB)':28} {float(ours['peak_rss_mb']):12.1f} {hf['peak_rss_mb']:12.1f} "
          f"{float(ours['peak_rss_mb']) / hf['peak_rss_mb']:8.2f}")
    print(f"{'last step loss':28} {float(ours['train_loss']):12.4f} {hf['loss']:12.4f}")
    total = sum(budget.values())
    print("memory budget: " + ", ".join(f"{k} {v:.1f}" for k, v in budget.items())
          + f" = {total:.1f} MB; ours / budget = {float(ours['peak_rss_mb']) / total:.2f}")


if __name__ == "__main__":
    sys.exit(main())
