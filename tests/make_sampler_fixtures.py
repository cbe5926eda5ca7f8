#!/usr/bin/env python3
"""Build tests/fixtures/sampler/hf_warpers.json: the token sets that transformers'
own logits warpers keep, so the C sampler is checked against transformers itself and
not only against our reading of it.

    python3 tests/make_sampler_fixtures.py [--out tests/fixtures]

Each case holds float32 logits, temperature, top_k, top_p and the ids left finite
after TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, applied as
generate() applies them (in that order, each only when it is switched on). Cases
whose answer could depend on what transformers leaves unspecified are redrawn: a tie
across the top-p cut (torch.sort is not stable) or a cumulative probability within
1e-5 of the cut (torch's vectorised exp differs from libm in the last bits).
"""

import argparse
import json
import os

import numpy as np
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

SEED = 42
CASES = 24
MARGIN = 1e-5


def hf_kept(logits, temperature, top_k, top_p):
    """Ids that transformers' warpers leave finite, as generate() chains them."""
    scores = torch.tensor(logits, dtype=torch.float32)[None, :]
    ids = torch.zeros((1, 1), dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k=top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(ids, scores)
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def unambiguous(logits, temperature, top_k, top_p):
    """False when the top-p cut falls in a tie or too close to a cumulative sum."""
    if top_p >= 1.0:
        return True
    x = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    if top_k:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(x, kind="stable")
    xs = x[order].astype(np.float64)
    p = np.exp(xs - xs.max())
    cum = np.cumsum(p / p.sum())
    thr = 1.0 - top_p
    removed = cum <= thr
    removed[-1] = False
    cut = int(removed.sum())         # first kept position in ascending order
    if cut > 0 and xs[cut - 1] == xs[cut] and np.isfinite(xs[cut]):
        return False
    return bool(np.all(np.abs(cum[np.isfinite(xs)] - thr) > MARGIN))


def make_cases(rng):
    """Random float32 logit rows with warper settings, some with many tied values."""
    cases = []
    while len(cases) < CASES:
        vocab = int(rng.choice([5, 17, 64, 100]))
        scale = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        logits = rng.normal(0.0, scale, vocab).astype(np.float32)
        if len(cases) % 3 == 0:
            logits = (np.round(logits * 2) / 2).astype(np.float32)
        temperature = float(np.float32(rng.choice([1.0, 0.7, 1.3])))
        top_k = int(rng.choice([0, 0, 0, 1, 4, 10, vocab]))
        top_p = float(np.float32(rng.choice([1.0, 0.95, 0.92, 0.8, 0.5, 0.3])))
        values = [float(v) for v in logits]
        if not unambiguous(values, temperature, top_k, top_p):
            continue
        cases.append({"logits": values, "temperature": temperature, "top_k": top_k,
                      "top_p": top_p, "kept": hf_kept(values, temperature, top_k, top_p)})
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "fixtures"))
    args = ap.parse_args()
    out = os.path.join(args.out, "sampler")
    os.makedirs(out, exist_ok=True)
    cases = make_cases(np.random.default_rng(SEED))
    with open(os.path.join(out, "hf_warpers.json"), "w") as f:
        json.dump({"cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {out}/hf_warpers.json")


if __name__ == "__main__":
    main()
