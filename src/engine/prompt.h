/*
 * prompt.h: Dolly's prompt template and response extraction (databrickslabs/dolly
 * training/consts.py and the InstructionTextGenerationPipeline).
 *
 * Every function returns a malloc'd string (the caller frees it), NULL only when out of
 * memory. A NULL instruction or response counts as empty.
 */
#ifndef DOLLY_PROMPT_H
#define DOLLY_PROMPT_H

#define DOLLY_INTRO_BLURB \
	"Below is an instruction that describes a task. " \
	"Write a response that appropriately completes the request."
#define DOLLY_INSTRUCTION_KEY	"### Instruction:"
#define DOLLY_INPUT_KEY			"Input:"
#define DOLLY_RESPONSE_KEY		"### Response:"
#define DOLLY_END_KEY			"### End"
#define DOLLY_RESPONSE_KEY_NL	"### Response:\n"

/*
 * The generation prompt: blurb, instruction, then "### Response:\n". A context (NULL or
 * "" means none) goes under "Input:" after the instruction, as in training.
 */
char	   *prompt_format(const char *instruction, const char *context);

/* The training text: the generation prompt, the response, then "\n\n### End". */
char	   *prompt_format_record(const char *instruction, const char *context,
								 const char *response);

/*
 * The response in decoded text (prompt and continuation together, as the pipeline
 * decodes the whole sequence): the text after the first "### Response:\n" up to the
 * first "### End", stripped; if that is empty, group 1 of the first match of
 * `#+\s*Response:\s*(.+?)#+\s*End`, else of `#+\s*Response:\s*(.+)` (DOTALL), stripped;
 * else the whole text stripped. Stripping and \s follow Python's str.isspace.
 */
char	   *prompt_extract_response(const char *generated_text);

#endif
