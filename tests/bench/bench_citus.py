#!/usr/bin/env python3
"""bench_citus.py: one 64-row statement on one node and on a Citus cluster, in one run.

Starts three PostgreSQL clusters on this machine (a coordinator and two workers, each with
citus and dolly preloaded and dolly.threads = 1, serving the same random GPT-NeoX model made
by `dolly-cli init`, never committed), distributes a table of 64 instructions over 8 shards,
and runs `CREATE TABLE ... AS SELECT id, dolly_generate(instruction, ...) FROM tasks` (greedy):
- on the coordinator over a local copy of the table (one node, one model server);
- over the distributed table (the two workers' model servers, each for its shards).
On a machine of few cores the workers share the CPU, so it reports tokens/s per worker
and the coordinator's overhead (a distributed statement without dolly calls) rather than
a speed-up. Needs Citus and dolly installed, PostgreSQL 15's binaries on PATH, not root.
Usage: python3 tests/bench/bench_citus.py [--tokens 32] [--layers 12 --hidden 768]
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "dolly-cli"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="dolly-bench-citus-")
    nodes = []
    try:
        models = os.path.join(work, "models")
        os.makedirs(models)
        run([args.cli, "init", "--arch", "gpt_neox", "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--heads", str(args.hidden // 64), "--tokenizer", os.path.join(ROOT, "tests/fixtures/tokenizer/tokenizer.json"),
             "--seed", "1", "--out", os.path.join(models, "bench")])
        for i, name in enumerate(("coordinator", "worker1", "worker2")):
            data = os.path.join(work, name)
            port = 54341 + i
            run([os.path.join(BIN, "initdb"), "-D", data, "-A", "trust"])
            with open(os.path.join(data, "postgresql.conf"), "a") as f:
                f.write(f"""
shared_preload_libraries = 'citus,dolly'
port = {port}
listen_addresses = ''
unix_socket_directories = '{work}'
dolly.model_dir = '{models}'
dolly.model = 'bench'
dolly.threads = 1
max_worker_processes = 32
""")
            run([os.path.join(BIN, "pg_ctl"), "-D", data, "-l", data + ".log", "-w", "start"])
            nodes.append((name, data, port))

        def sql(port, q):
            return run([os.path.join(BIN, "psql"), "-X", "-A", "-t", "-h", work, "-p", str(port), "-d", "postgres",
                        "-c", q]).stdout.strip()

        for _, _, port in nodes:
            sql(port, "CREATE EXTENSION citus")
            sql(port, "CREATE EXTENSION dolly")
        coord = nodes[0][2]
        sql(coord, f"SELECT citus_set_coordinator_host('{work}', {coord})")
        for _, _, port in nodes[1:]:
            sql(coord, f"SELECT citus_add_node('{work}', {port})")
        sql(coord, "CREATE TABLE tasks (id int PRIMARY KEY, instruction text); SET citus.shard_count = 8; "
                   "SELECT create_distributed_table('tasks', 'id'); "
                   "INSERT INTO tasks SELECT i, 'Tell me about item ' || i FROM generate_series(1, 64) i; "
                   "CREATE TABLE tasks_here AS SELECT * FROM tasks")
        for _, _, port in nodes:
            sql(port, "SELECT dolly_generate_raw('warm up', max_new_tokens => 2, do_sample => false)")

        def generated(port):
            return int(sql(port, "SELECT coalesce(sum(generated_tokens), 0) FROM dolly_server"))

        def statement(table, n):
            before = [generated(p) for _, _, p in nodes]
            t0 = time.time()
            sql(coord, f"CREATE TEMP TABLE a{n} AS SELECT id, dolly_generate(instruction, max_new_tokens => {args.tokens}, "
                       f"do_sample => false) FROM {table}")
            elapsed = time.time() - t0
            return elapsed, [generated(p) - b for (_, _, p), b in zip(nodes, before)]

        one_s, one_tok = statement("tasks_here", 1)
        dist_s, dist_tok = statement("tasks", 2)
        plain = []
        for _ in range(5):
            t0 = time.time()
            sql(coord, "SELECT count(length(instruction)) FROM tasks")
            plain.append(time.time() - t0)
        print(f"model: GPT-NeoX {args.layers} x {args.hidden}, dolly.threads = 1 a node, 64 rows, "
              f"{args.tokens} new tokens, greedy; {os.cpu_count()} CPUs shared by the nodes\n")
        print("| statement | seconds | tokens/s | coordinator's server | worker 1 | worker 2 |\n|---|---|---|---|---|---|")
        print(f"| one node (local table) | {one_s:.2f} | {sum(one_tok) / one_s:.1f} | {one_tok[0] / one_s:.1f} tok/s | - | - |")
        print(f"| Citus, 2 workers, 8 shards | {dist_s:.2f} | {sum(dist_tok) / dist_s:.1f} | {dist_tok[0] / dist_s:.1f} tok/s | "
              f"{dist_tok[1] / dist_s:.1f} tok/s | {dist_tok[2] / dist_s:.1f} tok/s |")
        print(f"\ncoordinator's overhead: a distributed statement over the 64 rows without dolly calls takes "
              f"{1000 * min(plain):.1f} ms (best of 5, psql's start included), "
              f"{100 * min(plain) / dist_s:.1f}% of the distributed generation")
    finally:
        for _, data, _ in nodes:
            subprocess.run([os.path.join(BIN, "pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
