#!/usr/bin/env python3
"""bench_serving.py: dolly_generate through PostgreSQL, measured in one run.

1. Aggregate generated tokens/s with 1, 4 and 16 concurrent sessions (pgbench, greedy, distinct
   prompts per client), counted by the server itself (dolly_server.generated_tokens), on a
   random GPT-NeoX model of about 100M parameters made by `dolly-cli init` (never committed).
2. One statement over 64 rows (Dolly's template, greedy), in generated tokens/s: a call per
   row (dolly.query_batch = 1), which decodes at batch 1; the same statement through the Dolly
   Batch node, which keeps dolly.max_batch rows in flight, against the same rows spread over
   16 sessions; one call over the array of the 64 instructions.
   The busiest run is traced by the server (dolly.step_trace): where its time went (forward
   passes, answering, taking requests, between passes) and how full its passes were.
3. What Dolly Batch's planner hook costs a query without dolly calls (pgbench, simple protocol).
4. The SQL path's overhead: one session calling dolly_generate_raw against dolly-cli generating
   the same greedy continuation of the same prompt with the same model and threads.
5. The busiest run against the engine alone: `dolly-cli bench --batch N` (decode only) on the
   same model, threads and prompt length, alternated --repeat times (median of the ratios).

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
    ap.add_argument("--repeat", type=int, default=3, help="runs of the busiest client count, each beside the engine alone")
    ap.add_argument("--batch-tokens", type=int, default=32, help="max_new_tokens of the 64-row statement")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    ap.add_argument("--trace", help="keep the busiest run's server trace (CSV) at this path")
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
        trace = os.path.join(work, "trace.csv")

        def sessions_tps(n):
            """pgbench with n clients: generated tokens/s as the server counts them, mean prompt."""
            before = sql("SELECT generated_tokens || ',' || prompt_tokens || ',' || requests FROM dolly_server")
            t0 = time.time()
            run([os.path.join(BIN, "pgbench"), "-n", "-h", sock, "-p", port, "-c", str(n), "-j", str(n),
                 "-T", str(args.seconds), "-f", script, "postgres"])
            elapsed = time.time() - t0
            after = sql("SELECT generated_tokens || ',' || prompt_tokens || ',' || requests FROM dolly_server")
            gen0, prompt0, req0 = map(int, before.split(","))
            gen1, prompt1, req1 = map(int, after.split(","))
            return (gen1 - gen0) / elapsed, round((prompt1 - prompt0) / max(1, req1 - req0))

        def engine_tps(n, prompt_tokens):
            """The engine alone at batch n, decode only, on the same model, threads and prompt length."""
            out = run([args.cli, "bench", "--model", model, "--threads", str(args.threads), "--batch", str(n),
                       "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(args.tokens)]).stdout
            return float(re.search(r"decode_tok_s=([\d.]+)", out).group(1))

        busiest = max(clients)
        pairs = []
        for n in clients:
            if n != busiest:
                rows.append((n, sessions_tps(n)[0]))
                continue
            # the server's own account of its passes (dolly.step_trace) for the busiest run
            sql(f"ALTER SYSTEM SET dolly.step_trace = '{trace}'")
            sql("SELECT pg_reload_conf()")
            time.sleep(1)
            # this VM's speed drifts by several percent from minute to minute: the sessions and
            # the engine alone alternate, and the ratio is the median of the pairs
            for _ in range(args.repeat):
                tps, mean_prompt = sessions_tps(n)
                pairs.append((tps, engine_tps(n, mean_prompt)))
                if len(pairs) == 1:
                    sql("ALTER SYSTEM RESET dolly.step_trace")
                    sql("SELECT pg_reload_conf()")
            rows.append((n, statistics.median(t for t, _ in pairs)))
        base = rows[0][1]
        print("\n| sessions | generated tokens/s | vs 1 session |")
        print("|---|---|---|")
        for n, tps in rows:
            print(f"| {n} | {tps:.1f} | {tps / base:.2f}x |")

        # one statement over 64 rows: a call per row, and one call over their array
        def statement_tps(*statements):
            """Generated tokens/s of the statements run at once, each in its own session."""
            before = int(sql("SELECT generated_tokens FROM dolly_server"))
            t0 = time.time()
            procs = [subprocess.Popen(psql + ["-c", q], stdout=subprocess.DEVNULL) for q in statements]
            if any(p.wait() for p in procs):
                raise RuntimeError("a statement failed")
            elapsed = time.time() - t0
            return (int(sql("SELECT generated_tokens FROM dolly_server")) - before) / elapsed

        opts = f"max_new_tokens => {args.batch_tokens}, do_sample => false"

        def rows_q(lo, hi):
            return f"SELECT dolly_generate('Tell me about item ' || i, {opts}) FROM generate_series({lo}, {hi}) i"

        per_row = statement_tps(f"SET dolly.query_batch = 1; CREATE TEMP TABLE a AS {rows_q(1, 64)}")
        # the peer of one statement: the same 64 rows spread over 16 sessions, a call per row in
        # each; alternated with the statement, as the VM's speed drifts (median of the ratios)
        spread = [f"SET dolly.query_batch = 1; CREATE TEMP TABLE a AS {rows_q(4 * s + 1, 4 * s + 4)}"
                  for s in range(16)]
        spread_pairs = [(statement_tps(f"CREATE TEMP TABLE a AS {rows_q(1, 64)}"), statement_tps(*spread))
                        for _ in range(args.repeat)]
        batched = statistics.median(b for b, _ in spread_pairs)
        spread_ratio = statistics.median(b / s for b, s in spread_pairs)
        array = statement_tps(f"SELECT cardinality(dolly_generate(array_agg('Tell me about item ' || i ORDER BY i), {opts})) "
                              f"FROM generate_series(1, 64) i")
        # the most common way to fill a column, both ways
        sql("CREATE TABLE tasks AS SELECT i, 'Tell me about item ' || i AS q, NULL::text AS answer "
            "FROM generate_series(1, 64) i")
        update = f"UPDATE tasks SET answer = dolly_generate(q, {opts})"
        update_per_row = statement_tps(f"SET dolly.query_batch = 1; {update}")
        update_batched = statement_tps(update)
        print(f"\nUPDATE tasks SET answer = dolly_generate(q, ...) over 64 rows, tokens/s: a call per row "
              f"{update_per_row:.1f}; through Dolly Batch {update_batched:.1f} ({update_batched / update_per_row:.2f}x)")
        print(f"\none statement over 64 rows, {args.batch_tokens} new tokens, tokens/s: a call per row "
              f"(dolly.query_batch = 1) {per_row:.1f}; the same statement through Dolly Batch {batched:.1f} "
              f"({batched / per_row:.2f}x); one call over their array {array:.1f} ({array / per_row:.2f}x)")
        print("the statement through Dolly Batch against the same 64 rows spread over 16 sessions (a call per "
              "row), alternated: " + "; ".join(f"{b:.1f} / {s:.1f}" for b, s in spread_pairs)
              + f" tokens/s; median ratio {spread_ratio:.2f}")

        # what Dolly Batch's planner hook costs a query that has no dolly call: an indexed
        # lookup through the simple protocol (planned every time), the hook walking each plan
        # against dolly.query_batch = 1 (which skips the walk), alternated, best of 3
        run([os.path.join(BIN, "pgbench"), "-i", "-s", "2", "-h", sock, "-p", port, "postgres"])
        lookup = os.path.join(work, "lookup.sql")
        with open(lookup, "w") as f:
            f.write("\\set aid random(1, 200000)\n"
                    "SELECT abalance, lower(filler), length(filler) + 1 FROM pgbench_accounts WHERE aid = :aid;\n")
        tps = {0: [], 1: []}
        for _ in range(3):
            for qb in (0, 1):
                out = run([os.path.join(BIN, "pgbench"), "-n", "-M", "simple", "-h", sock, "-p", port, "-c", "1",
                           "-T", "5", "-f", lookup, "postgres"], env=dict(os.environ, PGOPTIONS=f"-c dolly.query_batch={qb}")).stdout
                tps[qb].append(float(re.search(r"tps = ([\d.]+)", out).group(1)))
        print(f"\nplanner hook, a query without dolly calls: {max(tps[0]):.0f} queries/s planned with the hook, "
              f"{max(tps[1]):.0f} with dolly.query_batch = 1 ({max(tps[0]) / max(tps[1]):.3f}x)")

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

        # the engine alone at the batch the busiest run had
        engine = statistics.median(e for _, e in pairs)
        ratios = sorted(t / e for t, e in pairs)
        print(f"\n{busiest} sessions against dolly-cli bench --batch {busiest} --prompt-tokens {mean_prompt} "
              f"(decode only), alternated {len(pairs)} times: "
              + "; ".join(f"{t:.1f} / {e:.1f}" for t, e in pairs)
              + f" tokens/s; median ratio {statistics.median(ratios):.2f} (from {ratios[0]:.2f} to {ratios[-1]:.2f})")
        summarise_trace(trace, busiest, 1000.0 * busiest / engine)
        if args.trace:
            shutil.copy(trace, args.trace)
    finally:
        subprocess.run([os.path.join(BIN, "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def summarise_trace(path, batch, engine_step_ms):
    """Where the server's time went in the traced run (dolly.step_trace's CSV)."""
    import csv
    with open(path) as f:
        passes = [p for p in csv.DictReader(f)]
    if len(passes) < 2:
        print("no trace")
        return
    wall = float(passes[-1]["start_s"]) - float(passes[0]["start_s"])
    total = {k: sum(float(p[k]) for p in passes[1:]) / 1000 for k in ("gap_ms", "take_ms", "step_ms", "answer_ms")}
    rows = [int(p["decode_rows"]) for p in passes]
    prefill = [int(p["prefill_tokens"]) for p in passes]
    full = [float(p["step_ms"]) for p in passes if int(p["decode_rows"]) == batch and int(p["prefill_tokens"]) == 0]
    print(f"server trace: {len(passes)} passes in {wall:.1f} s; time in the forward pass "
          f"{100 * total['step_ms'] / wall:.1f}%, answering {100 * total['answer_ms'] / wall:.1f}%, "
          f"taking requests {100 * total['take_ms'] / wall:.1f}%, between passes {100 * total['gap_ms'] / wall:.1f}%")
    print(f"  per pass: {statistics.mean(rows):.1f} decoding sequences of {batch} at most, "
          f"{statistics.mean(prefill):.1f} prompt tokens prefilled ({100 * sum(1 for t in prefill if t) / len(passes):.0f}% "
          f"of passes prefill); passes with {batch} decoding and no prefill: {len(full)}, "
          + (f"median {statistics.median(full):.1f} ms against dolly-cli's {engine_step_ms:.1f} ms a step"
             if full else f"dolly-cli's step {engine_step_ms:.1f} ms"))


if __name__ == "__main__":
    sys.exit(main())
