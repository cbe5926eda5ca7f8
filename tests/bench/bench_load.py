#!/usr/bin/env python3
"""The loading benchmark, in one run: `dolly-cli load` against transformers'
`from_pretrained` on the same GPT-J-shaped model directory, load time and peak resident
memory, from a warm page cache, with the matrices kept in float32 and in bfloat16
(`--bf16`, `dolly.cpu_weights = bfloat16`). See tests/bench/README.md.

    python3 tests/bench/bench_load.py [--layers 4] [--format safetensors|bin] [--threads 2]

Run it from the repository root after `make`. The random model goes to a temporary
directory (or --workdir) and is deleted afterwards unless --keep.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 1234
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# transformers in a child process, so that its peak memory is its own (VmHWM)
HF_CHILD = r"""
import sys, time, torch, transformers

def vm_hwm_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

path, dtype, threads = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
base = vm_hwm_mb()
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
t = time.perf_counter() - t
kept = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(f"load_s={t:.3f} peak_rss_mb={vm_hwm_mb():.1f} param_mb={kept:.1f} base_rss_mb={base:.1f}")
"""


def make_config(layers):
    """GPT-J-6B's width (4096, 16 heads, rotary 64, MLP 16384, 50400 rows) with `layers` layers."""
    return transformers.GPTJConfig(
        vocab_size=50400, n_embd=4096, n_layer=layers, n_head=16, rotary_dim=64,
        n_positions=2048, activation_function="gelu_new", tie_word_embeddings=False)


def shapes(config):
    """transformers' state dict of config on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config).state_dict()


def make_model(config, path, fmt, dtype):
    """Seeded random weights (std 0.02) under transformers' names, written in dtype as
    save_pretrained writes safetensors, or as transformers 4 wrote a .bin (torch.save of
    the state dict); built a tensor at a time, never the model in float32."""
    gen = torch.Generator().manual_seed(SEED)
    sd = {}
    for name, t in shapes(config).items():
        if name.endswith(".weight") and "ln" in name:
            sd[name] = torch.ones(t.shape, dtype=dtype)
        else:
            sd[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(dtype)
    os.makedirs(path, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(path)
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    os.sync()                   # no write-back competing with the timings


def warm(path):
    """Read every file of the directory once, so both sides load from the page cache."""
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            while f.read(64 << 20):
                pass


def parse_fields(text):
    """key=value fields of the last line that has any, as floats."""
    for line in reversed(text.splitlines()):
        fields = dict(re.findall(r"(\w+)=([0-9.]+)", line))
        if "load_s" in fields:
            return {k: float(v) for k, v in fields.items()}
    return None


def measure(cmd):
    """(fields, None) of one load, or (None, why) when it failed."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    fields = parse_fields(p.stdout) if p.returncode == 0 else None
    if fields is None:
        lines = p.stderr.strip().splitlines()
        said = [l for l in lines if l.startswith("dolly-cli:")] or lines[-1:]
        return None, said[0] if said else "exit status %d" % p.returncode
    return fields, None


def best(runs):
    """The fastest run's time and the highest peak over the runs (noise only adds time;
    memory is the same each run, so the highest is the honest one)."""
    ok = [r for r in runs if r]
    if not ok:
        return None
    return {"load_s": min(r["load_s"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "param_mb": ok[0]["param_mb"],
            "base_rss_mb": ok[0].get("base_rss_mb")}


def fmt(x, spec):
    """x formatted as spec, or "n/a" as wide."""
    return format(x, spec) if x is not None else format("n/a", ">" + re.match(r"\d*", spec).group())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4,
                    help="GPT-J-6B-wide layers (4: 1.22B parameters, 2.4 GB in bf16)")
    ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--file-dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--kept", choices=["both", "f32", "bf16"], default="both",
                    help="what the CPU keeps the matrices in: float32, bfloat16 (--bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="loads per figure; the best counts")
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="dolly-bench-load-")
    path = os.path.join(work, "gptj-%dl-%s-%s" % (args.layers, args.file_dtype, args.format))
    try:
        config = make_config(args.layers)
        n = sum(t.numel() for t in shapes(config).values())
        if not os.path.exists(os.path.join(path, "config.json")):
            print(f"writing the model to {path} ...", flush=True)
            make_model(config, path, args.format, DTYPES[args.file_dtype])
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        warm(path)
        kept = ["f32", "bf16"] if args.kept == "both" else [args.kept]
        rows = []
        for k in kept:
            ours_cmd = [args.cli, "load", "--model", path, "--threads", str(args.threads)]
            ours_cmd += ["--bf16"] if k == "bf16" else []
            hf_cmd = [sys.executable, "-c", HF_CHILD, path,
                      "bfloat16" if k == "bf16" else "float32", str(args.threads)]
            ours, theirs, why = [], [], {}
            # alternate, so that a burst of load on a shared machine hits both sides
            for _ in range(args.repeat):
                for runs, cmd, side in ((ours, ours_cmd, "ours"), (theirs, hf_cmd, "transformers")):
                    r, w = measure(cmd)
                    runs.append(r)
                    if w:
                        why[side] = w
            rows.append((k, best(ours), best(theirs), why))

        print(f"\nGPT-J-shaped model: {args.layers} layers x 4096, {n / 1e9:.2f}B parameters, "
              f"{args.file_dtype} {args.format} {size / 2**30:.2f} GiB, {args.threads} threads, "
              f"best of {args.repeat} from a warm page cache ({path})")
        print(f"{'kept':<6}{'load s':>8}{'ours':>9}{'transf.':>9}{'ratio':>8}  goal <= 2 (1)"
              f" | {'peak MB':>8}{'ours':>9}{'transf.':>9}  ours/kept  goal <= 1.1")
        for k, o, t, why in rows:
            tr = o["load_s"] / t["load_s"] if o and t else None
            mr = o["peak_rss_mb"] / o["param_mb"] if o else None
            print(f"{k:<6}{'':>8}{fmt(o and o['load_s'], '9.2f')}{fmt(t and t['load_s'], '9.2f')}"
                  f"{fmt(tr, '8.2f')}  {'ok' if tr is not None and tr <= 2 else '--':>13}"
                  f" | {'':>8}{fmt(o and o['peak_rss_mb'], '9.0f')}{fmt(t and t['peak_rss_mb'], '9.0f')}"
                  f"  {fmt(mr, '9.2f')}  {'ok' if mr is not None and mr <= 1.1 else '--':>11}")
            kept_mb = (o or t or {}).get("param_mb")
            print(f"      kept {fmt(kept_mb, '.0f')} MB; transformers' Python and torch before "
                  f"loading: {fmt(t and t['base_rss_mb'], '.0f')} MB of its peak")
            for side, w in why.items():
                print(f"      {side} failed: {w}")
        failed = any(o is None for _, o, _, _ in rows)
        return 1 if failed else 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
