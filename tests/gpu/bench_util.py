"""bench_util.py: what the CUDA benchmark scripts share: running one of our benchmark
binaries, streaming its output, and recording its key=value figures as JSON lines, each
written as it arrives so that a run cut short keeps what it measured.

    python3 tests/gpu/bench_util.py run JSONL CMD...               runs CMD so
    python3 tests/gpu/bench_util.py record JSONL SOURCE KEY VALUE  records one figure
(for run.sh: the rehearsal's benchmarks, the tests' and the sanitizer's figures)
"""

import json
import os
import subprocess
import sys


def record(jsonl, source, key, value):
    """Append the figure {source, key, value} to the JSON-lines file jsonl (None: nowhere)."""
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"source": source, "key": key, "value": value}) + "\n")


def number_or_text(v):
    """v as a float when it reads as one."""
    try:
        return float(v)
    except ValueError:
        return v


def run_keyvalues(cmd, env=None, show_stderr=False, jsonl=None):
    """Run cmd (echoed, its output passed through line by line; env: variables to add; its
    stderr in the output with show_stderr, else straight to ours); its key=value lines as a
    dict, numbers as floats, each recorded to jsonl as it comes. Exits when it fails."""
    print("$ " + " ".join([f"{k}={v}" for k, v in (env or {}).items()] + cmd), flush=True)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.STDOUT if show_stderr else None,
                         env={**os.environ, **(env or {})})
    out = {}
    for line in p.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        k, eq, v = line.rstrip("\n").partition("=")
        if eq:
            out[k] = number_or_text(v)
            record(jsonl, os.path.basename(cmd[0]), k, out[k])
    if p.wait() != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode})")
    return out


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_keyvalues(sys.argv[3:], jsonl=sys.argv[2])
    else:
        record(sys.argv[2], sys.argv[3], sys.argv[4], number_or_text(sys.argv[5]))
