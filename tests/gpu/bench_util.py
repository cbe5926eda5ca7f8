"""bench_util.py: what the CUDA benchmark scripts share: running one of our benchmark
binaries and reading its key=value lines."""

import os
import subprocess
import sys


def run_keyvalues(cmd, env=None, show_stderr=False):
    """Run cmd (echoed, its output passed through; env: variables to add); its key=value
    lines as a dict, numbers as floats. Exits when it fails."""
    print("$ " + " ".join([f"{k}={v}" for k, v in (env or {}).items()] + cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    sys.stdout.write(p.stdout)
    if show_stderr:
        sys.stdout.write(p.stderr)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr}")
    out = {}
    for line in p.stdout.splitlines():
        k, _, v = line.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out
