/*
 * dolly_cli_train.c: dolly-cli's commands that write a model directory.
 *
 * init writes a model directory with seeded random weights (model_create_random) and
 * the tokenizer with Dolly's special tokens, ready to fine-tune. train fine-tunes with
 * Dolly's recipe (finetune_run) on records {"instruction", "context", "response"}, one
 * JSON object a line, prints progress on stderr and one summary line on stdout
 * ("train_tokens_per_s=X ..."), and saves the result; --checkpoint keeps only each
 * layer's input and recomputes the rest in backward, for less memory. convert writes the
 * model of a directory (PyTorch .bin weights, say) as a new directory in safetensors
 * (model_convert); merge writes a model with a LoRA adapter merged into it (lora_merge).
 */
#include "dolly_cli.h"
#include "tokenizer.h"
#include "train.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

/* init: a model of the given shape with seeded random weights, ready to fine-tune. */
int
cmd_init(const options *o)
{
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_tokenizer *tok = NULL;
	dl_config	cfg;
	long long	positions = 2048;
	int			neox,
				rc = 1;

	if (o->arch == NULL || (strcmp(o->arch, config_arch_name(DL_ARCH_GPTNEOX)) != 0 && strcmp(o->arch, config_arch_name(DL_ARCH_GPTJ)) != 0))
	{
		fprintf(stderr, "dolly-cli: init needs --arch gpt_neox or --arch gptj\n");
		return 1;
	}
	if (!o->layers || !o->hidden || !o->heads || !o->tokenizer || !o->out)
	{
		fprintf(stderr, "dolly-cli: init needs --layers, --hidden, --heads, --tokenizer and --out\n");
		return 1;
	}
	if (o->context && parse_long("--context", o->context, 1, 1 << 20, &positions))
		return 1;
	if (o->hidden % o->heads != 0 || !(o->rotary_pct >= 0.0f && o->rotary_pct <= 1.0f))
	{
		fprintf(stderr, "dolly-cli: --hidden %d must be a multiple of --heads %d, and --rotary-pct %g within [0, 1]\n",
				o->hidden, o->heads, (double) o->rotary_pct);
		return 1;
	}
	neox = strcmp(o->arch, config_arch_name(DL_ARCH_GPTNEOX)) == 0;
	memset(&cfg, 0, sizeof(cfg));
	cfg.arch = neox ? DL_ARCH_GPTNEOX : DL_ARCH_GPTJ;
	cfg.n_layer = o->layers;
	cfg.n_embd = o->hidden;
	cfg.n_head = o->heads;
	cfg.head_dim = o->hidden / o->heads;
	cfg.n_inner = o->inner ? o->inner : 4 * o->hidden;
	/* transformers' int(head_size * rotary_pct), made even: rotation works on pairs */
	cfg.rotary_dim = (int) (cfg.head_dim * (double) o->rotary_pct) & ~1;
	cfg.rotary_interleaved = !neox;
	cfg.rotary_base = 10000.0f;
	cfg.ln_eps = 1e-5f;
	/* each architecture's usual activation: gelu_new (GPT-J), exact gelu (Pythia) */
	cfg.act = neox ? DL_ACT_GELU_ERF : DL_ACT_GELU_TANH;
	cfg.parallel_residual = true;
	cfg.tie_embeddings = o->tie;
	cfg.attention_bias = true;
	cfg.max_pos = (int) positions;
	if (tok_load(o->tokenizer, &tok, &err) != DL_OK)
		goto fail;
	cfg.vocab_size = cfg.config_vocab = tok_vocab_size(tok);
	cfg.bos_id = cfg.eos_id = tok_token_id(tok, "<|endoftext|>");
	if (backend_cpu_create(o->threads, 0, &be, &err) != DL_OK ||
		model_create_random(&cfg, be, o->seed_given ? o->seed : 42, &m, &err) != DL_OK ||
		model_add_dolly_tokens(&m, tok, &err) != DL_OK ||
		model_save(m, tok, NULL, o->out, &err) != DL_OK)
		goto fail;
	fprintf(stderr, "initialised %s: %s, %d layers, width %d, %d heads, MLP %d, %d positions, vocabulary %d, %lld parameters\n",
			o->out, o->arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.max_pos,
			m->cfg.vocab_size, (long long) dl_model_param_count(m));
	rc = 0;
	goto done;
fail:
	report(&err);
done:
	dl_model_free(m);
	tok_free(tok);
	if (be)
		be->destroy(be);
	return rc;
}

/* A string field of a record: "" when absent or null, NULL when of another type. */
static const char *
record_field(json_object *rec, const char *key)
{
	json_object *v;

	if (!json_object_object_get_ex(rec, key, &v) || v == NULL)
		return "";
	return json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
}

/*
 * The examples of a JSON-lines file (blank lines ignored). Records the engine cannot
 * use (empty fields, too long) are counted in *skipped, the first few reasons printed;
 * a line that is not such a record stops everything. 0 on success.
 */
static int
read_records(const char *path, const dl_tokenizer *tok, int max_length, dl_example **out,
			 int *n, int *skipped)
{
	FILE	   *f = fopen(path, "r");
	char	   *line = NULL;
	size_t		cap = 0;
	int			lineno = 0,
				ncap = 0,
				rc = 0;
	dl_example *ex = NULL;

	*n = *skipped = 0;
	if (f == NULL)
	{
		fprintf(stderr, "dolly-cli: cannot open \"%s\": %s\n", path, strerror(errno));
		return 1;
	}
	while (rc == 0 && getline(&line, &cap, f) >= 0)
	{
		json_object *rec;
		dl_example *grown = NULL;
		const char *instr,
				   *ctx,
				   *resp;
		dl_error	err;

		lineno++;
		if (line[strspn(line, " \t\r\n")] == '\0')
			continue;
		rec = json_tokener_parse(line);
		instr = rec && json_object_is_type(rec, json_type_object) ? record_field(rec, "instruction") : NULL;
		ctx = instr ? record_field(rec, "context") : NULL;
		resp = ctx ? record_field(rec, "response") : NULL;
		if (resp == NULL)
		{
			fprintf(stderr, "dolly-cli: %s:%d: not a JSON object with string fields instruction, context and response\n",
					path, lineno);
			rc = 1;
		}
		else if (*n == ncap && (grown = realloc(ex, 2 * (ncap + 512) * sizeof(dl_example))) == NULL)
		{
			fprintf(stderr, "dolly-cli: out of memory reading \"%s\"\n", path);
			rc = 1;
		}
		else
		{
			if (*n == ncap)
			{
				ex = grown;
				ncap = 2 * (ncap + 512);
			}
			if (example_from_record(tok, instr, ctx, resp, max_length, &ex[*n], &err) == DL_OK)
				(*n)++;
			else if (err.code != DL_EINVAL)
				rc = report(&err);
			else if ((*skipped)++ < 5)
				fprintf(stderr, "dolly-cli: %s:%d: skipped: %s\n", path, lineno, err.msg);
		}
		json_object_put(rec);
	}
	if (rc == 0 && ferror(f))
	{
		fprintf(stderr, "dolly-cli: cannot read \"%s\": %s\n", path, strerror(errno));
		rc = 1;
	}
	free(line);
	fclose(f);
	*out = ex;
	return rc;
}

/* Progress of train on stderr, one line per step or evaluation. */
static int
print_progress(void *arg, const dl_train_progress *p)
{
	(void) arg;
	if (strcmp(p->phase, "evaluating") == 0)
		fprintf(stderr, "epoch %d step %d/%d eval_loss %.4f\n", p->epoch, p->step, p->total_steps,
				p->eval_loss);
	else
		fprintf(stderr, "epoch %d step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f\n",
				p->epoch, p->step, p->total_steps, p->train_loss, (double) p->lr,
				(double) p->grad_norm, p->tokens_per_second);
	return 0;
}

/* train: fine-tune a model directory (or, --lora, an adapter of it) on a JSON-lines file and save the result. */
int
cmd_train(const options *o)
{
	char		path[4096];
	dl_error	err;
	dl_backend *be = NULL;
	dl_model   *m = NULL;
	dl_lora    *lora = NULL;
	dl_tokenizer *tok = NULL;
	dl_example *ex = NULL;
	dl_finetune_opts fo;
	dl_train_progress last;
	dl_lora_config lcfg = o->lora_cfg;
	int			n = 0,
				skipped,
				neval,
				rc = 1;
	uint64_t	seed = o->seed_given ? o->seed : 42;

	if (o->data == NULL || o->out == NULL)
	{
		fprintf(stderr, "dolly-cli: train needs --data FILE.jsonl and --out DIR\n");
		return 1;
	}
	if (!(o->eval_fraction >= 0.0f && o->eval_fraction < 1.0f))
	{
		fprintf(stderr, "dolly-cli: --eval-fraction %g must be in [0, 1)\n", (double) o->eval_fraction);
		return 1;
	}
	if (load(o, DL_CUDA_MIXED, &be, &m, &err))
		goto done;
	if (tok_load_dir(o->model, &tok, &err) != DL_OK ||
		(o->lora ? lora_dolly_tokens(m, tok, &lcfg, &err) != DL_OK ||
		 dl_lora_create(m, &lcfg, seed, &lora, &err) != DL_OK
		 : model_add_dolly_tokens(&m, tok, &err) != DL_OK))
	{
		report(&err);
		goto done;
	}
	if (read_records(o->data, tok, o->max_length ? o->max_length : m->cfg.max_pos, &ex, &n, &skipped))
		goto done;
	/* Dolly shuffles with its seed, then holds out the test records */
	neval = examples_split(ex, n, o->eval_fraction, seed);
	fprintf(stderr, "%d records (%d training, %d evaluation), %d skipped, %lld parameters trained\n",
			n, n - neval, neval, skipped,
			(long long) (lora ? dl_lora_param_count(lora) : dl_model_param_count(m)));
	if (n - neval < 1)
	{
		fprintf(stderr, "dolly-cli: no records left to train on in \"%s\"\n", o->data);
		goto done;
	}

	memset(&fo, 0, sizeof(fo));
	train_defaults(&fo.cfg);
	if (o->lr >= 0)
		fo.cfg.lr = o->lr;
	if (o->warmup >= 0)
		fo.cfg.warmup_steps = o->warmup;
	if (o->max_tokens)
		fo.cfg.max_tokens = o->max_tokens;
	fo.cfg.max_length = o->max_length ? o->max_length : m->cfg.max_pos;
	fo.cfg.checkpoint = o->checkpoint;
	fo.epochs = o->epochs;
	fo.batch_size = o->batch_size;
	fo.nranks = 1;
	fo.seed = seed;
	fo.lora = lora;
	fo.progress = print_progress;
	if (finetune_run(m, ex + neval, n - neval, ex, neval, &fo, &last, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	/* the peak of training, before saving adds its float32 copy of the parameters */
	printf("train_tokens_per_s=%.1f steps=%d train_loss=%.4f eval_loss=%.4f records=%d skipped=%d peak_rss_mb=%.1f threads=%d trained_params=%lld\n",
		   last.tokens_per_second, last.step, last.train_loss, last.eval_loss, n, skipped,
		   peak_rss_mb(), o->threads,
		   (long long) (lora ? dl_lora_param_count(lora) : dl_model_param_count(m)));
	fflush(stdout);
	snprintf(path, sizeof(path), "%s/config.json", o->model);
	if (lora ? dl_lora_save(lora, o->model, tok, o->out, &err) != DL_OK
		: model_save(m, tok, path, o->out, &err) != DL_OK)
	{
		report(&err);
		goto done;
	}
	fprintf(stderr, "saved %s\n", o->out);
	rc = 0;
done:
	for (int i = 0; i < n; i++)
		example_free(&ex[i]);
	free(ex);
	tok_free(tok);
	dl_lora_free(lora);
	dl_model_free(m);
	if (be)
		be->destroy(be);
	return rc;
}

/* convert: the model of --model as a new safetensors directory --out. */
int
cmd_convert(const options *o)
{
	dl_error	err;

	if (o->out == NULL)
	{
		fprintf(stderr, "dolly-cli: convert needs --out DIR\n");
		return 1;
	}
	if (model_convert(o->model, o->out, &err) != DL_OK)
		return report(&err);
	fprintf(stderr, "converted %s to %s\n", o->model, o->out);
	return 0;
}

/* merge: the model of --model with the LoRA adapter of --adapter merged, as --out. */
int
cmd_merge(const options *o)
{
	dl_error	err;

	if (o->out == NULL || o->nadapters != 1)
	{
		fprintf(stderr, "dolly-cli: merge needs --adapter DIR (one) and --out DIR\n");
		return 1;
	}
	if (lora_merge(o->model, o->adapters[0], o->out, &err) != DL_OK)
		return report(&err);
	fprintf(stderr, "merged %s into %s as %s\n", o->adapters[0], o->model, o->out);
	return 0;
}
