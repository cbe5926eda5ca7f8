#!/usr/bin/env python3
"""check_saved_model.py: transformers (and PEFT) load the model (and adapter) directories
dolly saves, and compute the same logits as our engine.

    python3 tests/check_saved_model.py [--cli build/dolly-cli] [MODEL_DIR ...]

For each directory: AutoTokenizer and AutoModelForCausalLM (float32) load it with no missing,
unexpected or mismatched tensors (a tied model's output layer is its input embedding), the
tokenizer gives the same ids as ours for a Dolly training text (special tokens included),
and transformers' logits equal `dolly-cli logits` within 1e-4 (both compute in float32; the
engine's own tests hold it to that bound against transformers on the fixtures).

Without directories it makes its own in a temporary directory, covering every path of
model_save: from a base tokenizer without Dolly's tokens (the fixture's, with them taken
out), `dolly-cli init` for GPT-NeoX (untied) and GPT-J (tied), so both grow their tables
for the three tokens; then `dolly-cli train` for a few steps on each, saving again; then
`dolly-cli train --lora` over each fine-tuned model, every linear module targeted, saving
a PEFT adapter, which PeftModel.from_pretrained loads over its base (the directory
adapter_config.json names) to give `dolly-cli logits --adapter`'s logits; then `dolly-cli
merge` of each adapter into its base, a plain model directory that transformers loads.
Last, a GPT-NeoX base as Pythia comes (tables with rows past its tokenizer, which lacks
Dolly's tokens): its adapter owns those tokens' rows (PEFT's trainable_token_indices) and
carries the tokenizer that has them, with which both sides tokenize.

Needs torch, transformers and peft (tests/requirements-fixtures.txt); CI has none of them,
so the C tests test_model_save.c and test_lora.c cover save / reload / identical logits there.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import peft
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOLLY_KEYS = ["### End", "### Instruction:", "### Response:\n"]
ALL_MODULES = {"gpt_neox": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
               "gptj": "q_proj,k_proj,v_proj,out_proj,fc_in,fc_out"}
TEXT = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5\n\n### End")
TOL = 1e-4


def run(cmd):
    """Run a command, echoing it; stop on failure."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def base_tokenizer(path):
    """The fixture tokenizer without Dolly's special tokens, as a base model's comes."""
    with open(os.path.join(ROOT, "tests/fixtures/tokenizer/tokenizer.json")) as f:
        tok = json.load(f)
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in DOLLY_KEYS]
    with open(path, "w") as f:
        json.dump(tok, f)


def make_models(cli, work):
    """Initialised and fine-tuned models of both architectures; returns their directories."""
    tok = os.path.join(work, "base_tokenizer.json")
    base_tokenizer(tok)
    data = os.path.join(work, "records.jsonl")
    with open(data, "w") as f:
        for a in range(8):
            for b in range(4):
                f.write(json.dumps({"instruction": f"Add {a} and {b}.", "context": "",
                                    "response": str(a + b)}) + "\n")
    dirs = []
    for arch, extra in (("gpt_neox", []), ("gptj", ["--tie-embeddings"])):
        init = os.path.join(work, f"{arch}-init")
        tuned = os.path.join(work, f"{arch}-tuned")
        run([cli, "init", "--arch", arch, "--layers", "2", "--hidden", "64", "--heads", "4",
             "--context", "256", "--tokenizer", tok, "--seed", "3", "--out", init] + extra)
        run([cli, "train", "--model", init, "--data", data, "--out", tuned, "--epochs", "1",
             "--batch-size", "8", "--lr", "1e-3", "--warmup", "0", "--threads", "2"])
        adapter = os.path.join(work, f"{arch}-lora")
        run([cli, "train", "--model", tuned, "--data", data, "--out", adapter, "--epochs", "2",
             "--batch-size", "8", "--lr", "1e-2", "--warmup", "0", "--threads", "2", "--lora",
             "--lora-rank", "4", "--lora-targets", ALL_MODULES[arch]])
        merged = os.path.join(work, f"{arch}-merged")
        run([cli, "merge", "--model", tuned, "--adapter", adapter, "--out", merged])
        dirs += [init, tuned, adapter, merged]
    plain = os.path.join(work, "gpt_neox-plain")
    shutil.copytree(os.path.join(work, "gpt_neox-init"), plain)
    base_tokenizer(os.path.join(plain, "tokenizer.json"))
    adapter = os.path.join(work, "gpt_neox-plain-lora")
    run([cli, "train", "--model", plain, "--data", data, "--out", adapter, "--epochs", "2",
         "--batch-size", "8", "--lr", "1e-2", "--warmup", "0", "--threads", "2", "--lora",
         "--lora-rank", "4"])
    merged = os.path.join(work, "gpt_neox-plain-merged")
    run([cli, "merge", "--model", plain, "--adapter", adapter, "--out", merged])
    return dirs + [adapter, merged]


def check(cli, path, work):
    """Load a model directory with transformers, or an adapter directory with PEFT over its
    base, and compare with the engine; returns a list of problems."""
    problems = []
    adapter = os.path.exists(os.path.join(path, "adapter_config.json"))
    with open(os.path.join(path, "adapter_config.json")) if adapter else open(os.devnull) as f:
        model_dir = json.load(f)["base_model_name_or_path"] if adapter else path
    ours_path = os.path.join(work, os.path.basename(path.rstrip("/")) + "-logits.safetensors")
    run([cli, "logits", "--model", model_dir, "--out", ours_path, "--threads", "2", TEXT] +
        (["--adapter", path] if adapter else []))
    ours = load_file(ours_path)

    # an adapter with token rows has its own tokenizer (the base's lacks their tokens)
    own = os.path.join(path, "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=own) if adapter and os.path.exists(own) \
        else AutoTokenizer.from_pretrained(model_dir)
    ids = tok(TEXT, return_tensors="pt").input_ids
    for key in DOLLY_KEYS:
        if len(tok(key).input_ids) != 1:
            problems.append(f"transformers does not see {key!r} as one token")
    if not torch.equal(ids[0], ours["ids"].long()):
        problems.append(f"token ids differ: transformers {ids[0].tolist()}, ours {ours['ids'].tolist()}")

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                       output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            problems.append(f"{kind}: {sorted(info[kind])}")
    if model.config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()):
        problems.append("tied model: output layer is not the input embedding")
    if adapter:
        with torch.no_grad():
            base_logits = model.eval()(ids).logits[0].float()
        model = peft.PeftModel.from_pretrained(model, path)
        moved = (base_logits - ours["logits"]).abs().max().item()
        print(f"  the adapter moves the base's logits by up to {moved:.3g}")
        if not moved > 1e-3:
            problems.append("the adapter leaves the base's logits as they were: nothing was trained")
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    if logits.shape != ours["logits"].shape:
        problems.append(f"logits shape {tuple(logits.shape)}, ours {tuple(ours['logits'].shape)}")
    else:
        diff = (logits - ours["logits"]).abs().max().item()
        print(f"  {path}: {model.config.model_type}{' + LoRA' if adapter else ''}, vocabulary {logits.shape[1]}, "
              f"tied {model.config.tie_word_embeddings}, {ids.shape[1]} tokens, "
              f"max |logits - ours| = {diff:.3g} (|logits| up to {logits.abs().max().item():.3g})")
        if not diff <= TOL:
            problems.append(f"logits differ by {diff:.3g} (tolerance {TOL})")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", default=os.path.join(ROOT, "build/dolly-cli"))
    ap.add_argument("dirs", nargs="*", help="saved model directories (default: make some)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dolly-check-") as work:
        dirs = args.dirs or make_models(args.cli, work)
        for d in dirs:
            problems = check(args.cli, d, work)
            print(f"{'ok  ' if not problems else 'FAIL'} {d}")
            for p in problems:
                print(f"    {p}")
            failed += bool(problems)
    print(f"{len(dirs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
