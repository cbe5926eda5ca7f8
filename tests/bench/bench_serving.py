#!/usr/bin/env python3
"""bench_serving.py: dolly_generate through PostgreSQL, measured in one run.

1. Aggregate generated tokens/s with 1, 4 and 16 concurrent sessions (pgbench, greedy, distinct
   prompts per client), counted by the server itself (dolly_server.generated_tokens), on a
   random GPT-NeoX model of about 100M parameters made by `dolly-cli init` (never committed).
2. One statement over 64 rows (Dolly's template, greedy), in generated tokens/s: a call per
   row (dolly.query_batch = 1), which decodes at batch 1; the same statement through the Dolly
   Batch node, which keeps dolly.max_batch rows in flight; one call over the array of the 64
   instructions.
3. The SQL path's overhead: one session calling dolly_generate_raw against dolly-cli generating
   the same greedy continuation of the same prompt with the same model and threads.

Needs dolly installed (make install), PostgreSQL 15's binaries and pgbench; run as a user that
may run PostgreSQL (not root). Usage: python3 tests/bench/bench_serving.py [--seconds 30]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30, help="pgbench duration per client count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="max_new_tokens per request")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--batch-tokens", type=int, default=32, help="max_new_tokens of the 64-row statement")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    work = tempfile.mkdtemp(prefix="dolly-bench-serving-")
    model = os.path.join(work, "model")
    data = os.path.join(work, "data")
    sock = work
    port = "54331"
    try:
        run([args.cli, "init", "--arch", "gpt_neox", "--layers", str(args.layers), "--hidden",
             str(args.hidden), "--heads", str(args.hidden // 64), "--context", "2048",
             "--tokenizer", os.path.join(ROOT, "tests/fixtures/tokenizer/tokenizer.json"),
             "--seed", "1", "--out", model])
        run([os.path.join(BIN, "initdb"), "-D", data, "-A", "trust"])
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"""
shared_preload_libraries = 'dolly'
port = {port}
listen_addresses = ''
unix_socket_directories = '{sock}'
dolly.model = '{model}'
dolly.threads = {args.threads}
dolly.max_batch = {max(clients)}
max_connections = {max(clients) + 10}
""")
        run([os.path.join(BIN, "pg_ctl"), "-D", data, "-l", os.path.join(work, "log"), "-w", "start"])
        psql = [os.path.join(BIN, "psql"), "-X", "-A", "-t", "-h", sock, "-p", port, "-d", "postgres"]

        def sql(q):
            return run(psql + ["-c", q]).stdout.strip()

        sql("CREATE EXTENSION dolly")
        sql("SELECT dolly_generate_raw('warm up', max_new_tokens => 4, do_sample => false)")
        params = int(sql("SELECT parameters FROM dolly_server"))
        print(f"model: GPT-NeoX {args.layers} layers x {args.hidden}, {params / 1e6:.1f}M parameters, "
              f"{args.threads} threads, max_new_tokens {args.tokens}, greedy")

        script = os.path.join(work, "gen.sql")
        with open(script, "w") as f:
            f.write(f"SELECT dolly_generate_raw('Request ' || :client_id || ' asks about ' || "
                    f"(random() * 1000)::int, max_new_tokens => {args.tokens}, do_sample => false);\n")
        rows = []
        for n in clients:
            before = int(sql("SELECT generated_tokens FROM dolly_server"))
            t0 = time.time()
            run([os.path.join(BIN, "pgbench"), "-n", "-h", sock, "-p", port, "-c", str(n), "-j", str(n),
                 "-T", str(args.seconds), "-f", script, "postgres"])
            elapsed = time.time() - t0
            after = int(sql("SELECT generated_tokens FROM dolly_server"))
            rows.append((n, (after - before) / elapsed))
        base = rows[0][1]
        print("\n| sessions | generated tokens/s | vs 1 session |")
        print("|---|---|---|")
        for n, tps in rows:
            print(f"| {n} | {tps:.1f} | {tps / base:.2f}x |")

        # one statement over 64 rows: a call per row, and one call over their array
        def statement_tps(q):
            before = int(sql("SELECT generated_tokens FROM dolly_server"))
            t0 = time.time()
            sql(q)
            elapsed = time.time() - t0
            return (int(sql("SELECT generated_tokens FROM dolly_server")) - before) / elapsed

        opts = f"max_new_tokens => {args.batch_tokens}, do_sample => false"
        rows_q = f"SELECT dolly_generate('Tell me about item ' || i, {opts}) FROM generate_series(1, 64) i"
        per_row = statement_tps(f"SET dolly.query_batch = 1; CREATE TEMP TABLE a AS {rows_q}")
        batched = statement_tps(f"CREATE TEMP TABLE a AS {rows_q}")
        array = statement_tps(f"SELECT cardinality(dolly_generate(array_agg('Tell me about item ' || i ORDER BY i), {opts})) "
                              f"FROM generate_series(1, 64) i")
        sessions = rows[-1][1]
        print(f"\none statement over 64 rows, {args.batch_tokens} new tokens, tokens/s: a call per row "
              f"(dolly.query_batch = 1) {per_row:.1f}; the same statement through Dolly Batch {batched:.1f} "
              f"({batched / per_row:.2f}x); one call over their array {array:.1f} ({array / per_row:.2f}x); "
              f"{max(clients)} sessions above {sessions:.1f} (Dolly Batch / sessions {batched / sessions:.2f})")

        # overhead of the SQL path: the same greedy continuation, alone, both ways
        prompt = "The history of the database begins"
        before = int(sql("SELECT generated_tokens FROM dolly_server"))
        call = f"SELECT dolly_generate_raw('{prompt}', max_new_tokens => {args.tokens}, do_sample => false);\n"
        out = run(psql + ["-f", "-"], input="\\timing on\n" + call * 5).stdout
        sql_times = [float(t) / 1000 for t in re.findall(r"Time: ([\d.]+) ms", out)]
        ntok = (int(sql("SELECT generated_tokens FROM dolly_server")) - before) // 5
        sql_s = statistics.median(sql_times)
        run([os.path.join(BIN, "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"])
        cli_times = []
        for _ in range(5):
            out = run([args.cli, "generate", "--model", model, "--threads", str(args.threads), "--raw",
                       "--greedy", "--max-new-tokens", str(args.tokens), prompt]).stderr
            m = re.search(r"prefill: (\d+) tokens, ([\d.]+) tokens/s; decode: (\d+) tokens, ([\d.]+) tokens/s", out)
            p, ps, d, ds = int(m.group(1)), float(m.group(2)), int(m.group(3)), float(m.group(4))
            cli_times.append(p / ps + d / ds)
            cli_tokens = d
        cli_s = statistics.median(cli_times)
        print(f"\nSQL path, one session: {ntok} tokens in {sql_s * 1000:.0f} ms (in one session, as \\timing sees it); "
              f"dolly-cli: {cli_tokens} tokens in {cli_s * 1000:.0f} ms (model load excluded); "
              f"overhead {100 * (sql_s / cli_s - 1):+.1f}%")
    finally:
        subprocess.run([os.path.join(BIN, "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
