#!/usr/bin/env bash
# demo.sh: the main job. Installs and builds dolly, starts a throwaway PostgreSQL cluster with
# dolly preloaded, builds a small model from random weights, and shows Dolly's claim on a CPU:
# a short fine-tune on instruction records kept in a table (dolly_finetune) turns it into an
# instruction follower. Accuracy on held-out records is measured with dolly_generate before
# and after. The cluster is removed at the end.
#   DOLLY_DEMO_SHORT=1 bash tests/demo.sh    a quick version (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

short=${DOLLY_DEMO_SHORT:-0}
if [ "$short" = 1 ]; then
	records=12000 epochs=1 layers=4 hidden=256 heldout=60
else
	records=${DOLLY_DEMO_RECORDS:-32000} epochs=${DOLLY_DEMO_EPOCHS:-1} layers=${DOLLY_DEMO_LAYERS:-4}
	hidden=${DOLLY_DEMO_HIDDEN:-256} heldout=300
fi
batch=${DOLLY_DEMO_BATCH:-32} lr=${DOLLY_DEMO_LR:-2e-3}
threads=$(nproc)

bindir=$(pg_config --bindir)
user=$(id -un)
[ "$(id -u)" -ne 0 ] || user=${DOLLY_TEST_USER:-postgres}
as_user() { if [ "$(id -u)" -eq 0 ]; then runuser -u "$user" -- "$@"; else "$@"; fi; }

dir=$(mktemp -d /tmp/dolly-demo.XXXXXX)
mkdir -p "$dir/models"
chown -R "$user" "$dir"
port=${DOLLY_DEMO_PORT:-54329}
cleanup() { as_user "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT

echo "== a base model from random weights (GPT-NeoX, $layers layers x $hidden)"
as_user build/dolly-cli init --arch gpt_neox --layers "$layers" --hidden "$hidden" --heads $((hidden / 64)) \
	--context 128 --tokenizer tests/fixtures/tokenizer/tokenizer.json --seed 42 --out "$dir/models/base"

as_user "$bindir/initdb" -D "$dir/data" -A trust >/dev/null
cat >> "$dir/data/postgresql.conf" <<CONF
shared_preload_libraries = 'dolly'
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
dolly.model_dir = '$dir/models'
dolly.threads = $threads
CONF
as_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
psql() { as_user "$bindir/psql" -X -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -d postgres "$@"; }

psql -q -c "CREATE EXTENSION dolly"
psql -c "SELECT backend, devices, detail FROM dolly_backends()"

echo "== $records training records and $heldout held-out ones, in tables"
psql -q -v n="$records" -v seed=0.42 -v table=train_records -f tests/demo/records.sql
psql -q -v n="$heldout" -v seed=0.77 -v table=heldout -f tests/demo/records.sql
psql -c "SELECT instruction, response FROM train_records LIMIT 3"

# Answer the held-out records with model $1 (greedy), print exact-match accuracy per task,
# and leave the overall percentage in $pct.
accuracy() {
	psql -q -c "CREATE TABLE \"answers_$1\" AS
	            SELECT id, task, instruction, response,
	                   dolly_generate(instruction, model => '$1', do_sample => false,
	                                  max_new_tokens => 16) AS answer
	              FROM heldout"
	psql -c "SELECT task, round(100.0 * avg((answer = response)::int), 1) AS exact_match_pct,
	                (array_agg(instruction || ' -> ' || answer ORDER BY id))[1] AS example
	           FROM \"answers_$1\" GROUP BY ROLLUP (task) ORDER BY task NULLS LAST"
	pct=$(psql -At -c "SELECT round(100.0 * avg((answer = response)::int), 1) FROM \"answers_$1\"")
}

echo "== before fine-tuning: the base model on the held-out records"
accuracy base
before=$pct

echo "== dolly_finetune: Dolly's recipe on the table, in a background worker"
job=$(psql -At -c "SELECT dolly_finetune('train_records', 'tuned', base_model => 'base',
                   epochs => $epochs, batch_size => $batch, learning_rate => $lr,
                   warmup_steps => 50, lr_schedule => 'linear', eval_fraction => 0.02)")
while :; do
	line=$(psql -At -F ' ' -c "SELECT state, coalesce(phase, '-'), step, total_steps,
	         round(train_loss::numeric, 3), round(eval_loss::numeric, 3), round(tokens_per_second)
	         FROM dolly_jobs WHERE id = $job")
	echo "job $job: $line"
	case "$line" in running*|queued*) sleep 10 ;; *) break ;; esac
done
psql -c "SELECT id, state, records, skipped, step, total_steps, train_loss, eval_loss,
                round(tokens_per_second) AS tokens_per_second, finished - started AS took, error
           FROM dolly_jobs WHERE id = $job"
case "$line" in succeeded*) ;; *) echo "fine-tuning did not succeed"; exit 1 ;; esac

echo "== after fine-tuning: the new model, served by dolly_generate"
accuracy tuned
after=$pct

echo "== exact match on $heldout held-out records: $before% before, $after% after fine-tuning"
if [ "$short" = 1 ]; then
	# the quick version trains too little to follow instructions; it must still learn
	awk -v a="$after" -v b="$before" 'BEGIN { exit !(a > b) }' || { echo "no improvement"; exit 1; }
else
	awk -v a="$after" 'BEGIN { exit !(a >= 80) }' || { echo "below the 80% goal"; exit 1; }
fi