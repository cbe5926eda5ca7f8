/*
 * test_config.c: config.json parsing for GPT-J and GPT-NeoX: keys, transformers'
 * defaults and precedence, old and new spellings, and refused inputs.
 */
#include "harness.h"
#include "../../src/engine/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* config_parse on a C string. */
static dl_status
parse(const char *json, dl_config *cfg, dl_error *err)
{
	return config_parse(json, strlen(json), cfg, err);
}

/* Expect json to fail with code and a message (or hint) holding needle. */
#define CHECK_BAD(json, code, needle) do { \
	dl_config	c_; \
	dl_error	e_; \
	dl_status	s_ = parse(json, &c_, &e_); \
	CHECKF(s_ == (code), "got %s, wanted %s (%s)", dl_status_name(s_), dl_status_name(code), \
		   s_ == DL_OK ? "" : e_.msg); \
	CHECKF(strstr(e_.msg, needle) || strstr(e_.hint, needle), "message: %s / %s", e_.msg, e_.hint); \
	} while (0)

#define GPTJ_MIN "\"model_type\":\"gptj\",\"n_embd\":64,\"n_layer\":2,\"n_head\":4"
#define NEOX_MIN "\"model_type\":\"gpt_neox\",\"hidden_size\":64,\"num_hidden_layers\":3," \
	"\"num_attention_heads\":4,\"intermediate_size\":256"

TEST(config_gptj_full)
{
	dl_config	c;
	dl_error	err;

	CHECK_OK(parse("{\"activation_function\":\"gelu_new\",\"bos_token_id\":50256,"
				   "\"eos_token_id\":50256,\"layer_norm_epsilon\":1e-05,\"model_type\":\"gptj\","
				   "\"n_embd\":4096,\"n_head\":16,\"n_inner\":null,\"n_layer\":28,"
				   "\"n_positions\":2048,\"rotary_dim\":64,\"tie_word_embeddings\":false,"
				   "\"vocab_size\":50400,\"rope_theta\":5.0}", &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTJ && c.n_embd == 4096 && c.n_layer == 28 && c.n_head == 16);
	CHECK(c.head_dim == 256 && c.n_inner == 4 * 4096 && c.rotary_dim == 64);
	CHECK(c.rotary_interleaved && c.parallel_residual && !c.attention_bias && !c.tie_embeddings);
	CHECK(c.rotary_base == 10000.0f);	/* modeling_gptj has no rope_theta */
	CHECK(c.ln_eps == 1e-5f && c.act == DL_ACT_GELU_TANH && c.max_pos == 2048);
	CHECK(c.config_vocab == 50400 && c.vocab_size == -1 && c.bos_id == 50256 && c.eos_id == 50256);
}

TEST(config_gptj_defaults)
{
	dl_config	c;
	dl_error	err;

	/* transformers' GPTJConfig defaults for everything but the sizes */
	CHECK_OK(parse("{" GPTJ_MIN ",\"n_embd\":256}", &c, &err), &err);
	CHECK(c.n_embd == 256 && c.head_dim == 64 && c.rotary_dim == 64 && c.n_inner == 1024);
	CHECK(c.max_pos == 2048 && c.ln_eps == 1e-5f && c.act == DL_ACT_GELU_TANH);
	CHECK(!c.tie_embeddings && c.bos_id == -1 && c.eos_id == -1 && c.config_vocab == -1);

	/* rotary_dim null rotates the whole head; explicit values are kept */
	CHECK_OK(parse("{" GPTJ_MIN ",\"rotary_dim\":null,\"n_inner\":100,\"tie_word_embeddings\":true,"
				   "\"activation_function\":\"gelu\",\"n_positions\":64}", &c, &err), &err);
	CHECK(c.rotary_dim == 16 && c.n_inner == 100 && c.tie_embeddings && c.act == DL_ACT_GELU_ERF);
	CHECK(c.max_pos == 64);
	/* the default rotary_dim of 64 does not fit a 16-wide head */
	CHECK_BAD("{" GPTJ_MIN "}", DL_EFORMAT, "rotary dimension 64");
}

TEST(config_neox_transformers5)
{
	dl_config	c;
	dl_error	err;

	/* what transformers 5.24 GPTNeoXConfig(rotary_pct=0.5).save_pretrained writes */
	CHECK_OK(parse("{\"attention_bias\":true,\"attention_dropout\":0.0,\"bos_token_id\":0,"
				   "\"classifier_dropout\":0.1,\"eos_token_id\":2,\"hidden_act\":\"gelu\","
				   "\"hidden_dropout\":0.0,\"hidden_size\":6144,\"initializer_range\":0.02,"
				   "\"intermediate_size\":24576,\"is_decoder\":false,\"layer_norm_eps\":1e-05,"
				   "\"max_position_embeddings\":2048,\"model_type\":\"gpt_neox\","
				   "\"num_attention_heads\":64,\"num_hidden_layers\":44,\"pad_token_id\":null,"
				   "\"rope_parameters\":{\"partial_rotary_factor\":0.5,\"rope_theta\":10000.0,"
				   "\"rope_type\":\"default\"},\"tie_word_embeddings\":false,"
				   "\"transformers_version\":\"5.24.0\",\"use_cache\":true,"
				   "\"use_parallel_residual\":true,\"vocab_size\":50432}", &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTNEOX && c.n_embd == 6144 && c.n_layer == 44 && c.n_head == 64);
	CHECK(c.head_dim == 96 && c.n_inner == 24576 && c.rotary_dim == 48 && !c.rotary_interleaved);
	CHECK(c.rotary_base == 10000.0f && c.parallel_residual && c.attention_bias && !c.tie_embeddings);
	CHECK(c.act == DL_ACT_GELU_ERF && c.ln_eps == 1e-5f && c.max_pos == 2048);
	CHECK(c.bos_id == 0 && c.eos_id == 2 && c.config_vocab == 50432 && c.vocab_size == -1);
}

TEST(config_neox_defaults_and_old_keys)
{
	dl_config	c;
	dl_error	err;

	/* GPTNeoXConfig defaults: rotary 0.25 of the head, base 10000, parallel, biases */
	CHECK_OK(parse("{" NEOX_MIN "}", &c, &err), &err);
	CHECK(c.head_dim == 16 && c.rotary_dim == 4 && c.rotary_base == 10000.0f);
	CHECK(c.parallel_residual && c.attention_bias && !c.tie_embeddings && c.max_pos == 2048);
	CHECK(c.act == DL_ACT_GELU_ERF && c.ln_eps == 1e-5f);

	/* transformers 4.x spellings (Pythia, dolly-v2 configs) */
	CHECK_OK(parse("{" NEOX_MIN ",\"rotary_pct\":0.5,\"rotary_emb_base\":500,"
				   "\"use_parallel_residual\":false,\"tie_word_embeddings\":true,"
				   "\"attention_bias\":false,\"hidden_act\":\"gelu_new\",\"layer_norm_eps\":1e-6,"
				   "\"rope_scaling\":null,\"eos_token_id\":[7,8]}", &c, &err), &err);
	CHECK(c.rotary_dim == 8 && c.rotary_base == 500.0f && !c.parallel_residual);
	CHECK(c.tie_embeddings && !c.attention_bias && c.act == DL_ACT_GELU_TANH && c.ln_eps == 1e-6f);
	CHECK(c.eos_id == 7);

	/* rope_parameters wins over the old keys, key by key */
	CHECK_OK(parse("{" NEOX_MIN ",\"rotary_pct\":0.5,\"rotary_emb_base\":500,"
				   "\"rope_parameters\":{\"rope_theta\":7000.0,\"rope_type\":\"default\"}}", &c, &err), &err);
	CHECK(c.rotary_dim == 8 && c.rotary_base == 7000.0f);
	CHECK_OK(parse("{" NEOX_MIN ",\"rotary_emb_base\":500,"
				   "\"rope_parameters\":{\"partial_rotary_factor\":1.0}}", &c, &err), &err);
	CHECK(c.rotary_dim == 16 && c.rotary_base == 500.0f);
	/* a non-empty rope_scaling replaces rope_parameters; an empty one does not */
	CHECK_OK(parse("{" NEOX_MIN ",\"rope_scaling\":{\"rope_theta\":20.0},"
				   "\"rope_parameters\":{\"rope_theta\":30.0}}", &c, &err), &err);
	CHECK(c.rotary_base == 20.0f);
	CHECK_OK(parse("{" NEOX_MIN ",\"rope_scaling\":{},\"rope_parameters\":{\"rope_theta\":30.0}}",
				   &c, &err), &err);
	CHECK(c.rotary_base == 30.0f);

	/* top-level rope_theta / partial_rotary_factor are ignored by GPTNeoXConfig (5.24) */
	CHECK_OK(parse("{" NEOX_MIN ",\"rope_theta\":5000,\"partial_rotary_factor\":0.5}", &c, &err), &err);
	CHECK(c.rotary_base == 10000.0f && c.rotary_dim == 4);
}

TEST(config_neox_rotary_rounding)
{
	dl_config	c;
	dl_error	err;

	/* int(head_size * pct) truncates: 16 * 0.3 = 4.8 -> 4, 16 * 0.37 = 5.92 -> 5 (odd) */
	CHECK_OK(parse("{" NEOX_MIN ",\"rotary_pct\":0.3}", &c, &err), &err);
	CHECK(c.rotary_dim == 4);
	CHECK_BAD("{" NEOX_MIN ",\"rotary_pct\":0.37}", DL_EFORMAT, "must be even");
	CHECK_OK(parse("{" NEOX_MIN ",\"rotary_pct\":0}", &c, &err), &err);
	CHECK(c.rotary_dim == 0);
	CHECK_BAD("{" NEOX_MIN ",\"rotary_pct\":1.5}", DL_EFORMAT, "outside [0, 1]");
	CHECK_BAD("{" NEOX_MIN ",\"rotary_emb_base\":-1}", DL_EFORMAT, "rotary base");
	CHECK_BAD("{" NEOX_MIN ",\"rope_parameters\":{\"rope_type\":\"linear\",\"factor\":2.0}}",
			  DL_EUNSUPPORTED, "linear");
	CHECK_BAD("{" NEOX_MIN ",\"rope_parameters\":{\"type\":\"dynamic\"}}", DL_EUNSUPPORTED, "dynamic");
	CHECK_BAD("{" NEOX_MIN ",\"rope_parameters\":5}", DL_EFORMAT, "rope_parameters");
}

TEST(config_bad_inputs)
{
	CHECK_BAD("{\"model_type\":\"gptj\",", DL_EFORMAT, "JSON");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8} x", DL_EFORMAT, "JSON");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,}", DL_EFORMAT, "JSON");
	CHECK_BAD("[1]", DL_EFORMAT, "object");
	CHECK_BAD("", DL_EFORMAT, "JSON");
	CHECK_BAD("{\"n_embd\":64}", DL_EFORMAT, "model_type");
	CHECK_BAD("{\"model_type\":\"llama\"}", DL_EUNSUPPORTED, "\"llama\"");
	CHECK_BAD("{\"model_type\":\"llama\"}", DL_EUNSUPPORTED, "gpt_neox");	/* the hint */
	CHECK_BAD("{\"model_type\":3}", DL_EFORMAT, "model_type");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"activation_function\":\"relu\"}", DL_EUNSUPPORTED, "\"relu\"");
	CHECK_BAD("{" NEOX_MIN ",\"hidden_act\":\"silu\"}", DL_EUNSUPPORTED, "\"silu\"");
	CHECK_BAD("{" NEOX_MIN ",\"hidden_act\":\"silu\"}", DL_EUNSUPPORTED, "gelu_new");	/* the hint */
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":64,\"n_layer\":2,\"n_head\":5}", DL_EFORMAT,
			  "not divisible");
	CHECK_BAD("{\"model_type\":\"gpt_neox\",\"hidden_size\":64,\"num_hidden_layers\":3,"
			  "\"num_attention_heads\":6,\"intermediate_size\":256}", DL_EFORMAT, "not divisible");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_layer\":2,\"n_head\":4}", DL_EFORMAT, "\"n_embd\"");
	CHECK_BAD("{\"model_type\":\"gpt_neox\",\"hidden_size\":64,\"num_hidden_layers\":3,"
			  "\"num_attention_heads\":4}", DL_EFORMAT, "intermediate_size");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":\"64\",\"n_layer\":2,\"n_head\":4}", DL_EFORMAT,
			  "\"n_embd\" must be an integer");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":64.0,\"n_layer\":2,\"n_head\":4}", DL_EFORMAT,
			  "\"n_embd\" must be an integer");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":0,\"n_layer\":2,\"n_head\":4}", DL_EFORMAT,
			  "\"n_embd\" is 0");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":64,\"n_layer\":-2,\"n_head\":4}", DL_EFORMAT, "n_layer");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":99999999999999999999,\"n_layer\":2,\"n_head\":4}",
			  DL_EFORMAT, "n_embd");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":4294967360,\"n_layer\":2,\"n_head\":4}",
			  DL_EFORMAT, "n_embd");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":7}", DL_EFORMAT, "must be even");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":-2}", DL_EFORMAT, "rotary_dim");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"tie_word_embeddings\":1}", DL_EFORMAT,
			  "tie_word_embeddings");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"layer_norm_epsilon\":\"1e-5\"}", DL_EFORMAT,
			  "layer_norm_epsilon");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"layer_norm_epsilon\":0}", DL_EFORMAT, "epsilon");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"layer_norm_epsilon\":NaN}", DL_EFORMAT, "epsilon");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"n_positions\":0}", DL_EFORMAT, "n_positions");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"eos_token_id\":-5}", DL_EFORMAT, "eos_token_id");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"eos_token_id\":[null]}", DL_EFORMAT, "eos_token_id");
	CHECK_BAD("{" GPTJ_MIN ",\"rotary_dim\":8,\"vocab_size\":0}", DL_EFORMAT, "vocab_size");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":64,\"n_layer\":100000,\"n_head\":4}", DL_EFORMAT,
			  "n_layer");
	CHECK_BAD("{\"model_type\":\"gptj\",\"n_embd\":\"\xff\"}", DL_EFORMAT, "JSON");
}

TEST(config_not_nul_terminated)
{
	const char *json = "{" GPTJ_MIN ",\"rotary_dim\":8}garbage";
	dl_config	c;
	dl_error	err;

	CHECK_OK(config_parse(json, strlen(json) - strlen("garbage"), &c, &err), &err);
	CHECK(c.rotary_dim == 8 && c.n_embd == 64);
}

TEST(config_load_files)
{
	dl_config	c;
	dl_error	err;
	struct stat sb;

	CHECK(config_load("/nonexistent/config.json", &c, &err) == DL_EIO);
	CHECKF(strstr(err.msg, "/nonexistent/config.json"), "%s", err.msg);
	if (stat(fixture_path("neox-seq-f32/config.json"), &sb) != 0)
		SKIP("fixture models not generated yet");

	/* the fixtures' config.json files, as transformers 5.24 wrote them */
	CHECK_OK(config_load(fixture_path("gptj-f32/config.json"), &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTJ && c.n_embd == 32 && c.n_head == 4 && c.head_dim == 8);
	CHECK(c.n_inner == 128 && c.rotary_dim == 4 && c.rotary_interleaved && c.max_pos == 128);
	CHECK_OK(config_load(fixture_path("neox-par-f32/config.json"), &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTNEOX && c.head_dim == 8 && c.rotary_dim == 4 && c.parallel_residual);
	CHECK(c.n_inner == 64 && c.rotary_base == 10000.0f && c.attention_bias);
	CHECK_OK(config_load(fixture_path("neox-seq-f32/config.json"), &c, &err), &err);
	CHECK(c.head_dim == 16 && c.rotary_dim == 4 && c.rotary_base == 500.0f && !c.parallel_residual);
	CHECK_OK(config_load(fixture_path("gptj-bf16/config.json"), &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTJ && c.rotary_dim == 4);
	CHECK_OK(config_load(fixture_path("neox-par-bf16/config.json"), &c, &err), &err);
	CHECK(c.arch == DL_ARCH_GPTNEOX);
	/* a file that is not a config names itself */
	CHECK(config_load(fixture_path("gptj-f32/model.safetensors"), &c, &err) == DL_EFORMAT);
	CHECKF(strstr(err.msg, "gptj-f32/model.safetensors"), "%s", err.msg);
}

/* config_write then config_load gives back every field, fresh and over a base file. */
TEST(config_write_round_trip)
{
	const char *models[] = {"gptj-f32", "neox-par-f32", "neox-seq-f32", "neox-par-bf16"};
	char		out[] = "/tmp/dolly-config-XXXXXX";
	char		path[64];
	dl_error	err;

	CHECK(mkdtemp(out) != NULL);
	snprintf(path, sizeof(path), "%s/config.json", out);
	for (int i = 0; i < 4; i++)
	{
		dl_config	a,
					b;
		const char *base = fixture_path(models[i]);
		char		basepath[4096];

		snprintf(basepath, sizeof(basepath), "%s/config.json", base);
		CHECK_OK(config_load(basepath, &a, &err), &err);
		a.vocab_size = 600 + i;
		for (int with_base = 0; with_base < 2; with_base++)
		{
			CHECK_OK(config_write(&a, with_base ? basepath : NULL, path, &err), &err);
			CHECK_OK(config_load(path, &b, &err), &err);
			CHECKF(a.arch == b.arch && a.n_layer == b.n_layer && a.n_embd == b.n_embd &&
				   a.n_head == b.n_head && a.head_dim == b.head_dim && a.n_inner == b.n_inner &&
				   a.rotary_dim == b.rotary_dim && a.rotary_interleaved == b.rotary_interleaved &&
				   a.rotary_base == b.rotary_base && a.ln_eps == b.ln_eps && a.act == b.act &&
				   a.parallel_residual == b.parallel_residual &&
				   a.tie_embeddings == b.tie_embeddings && a.attention_bias == b.attention_bias &&
				   a.max_pos == b.max_pos && b.config_vocab == a.vocab_size &&
				   a.bos_id == b.bos_id && a.eos_id == b.eos_id,
				   "%s (base %d) changed in the round trip", models[i], with_base);
		}
	}
	unlink(path);
	rmdir(out);
}
