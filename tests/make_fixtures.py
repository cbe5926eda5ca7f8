#!/usr/bin/env python3
"""Build the committed test fixtures: a byte-level BPE tokenizer and small random
GPT-J / GPT-NeoX models with the outputs that transformers computes for them.

The C engine is tested against these files, so CI needs no torch.  Everything is
generated here from seeds (the corpus text included, so no licence question
arises); running the script twice gives the same tokenizer, weights and ids (and
the same PyTorch archives: torch.save writes the same bytes for the same tensors).
What torch computes (expected outputs, gradients) can differ in its last bits on
another CPU, where torch takes other SIMD paths.

    python3 tests/make_fixtures.py [--out tests/fixtures]

Layout written under --out:
  tokenizer/tokenizer.json               BPE (vocab 512) + <|endoftext|> + Dolly specials
  tokenizer/tokenizer_legacy_merges.json the same with merges spelled "a b"
  tokenizer/corpus.txt, corpus_ids.txt   line i of the ids = encoding of line i
  tokenizer/multi_line.json              {"docs": [...], "ids": [[...], ...]}
  tokenizer/decode_cases.json            ids whose bytes are invalid UTF-8, and the text
  <model>/                               config.json, tokenizer files, *.safetensors,
                                         expected.safetensors (see expected_outputs)
  <model>/train_expected.safetensors     f32 models: loss, gradients, AdamW steps (build_train)
  tokenizer-legacy*/                     the tokenizer as vocab.json, merges.txt, ... and
                                         decode_cases.json (build_older_tokenizers)
  gptj-legacy-tok/                       gptj-f32 with the tokenizer in those files only
  <model>-bin/, neox-par-f16/            the models as PyTorch checkpoints, as transformers 4
                                         saved them (build_bin_models)
  torch-ckpt/                            small archives, good and bad, for the .bin reader
                                         (build_torch_archives)
  <model>-lora-<tag>/                    a PEFT LoRA adapter of the model as save_pretrained
                                         writes it, expected.safetensors (logits with it) and
                                         train_expected.safetensors (its gradients and AdamW
                                         steps on the training batch) (build_lora)

Each artefact has its own function so that later fixtures (gradients for the
trainer, say) can be added beside them and called from main().
"""

import argparse
import collections
import copy
import json
import os
import random
import re
import shutil
import struct
import unicodedata
import zipfile
import zlib

import numpy
import peft
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 42

# Dolly's constants (databrickslabs/dolly training/consts.py)
INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = "### Response:\n"
EOT = "<|endoftext|>"
DOLLY_SPECIALS = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]

BPE_VOCAB = 512              # incl. the 256-byte alphabet and <|endoftext|>
GREEDY_TOKENS = 32
MIN_GREEDY_GAP = 1e-3        # top-1 minus top-2 logit at every greedy step


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

NOUNS = ("river cat engine garden window teacher database library mountain city "
         "question answer morning kernel pointer table student doctor market "
         "planet letter bridge winter summer forest ocean village machine "
         "compiler server thread process memory record column index query "
         "painter music story island harbor lamp candle storm valley").split()
VERBS = ("runs jumps writes reads builds breaks opens closes finds keeps brings "
         "carries moves sorts counts returns loads stores sends explains "
         "describes completes answers follows measures").split()
ADJS = ("quick lazy bright dark old new small large quiet noisy careful "
        "simple complex ancient modern empty full warm cold gentle strange "
        "useful broken hidden famous").split()
ADVS = ("slowly quickly quietly carefully rarely often never always gently "
        "suddenly eventually").split()
NAMES = ("Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar "
         "Peggy Trent Victor Walter Zoe Amelie Jurgen Linh").split()
PLACES = ("Paris Berlin Tokyo Lagos Lima Oslo Cairo Hanoi Seoul Quebec Madrid "
          "Nairobi Dublin Kyoto Porto").split()
TOPICS = ["photosynthesis", "the French Revolution", "binary search", "tides", "vaccines",
          "compound interest", "the water cycle", "gravity", "sourdough bread", "recursion",
          "the printing press", "volcanoes"]
BASE_VERBS = "run jump open close move sleep shine float grow change".split()
CONTRACTIONS = ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd",
                "can't", "won't", "she's", "that's", "we'd", "you're",
                "I've", "they'll", "isn't", "wasn't", "shouldn't", "let's"]

FRENCH = [
    "L'été dernier, nous sommes allés à la mer près de Nice.",
    "Où est la bibliothèque ? Elle est fermée aujourd'hui.",
    "Je préfère le café noir, sans sucre, s'il vous plaît.",
    "Les élèves ont étudié la leçon avec beaucoup d'intérêt.",
    "Ça dépend : la fenêtre est-elle ouverte ou fermée ?",
    "Noël approche ; les rues sont décorées de lumières.",
    "Il était une fois, dans un château très ancien, une reine.",
    "Œuvre, cœur, sœur, bœuf : des mots avec la ligature œ.",
]
GERMAN = [
    "Die Straße ist heute sehr ruhig, weil es regnet.",
    "Ich möchte ein großes Stück Käsekuchen, bitte.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "Die Mädchen spielen Fußball auf der grünen Wiese.",
    "Schöne Grüße aus München und Köln!",
    "Das Gemüse ist frisch, die Äpfel sind süß und saftig.",
]
SPANISH = [
    "¿Dónde está el niño? ¡Está en el jardín!",
    "La canción del año pasado todavía suena en la radio.",
    "El señor Muñoz habló con la mamá de Inés en la estación.",
]
VIETNAMESE = [
    "Tiếng Việt có nhiều dấu thanh và chữ cái đặc biệt.",
    "Hôm nay trời đẹp, chúng tôi đi dạo quanh hồ Hoàn Kiếm.",
    "Cảm ơn bạn rất nhiều vì đã giúp đỡ tôi hôm qua.",
    "Phở bò và bánh mì là những món ăn nổi tiếng.",
    "Người Việt Nam thường uống trà đá vào buổi chiều.",
]
OTHER_LATIN = [
    "Zażółć gęślą jaźń, mówi polski pangram.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "İstanbul'da ılık bir akşam; ışıklar yanıyor.",
    "Árvíztűrő tükörfúrógép és egy kis kávé.",
    "Ångström, Øresund, Æsir: nordiske bokstaver.",
]
GREEK_CYRILLIC = [
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον σκύλο.",
    "Ελληνικά: αβγδεζηθικλμνξοπρστυφχψω, ΑΒΓΔ.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Привет, мир! Как дела? Всё хорошо.",
    "Україна, Київ, їжачок, ґанок.",
]
CJK = [
    "今天天气很好，我们去公园散步吧。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "数据库中的每一行都有一个唯一的编号。",
    "日本語の文章には、ひらがな、カタカナ、漢字が混ざっています。",
    "東京タワーは東京の観光名所の一つです。",
    "コンピュータのメモリは有限です。",
    "龍の絵を描いた画家は、静かに筆を置いた。",
    "中文、日本語、한국어を一行に混ぜる。",
]
KOREAN = [
    "안녕하세요, 만나서 반갑습니다.",
    "오늘은 날씨가 정말 좋네요. 산책하러 갈까요?",
    "한국어 문장에는 띄어쓰기가 있습니다.",
    "데이터베이스 서버가 다시 시작되었습니다.",
]
RTL_AND_INDIC = [
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "اللغة العربية جميلة ولها حروف متصلة.",
    "الرقم ١٢٣٤٥ مكتوب بالأرقام العربية الهندية.",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "हिन्दी में मात्राएँ संयोजक चिह्न होती हैं।",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
]
EMOJI = ["😀", "🎉", "🚀", "❤️", "👍", "👍🏽", "👋🏿", "🧑‍💻", "👨‍👩‍👧‍👦",
         "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "#️⃣", "🐍", "🦀", "☕", "✨", "🙂", "🤖",
         "👩🏻‍🔬", "🫠", "⭐", "🔥"]
UNICODE_SPACES = ["\u00a0", "\u2003", "\u3000", "\u2009", "\u202f"]


def prose_line(rng):
    """One or more generated English sentences."""
    def sentence():
        kind = rng.randrange(7)
        n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
        if kind == 0:
            return "The %s %s %s %s the %s." % (rng.choice(ADJS), n1, rng.choice(ADVS),
                                                rng.choice(VERBS), n2)
        if kind == 1:
            return "%s said, \"%s, %s the %s in %s.\"" % (
                rng.choice(NAMES), rng.choice(CONTRACTIONS).capitalize(),
                rng.choice(["I've seen", "we'd found", "they're near", "it's"]), n1,
                rng.choice(PLACES))
        if kind == 2:
            return "Why does the %s %s? Nobody knows; perhaps it never will." % (
                n1, rng.choice(BASE_VERBS))
        if kind == 3:
            return "In %d, %s moved to %s (with %d %ss) and wrote about %s." % (
                rng.randrange(1600, 2030), rng.choice(NAMES), rng.choice(PLACES),
                rng.randrange(2, 40), n1, rng.choice(TOPICS))
        if kind == 4:
            return "Explain %s to a child - briefly, clearly, and without jargon..." % (
                rng.choice(TOPICS))
        if kind == 5:
            return "%s's %s and the %s's %s are %s." % (
                rng.choice(NAMES), n1, n2, rng.choice(NOUNS), rng.choice(ADJS))
        return "A %s %s: %s, %s, and %s!" % (rng.choice(ADJS), n1, rng.choice(NOUNS),
                                             rng.choice(NOUNS), rng.choice(NOUNS))
    return " ".join(sentence() for _ in range(rng.randrange(1, 4)))


def ident(rng):
    """A random identifier in snake_case or camelCase."""
    a, b = rng.choice(NOUNS), rng.choice(NOUNS)
    return rng.choice([a, a + "_" + b, a + b.capitalize(), a.upper(), "_" + a,
                       a + str(rng.randrange(10))])


def code_block(rng):
    """A small generated function in C, Python, JavaScript, SQL or shell."""
    lang = rng.randrange(5)
    f, x, y, n = ident(rng), ident(rng), ident(rng), rng.randrange(1, 1000)
    if lang == 0:
        return [
            "#include <stdio.h>",
            "static int",
            "%s(const int *%s, size_t %s)" % (f, x, y),
            "{",
            "\tint\t\tsum = 0;",
            "",
            "\tfor (size_t i = 0; i < %s; i++)" % y,
            "\t{",
            "\t\tif (%s[i] >= %d && %s[i] != -1)" % (x, n, x),
            "\t\t\tsum += %s[i] << 2;" % x,
            "\t\telse if ((sum & 0x%x) == 0 || !sum)" % n,
            "\t\t\tsum ^= ~%s[i];" % x,
            "\t}",
            "\treturn sum > 0 ? sum : -sum; /* %s */" % rng.choice(NOUNS),
            "}",
        ]
    if lang == 1:
        return [
            "@dataclass",
            "class %s:" % f.capitalize(),
            "    %s: int = %d" % (x, n),
            "",
            "    def %s(self, %s=None, **kwargs):" % (y, x),
            "        \"\"\"Return the %s of the %s.\"\"\"" % (rng.choice(NOUNS),
                                                           rng.choice(NOUNS)),
            "        if %s is None or %s <= 0:" % (x, x),
            "            %s = [i ** 2 for i in range(%d) if i %% 3 != 0]" % (x, n),
            "        return {k: v for k, v in kwargs.items()}  # %s" % rng.choice(ADJS),
            "        # TODO(%s): handle %s // %d" % (rng.choice(NAMES).lower(), x, n),
        ]
    if lang == 2:
        return [
            "const %s = async (%s, %s = %d) => {" % (f, x, y, n),
            "  const result = await fetch(`/api/${%s}?limit=${%s}`);" % (x, y),
            "  if (result.status !== 200 && !%s) { throw new Error('bad'); }" % y,
            "  return result?.json() ?? [];",
            "};",
        ]
    if lang == 3:
        return [
            "SELECT %s, count(*) AS n FROM %s" % (x, y),
            "WHERE %s <> '%s' AND id BETWEEN %d AND %d" % (x, rng.choice(NOUNS), n, n * 7),
            "GROUP BY 1 HAVING count(*) > %d ORDER BY n DESC;" % (n % 10),
        ]
    return [
        "#!/bin/sh",
        "for f in *.%s; do" % rng.choice(["txt", "c", "py", "json"]),
        "    [ -f \"$f\" ] && grep -c '%s' \"$f\" | awk '{s+=$1} END {print s}'" % x,
        "done 2>/dev/null || exit %d" % (n % 4),
    ]


def number_line(rng):
    """Numbers in the shapes they take in text."""
    kind = rng.randrange(10)
    r = rng.randrange
    if kind == 0:
        return "%d %d %d %d" % (r(10), r(100), r(100000), r(10 ** 12))
    if kind == 1:
        return "Pi is about 3.14159, e is 2.71828 and %d.%03d is mine." % (r(1000), r(1000))
    if kind == 2:
        return "On %04d-%02d-%02d at %02d:%02d:%02d we sold %s units." % (
            r(1900, 2100), r(1, 13), r(1, 29), r(24), r(60), r(60), format(r(10 ** 9), ","))
    if kind == 3:
        return "0x%X 0b%s 0o%o %de%d -%d +%d %d%%" % (r(1 << 32), bin(r(256))[2:], r(4096),
                                                     r(10), r(30), r(500), r(500), r(101))
    if kind == 4:
        return "version %d.%d.%d-rc%d, build %d, port %d" % (r(10), r(20), r(100), r(5),
                                                               r(10 ** 6), r(1024, 65536))
    if kind == 5:
        return "abc%ddef %dx%d v%d x%d_%d" % (r(1000), r(100), r(100), r(9), r(99), r(99))
    if kind == 6:
        return "Call +1 (%03d) %03d-%04d or +49 30 %d." % (r(1000), r(1000), r(10000), r(10 ** 8))
    if kind == 7:
        return "Fullwidth １２３, superscript x² and y³, ½ cup, Arabic ٣٤٥, Devanagari ४२."
    if kind == 8:
        return "%s" % "".join(str(r(10)) for _ in range(r(20, 60)))
    return "$%d.%02d, €%d,%02d, £%d, ¥%d, %d°C" % (r(1000), r(100), r(1000), r(100),
                                                   r(100), r(10000), r(-40, 50))


def contraction_line(rng):
    """Contractions in every spelling the GPT-2 regex treats differently."""
    c = rng.choice(CONTRACTIONS)
    forms = [
        "%s %s the %s's %s." % (rng.choice(NAMES), c, rng.choice(NOUNS), rng.choice(NOUNS)),
        "%s SAID: \"%s %s\"" % (rng.choice(NAMES).upper(), c.upper(), rng.choice(NOUNS).upper()),
        "%s’s %s %s’t %s — they’re %s, we’ve %s." % (
            rng.choice(NAMES), rng.choice(NOUNS), rng.choice(["don", "can", "won"]),
            rng.choice(VERBS), rng.choice(ADJS), rng.choice(["seen", "tried"])),
        "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
        "I'm, you're, he's, we'll, they'd, it'd've, y'all'd've",
        "'%s' and \"%s\" and ‘%s’ and “%s”" % tuple(rng.choice(NOUNS) for _ in range(4)),
        "rock 'n' roll, o'clock, 'tis, ma'am, '90s, the %s'" % rng.choice(NOUNS),
        "THE %s'S %s WASN'T THERE; IT'LL BE BACK." % (rng.choice(NOUNS).upper(),
                                                     rng.choice(NOUNS).upper()),
        "''s '''m ' s 'x ''",
    ]
    return rng.choice(forms)


def whitespace_line(rng):
    """Runs of spaces and tabs in the places the \\s+(?!\\S) rule cares about."""
    words = [rng.choice(NOUNS) for _ in range(rng.randrange(2, 6))]
    kind = rng.randrange(8)
    if kind == 0:
        return (" " * rng.randrange(2, 9)).join(words)
    if kind == 1:
        return "\t".join(words) + "\t" * rng.randrange(1, 3)
    if kind == 2:
        return " " * rng.randrange(1, 12) + " ".join(words) + " " * rng.randrange(1, 5)
    if kind == 3:
        return "\t \t" + "  \t ".join(words)
    if kind == 4:
        return " " * rng.randrange(1, 10)
    if kind == 5:
        return rng.choice(UNICODE_SPACES).join(words) + rng.choice(UNICODE_SPACES)
    if kind == 6:
        return "%s  ,  %s .  %s  !  %d   %d" % (words[0], words[1], words[-1], rng.randrange(100),
                                                 rng.randrange(100))
    return "\u200b".join(words) + " \u200d " + words[0]


def accent_line(rng):
    """Accented Latin, Greek and Cyrillic text, some in decomposed form."""
    s = rng.choice(FRENCH + GERMAN + SPANISH + VIETNAMESE + OTHER_LATIN + GREEK_CYRILLIC)
    form = rng.randrange(4)
    if form == 0:
        # combining marks (category M) sit outside \p{L}: a separate regex piece
        return unicodedata.normalize("NFD", s)
    if form == 1:
        return s.upper()
    return s


def script_line(rng):
    """CJK, Korean, Arabic, Hebrew, Indic and Thai text, sometimes mixed with Latin."""
    s = rng.choice(CJK + KOREAN + RTL_AND_INDIC)
    if rng.randrange(3) == 0:
        s = "%s %s %d" % (rng.choice(NOUNS), s, rng.randrange(1000))
    return s


def emoji_line(rng):
    """Emoji: single code points, skin tones, ZWJ sequences, flags and keycaps."""
    picks = [rng.choice(EMOJI) for _ in range(rng.randrange(1, 6))]
    kind = rng.randrange(3)
    if kind == 0:
        return "".join(picks)
    if kind == 1:
        return " ".join(picks) + " " + prose_line(rng)
    return "%s %s! %s" % (rng.choice(NAMES), "".join(picks), rng.choice(NOUNS))


def special_line(rng):
    """Dolly's special tokens and <|endoftext|> in the middle of ordinary text."""
    w = rng.choice(NOUNS)
    forms = [
        "foo### Endbar",
        "%s### End%s" % (w, rng.choice(NOUNS)),
        "### Instruction: %s" % prose_line(rng),
        "### Instruction:%s" % w,
        "%s ### End" % prose_line(rng),
        "### Response: %s" % w,
        "###End ### end #### End ##### Instruction: ## End",
        "### Endgame### End### End",
        "%s<|endoftext|>%s" % (w, rng.choice(NOUNS)),
        "<|endoftext|><|endoftext|> <|endoftext|>",
        "<|endoftext| <|endoftext|>> <|endoftext",
        "The end. <|endoftext|>",
        "<|endoftext|>### End### Instruction:",
        "Input: %s" % w,
        "### Instruction:### End",
    ]
    return rng.choice(forms)


def misc_line(rng):
    """Markup, URLs, paths, long words and control characters."""
    w = rng.choice(NOUNS)
    forms = [
        "https://example.org/%s/%d?q=%s&lang=en#top" % (w, rng.randrange(1000), rng.choice(NOUNS)),
        "mailto:%s.%s@example.com" % (rng.choice(NAMES).lower(), w),
        "/usr/local/lib/%s/%s.so.%d" % (w, rng.choice(NOUNS), rng.randrange(9)),
        "C:\\Users\\%s\\Documents\\%s.txt" % (rng.choice(NAMES), w),
        "<div class=\"%s\"><p>%s &amp; %s</p></div>" % (w, rng.choice(NOUNS), rng.choice(NOUNS)),
        "{\"%s\": [%d, %d.5, null, true], \"k\": \"v\\n\"}" % (w, rng.randrange(9),
                                                              rng.randrange(9)),
        "$$\\frac{a^2}{b_%d} + \\sum_{i=0}^{n} x_i$$" % rng.randrange(9),
        "## %s - *%s* **%s** `code`" % (w.capitalize(), rng.choice(NOUNS), rng.choice(NOUNS)),
        "supercalifragilisticexpialidocious" * rng.randrange(1, 4),
        "aaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbb zzzzzzzz",
        "!!!??? ... --- === +++ *** ### $$$ %%% ^^^ &&& ||| ~~~",
        "tab\x07bell and delete\x7f and escape \x1b[0m and \x01\x02",
        "ﬁne ﬂow (ligatures) and Ⅻ and ㎏ and ℃",
        "x" * rng.randrange(1, 80),
        "",
    ]
    return rng.choice(forms)


def corpus_lines():
    """The tokenizer corpus: >= 2000 lines, one generator per kind of text."""
    rng = random.Random(SEED)
    lines = []
    # Fixed lines first so that every category is certainly present.
    lines += FRENCH + GERMAN + SPANISH + VIETNAMESE + OTHER_LATIN + GREEK_CYRILLIC
    lines += CJK + KOREAN + RTL_AND_INDIC
    lines += [unicodedata.normalize("NFD", s) for s in FRENCH + VIETNAMESE]
    lines += EMOJI
    lines += ["foo### Endbar", "### Instruction:", "### End", "### Response:", EOT,
              INTRO_BLURB, "", "   ", "\t", "a", " a", "  a", "a ", "a  "]
    plan = [(prose_line, 640), (contraction_line, 200), (number_line, 200),
            (whitespace_line, 160), (accent_line, 180), (script_line, 120),
            (emoji_line, 100), (special_line, 140), (misc_line, 100)]
    for fn, n in plan:
        lines += [fn(rng) for _ in range(n)]
    while len(lines) < 2400:
        lines += code_block(rng)
    for s in lines:
        assert "\n" not in s and "\r" not in s, repr(s)
        # Python's splitlines() also breaks on these; keep corpus lines \n-only.
        assert len(s.splitlines()) <= 1, repr(s)
    return lines


def dolly_prompt(instruction, context=None):
    """The generation prompt as Dolly's pipeline builds it."""
    if context:
        instruction = "%s\n\n%s\n%s" % (instruction, INPUT_KEY, context)
    return "%s\n\n%s\n%s\n\n%s" % (INTRO_BLURB, INSTRUCTION_KEY, instruction, RESPONSE_KEY_NL)


def dolly_record(rng):
    """A full training record in Dolly's layout, with a generated response."""
    ctx = prose_line(rng) if rng.randrange(2) else None
    instr = "Explain %s." % rng.choice(TOPICS)
    return "%s%s\n\n%s" % (dolly_prompt(instr, ctx), prose_line(rng), END_KEY)


def multi_line_docs():
    """Whole documents whose newlines, blank lines and indentation all matter."""
    rng = random.Random(SEED + 1)
    docs = [
        dolly_prompt("Name three primary colors."),
        dolly_record(rng),
        dolly_prompt("Summarize the text.", "The %s is %s.\nIt has two lines." % (
            rng.choice(NOUNS), rng.choice(ADJS))),
        "\n".join(code_block(rng)) + "\n\n\n",
        "\n".join(code_block(rng)) + "\n",
        "Title\n\n\n\nParagraph one.  \n  Indented line.\n\t\tTabbed.\n \n\n",
        "Windows line\r\nendings\r\n\r\nand a lone\rcarriage return\r\n",
        "Form\x0cfeed, vertical\x0btab, next\x85line, line\u2028separator, "
        "paragraph\u2029separator, file\x1cgroup\x1drecord\x1eunit\x1f.",
        "\n",
        "\n\n\n\n\n",
        "   \n   \n",
        "a\n\nb\n\n\nc \n d\t\n\te",
        "%s\n\n%s\n%s\n\n%s\n%s\n%s\n%s\n\n%s%s" % (
            INTRO_BLURB, INSTRUCTION_KEY, "x", INPUT_KEY, "y", EOT, RESPONSE_KEY, RESPONSE_KEY_NL,
            END_KEY),
        "### Instruction:\nx\n### Response:\n\n### Response:\n### End\n",
        "emoji 👨‍👩‍👧‍👦\n🇫🇷🇯🇵\n\n한국어\n日本語\n",
        "",
    ]
    docs += ["\n".join(prose_line(rng) for _ in range(rng.randrange(2, 6))) for _ in range(4)]
    return docs


def training_texts():
    """The text the BPE is trained on: the corpus, multi-line docs and Dolly records."""
    rng = random.Random(SEED + 2)
    texts = corpus_lines() + multi_line_docs()
    texts += [dolly_record(rng) for _ in range(300)]
    return texts


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer():
    """Train the byte-level BPE and add Dolly's special tokens as Dolly's trainer does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    assert tok.get_vocab_size() == BPE_VOCAB and tok.token_to_id(EOT) == 0
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT,
                                              eos_token=EOT, unk_token=EOT)
    hf.pad_token = hf.eos_token          # training/trainer.py: pad_token = eos_token
    hf.add_special_tokens({"additional_special_tokens": DOLLY_SPECIALS})
    for i, s in enumerate(DOLLY_SPECIALS):
        assert hf.convert_tokens_to_ids(s) == BPE_VOCAB + i
    return hf


def legacy_merges(tokenizer_json):
    """The same tokenizer.json with merges spelled "a b" as older tokenizers wrote them."""
    j = json.loads(tokenizer_json)
    merges = j["model"]["merges"]
    assert all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges)
    j["model"]["merges"] = ["%s %s" % (a, b) for a, b in merges]
    return json.dumps(j, ensure_ascii=False, indent=2)


def decode_cases(tok):
    """Id sequences whose bytes are not valid UTF-8, with what tokenizers decodes."""
    # The byte-level alphabet: the token for byte b is spelled bytes_to_unicode()[b].
    byte_id = {b: tok.token_to_id(u) for b, u in bytes_to_unicode().items()}
    assert None not in byte_id.values()
    hello = tok.encode("hello").ids
    euro = [byte_id[b] for b in "€".encode()]
    seqs = {
        "lone_lead_byte_e2": [byte_id[0xE2]],
        "truncated_euro": euro[:2],
        "truncated_euro_then_text": euro[:2] + hello,
        "euro_split_over_byte_tokens": euro,
        "lone_continuation_80": [byte_id[0x80]],
        "byte_ff": hello + [byte_id[0xFF]] + hello,
        "overlong_c0_af": [byte_id[0xC0], byte_id[0xAF]],
        "surrogate_ed_a0_80": [byte_id[0xED], byte_id[0xA0], byte_id[0x80]],
        "above_max_f4_90": [byte_id[0xF4], byte_id[0x90], byte_id[0x80], byte_id[0x80]],
        "truncated_emoji_then_special": [byte_id[b] for b in "😀".encode()[:3]] + [
            tok.token_to_id(END_KEY)],
        "specials_and_text": [tok.token_to_id(EOT)] + hello + [tok.token_to_id(s) for s in
                                                                DOLLY_SPECIALS],
        "empty": [],
    }
    out = []
    for name, ids in seqs.items():
        out.append({"name": name, "ids": ids,
                    "text": tok.decode(ids, skip_special_tokens=False),
                    "text_skip_special": tok.decode(ids, skip_special_tokens=True)})
    assert "\ufffd" in out[0]["text"] and out[3]["text"] == "€"
    return out


def bytes_to_unicode():
    """GPT-2's byte -> printable code point map (openai/gpt-2 src/encoder.py)."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_text(path, text):
    """Write UTF-8 text with \\n line ends exactly as given."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def build_tokenizer(out):
    """tokenizer/: tokenizer.json (+ legacy merges), corpus and ids, multi-line docs,
    decode cases.  Returns the transformers tokenizer for the models."""
    d = os.path.join(out, "tokenizer")
    os.makedirs(d, exist_ok=True)
    hf = train_tokenizer()
    tmp = os.path.join(d, "_hf")
    hf.save_pretrained(tmp)
    shutil.move(os.path.join(tmp, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    shutil.rmtree(tmp)
    tok_path = os.path.join(d, "tokenizer.json")
    legacy_path = os.path.join(d, "tokenizer_legacy_merges.json")
    with open(tok_path, encoding="utf-8") as f:
        write_text(legacy_path, legacy_merges(f.read()) + "\n")
    tok = Tokenizer.from_file(tok_path)
    legacy = Tokenizer.from_file(legacy_path)

    lines = corpus_lines()
    ids = [tok.encode(s).ids for s in lines]
    assert ids == [legacy.encode(s).ids for s in lines], "legacy merges disagree"
    assert all(tok.decode(i, skip_special_tokens=False) == s for i, s in zip(ids, lines))
    write_text(os.path.join(d, "corpus.txt"), "".join(s + "\n" for s in lines))
    write_text(os.path.join(d, "corpus_ids.txt"),
               "".join(" ".join(map(str, i)) + "\n" for i in ids))

    docs = multi_line_docs()
    doc_ids = [tok.encode(s).ids for s in docs]
    assert doc_ids == [legacy.encode(s).ids for s in docs]
    assert all(tok.decode(i, skip_special_tokens=False) == s for i, s in zip(doc_ids, docs))
    write_text(os.path.join(d, "multi_line.json"),
               json.dumps({"docs": docs, "ids": doc_ids}, ensure_ascii=False, indent=1) + "\n")
    write_text(os.path.join(d, "decode_cases.json"),
               json.dumps(decode_cases(tok), ensure_ascii=False, indent=1) + "\n")
    n_tok = sum(map(len, ids))
    print("tokenizer: %d corpus lines, %d bytes, %d tokens; %d docs" % (
        len(lines), sum(len(s.encode()) + 1 for s in lines), n_tok, len(docs)))
    return hf



# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

TOKENIZER_IDS = BPE_VOCAB + len(DOLLY_SPECIALS)     # 515 ids; tables are padded past it

GPTJ = dict(model_type="gptj", vocab_size=528, n_positions=128, n_embd=32, n_layer=2,
            n_head=4, rotary_dim=4, n_inner=None, activation_function="gelu_new")
NEOX = dict(model_type="gpt_neox", vocab_size=536, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
            rotary_pct=0.5, rotary_emb_base=10000, max_position_embeddings=128,
            use_parallel_residual=True)

# name, config, weight dtype, seed, max_shard_size.  neox-seq has 2 heads of 16 so
# that rotary_pct 0.25 still rotates 4 dims: with only 2 the base would not matter.
# The seeds are those of 1..20 with the widest greedy top-1/top-2 gaps in both f32
# and bf16 (>= 0.011), so that a 1e-4 error can never flip a greedy token.
MODELS = [
    ("gptj-f32", GPTJ, torch.float32, 15, None),
    ("neox-par-f32", NEOX, torch.float32, 9, None),
    ("neox-seq-f32", dict(NEOX, num_attention_heads=2, rotary_pct=0.25, rotary_emb_base=500,
                          use_parallel_residual=False), torch.float32, 20, "80KB"),
    ("gptj-bf16", GPTJ, torch.bfloat16, 15, None),
    ("neox-par-bf16", NEOX, torch.bfloat16, 9, None),
]

INIT_STD = 0.25              # matrices; large enough that logits are far from uniform


def prompts():
    """The prompts every model is run on: 1 token, a few, ~20, and Dolly's template."""
    return ["The",
            "It's 42!",
            "if (x):\n\treturn 'café'; ☕",
            dolly_prompt("Name three primary colors.")]


def random_model(cfg, seed):
    """A transformers model whose every parameter is drawn from our own generator.

    transformers' own init leaves biases at 0 and layer-norm weights at 1, which
    would hide a C implementation that ignores them."""
    cfg = dict(cfg)
    mtype = cfg.pop("model_type")
    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=INIT_STD,
                  tie_word_embeddings=False)
    if mtype == "gptj":
        config = transformers.GPTJConfig(**cfg, **common)
        model = transformers.GPTJForCausalLM(config)
    else:
        config = transformers.GPTNeoXConfig(**cfg, **common)
        model = transformers.GPTNeoXForCausalLM(config)
    assert config.vocab_size > TOKENIZER_IDS
    model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:
                p.copy_(noise * INIT_STD)
            elif name.endswith("weight"):          # layer norm gain
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def load_model(path, dtype):
    """Load a fixture directory as transformers would, eager attention, given dtype."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def greedy(model, ids):
    """model.generate greedy, 32 tokens, never stopping at EOS; also returns the
    smallest top-1/top-2 logit gap over the steps, taken from a plain argmax loop
    that recomputes the whole sequence (no KV cache) as a cross-check."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                         eos_token_id=None, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    seq, gap = list(ids), float("inf")
    for _ in range(GREEDY_TOKENS):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        seq.append(int(logits.argmax()))
    assert seq[len(ids):] == new, "generate and argmax loop disagree"
    return new, gap


def cast_parameters(model, dtype):
    """Cast the parameters only.  Buffers (GPT-J's sin/cos table, NeoX's inv_freq)
    stay fp32 as from_pretrained builds them; model.to() would round them too."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def expected_outputs(model, encode):
    """Logits and greedy continuations for each prompt, computed in fp32 (bf16
    weights upcast), plus the logits computed in bf16 for a bf16 model."""
    bf16 = model.dtype == torch.bfloat16
    model32 = cast_parameters(copy.deepcopy(model), torch.float32) if bf16 else model
    tensors, meta, min_gap = {}, {}, float("inf")
    for i, text in enumerate(prompts()):
        ids = encode(text)
        assert i > 0 or len(ids) == 1, "the first prompt must be a single token"
        x = torch.tensor([ids])
        meta["prompt_%d" % i] = text
        tensors["prompt_%d_ids" % i] = torch.tensor(ids, dtype=torch.int32)
        tensors["prompt_%d_logits" % i] = model32(x).logits[0].float()
        new, gap = greedy(model32, ids)
        assert len(ids) + len(new) <= model.config.max_position_embeddings
        tensors["prompt_%d_greedy" % i] = torch.tensor(new, dtype=torch.int32)
        min_gap = min(min_gap, gap)
        if bf16:
            tensors["prompt_%d_logits_bf16" % i] = model(x).logits[0].float()
    assert min_gap > MIN_GREEDY_GAP, "greedy step too close to a tie: %g" % min_gap
    meta.update(prompts=str(len(prompts())), greedy_tokens=str(GREEDY_TOKENS),
                attn_implementation="eager", min_greedy_gap="%.6g" % min_gap,
                transformers=transformers.__version__, torch=torch.__version__)
    return tensors, meta, min_gap


def save_safetensors(path, tensors, metadata):
    """Write a safetensors file with keys in sorted order.  safetensors' own writer
    orders __metadata__ by hash, so its bytes change from run to run."""
    names = {torch.float32: "F32", torch.int32: "I32"}
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for k in sorted(tensors):
        a = tensors[k].numpy()
        blob = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def legacy_config(path):
    """Rewrite config.json in the spelling of the Hugging Face Hub's Dolly checkpoints
    (torch_dtype, rotary_pct, rotary_emb_base), which transformers 5 still reads, so
    that the C parser is tested on both spellings."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = cfg.pop("dtype")
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        assert rope["rope_type"] == "default"
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
    write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def verify(path, dtype):
    """Reload the directory with the Auto* classes, recompute every expected output
    and check that it matches what was stored."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = load_model(path, dtype)
    assert model.dtype == dtype
    again, _, _ = expected_outputs(model, lambda text: tok(text)["input_ids"])
    stored = load_file(os.path.join(path, "expected.safetensors"))
    assert stored.keys() == again.keys()
    for k, v in stored.items():
        # Mapped weights are not 64-byte aligned, so torch may take other SIMD
        # paths than for the in-memory model: not bitwise, but within rounding.
        tol = 1e-5 if v.is_floating_point() else 0
        err = float((v.double() - again[k].double()).abs().max()) if v.numel() else 0.0
        assert v.dtype == again[k].dtype and v.shape == again[k].shape and err <= tol, \
            "%s: %s differs by %g on reload" % (path, k, err)


def build_model(out, name, cfg, dtype, seed, shard, hf_tok):
    """<name>/: weights and tokenizer as save_pretrained writes them, expected.safetensors."""
    path = os.path.join(out, name)
    shutil.rmtree(path, ignore_errors=True)
    model = cast_parameters(random_model(cfg, seed), dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    hf_tok.save_pretrained(path)
    if dtype == torch.bfloat16:
        reference = transformers.AutoConfig.from_pretrained(path).to_dict()
        legacy_config(path)
        assert transformers.AutoConfig.from_pretrained(path).to_dict() == reference
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tensors, meta, gap = expected_outputs(model, lambda text: tok.encode(text).ids)
    save_safetensors(os.path.join(path, "expected.safetensors"), tensors, meta)
    verify(path, dtype)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print("%-14s min greedy gap %.4f, %d files, %d bytes" % (name, gap, len(os.listdir(path)),
                                                             size))


def build_models(out, hf_tok):
    """Every model directory in MODELS."""
    torch.set_num_threads(1)         # one thread: the same sums in the same order
    for name, cfg, dtype, seed, shard in MODELS:
        build_model(out, name, cfg, dtype, seed, shard, hf_tok)


# ---------------------------------------------------------------------------
# The tokenizer in the older files
# ---------------------------------------------------------------------------

# directory -> whether tokenizer_config.json has added_tokens_decoder (transformers >= 4.34)
OLDER_TOKENIZERS = {"tokenizer-legacy": False, "tokenizer-legacy-decoder": True}
OLDER_TWIN = ("gptj-legacy-tok", "gptj-f32", "tokenizer-legacy")


def json_text(obj):
    """JSON as transformers 4 wrote its tokenizer files."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def older_tokenizer_files(tokenizer_json, with_decoder):
    """The fixture tokenizer as transformers 4's GPT2Tokenizer.save_pretrained wrote it once
    Dolly's trainer had added its keys: vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json and tokenizer_config.json, the last with added_tokens_decoder as
    transformers >= 4.34 wrote it, or without as earlier ones did.  Special tokens appear both
    as strings and as AddedToken objects, as in GPT-2's and Dolly's own files."""
    j = json.loads(tokenizer_json)
    vocab = j["model"]["vocab"]
    added = {t["content"]: t["id"] for t in j["added_tokens"] if t["content"] not in vocab}
    eot = {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False,
           "single_word": False}
    config = {"add_bos_token": False, "add_prefix_space": False, "errors": "replace",
              "model_max_length": 2048, "special_tokens_map_file": None,
              "tokenizer_class": "GPT2Tokenizer"}
    if with_decoder:
        flags = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        config.update(added_tokens_decoder={str(t["id"]): {k: t[k] for k in flags}
                                            for t in j["added_tokens"]},
                      additional_special_tokens=DOLLY_SPECIALS, bos_token=EOT, eos_token=EOT,
                      pad_token=EOT, unk_token=EOT, clean_up_tokenization_spaces=True)
    else:
        config.update({k: dict(eot, __type="AddedToken") for k in
                       ("bos_token", "eos_token", "unk_token")}, pad_token=None)
    return {
        "vocab.json": json_text(vocab),
        "merges.txt": "#version: 0.2\n" + "".join("%s %s\n" % (a, b)
                                                  for a, b in j["model"]["merges"]),
        "added_tokens.json": json_text(added),
        "special_tokens_map.json": json_text({"additional_special_tokens": DOLLY_SPECIALS,
                                              "bos_token": eot, "eos_token": EOT,
                                              "pad_token": EOT, "unk_token": eot}),
        "tokenizer_config.json": json_text(config),
    }


def build_older_tokenizers(out):
    """<OLDER_TOKENIZERS>/: the fixture tokenizer in the older files (older_tokenizer_files),
    with decode_cases.json as transformers decodes with what it reads from them; checked to
    encode tokenizer/'s corpus and multi-line documents to tokenizer/'s ids, as
    GPT2TokenizerFast.from_pretrained reads them.  gptj-legacy-tok/: gptj-f32 with its
    tokenizer in tokenizer-legacy/'s files instead of tokenizer.json, checked (verify) to give
    gptj-f32's expected outputs through AutoTokenizer."""
    src = os.path.join(out, "tokenizer")
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer_json = f.read()
    with open(os.path.join(src, "corpus_ids.txt"), encoding="utf-8") as f:
        corpus_ids = [[int(i) for i in line.split()] for line in f]
    with open(os.path.join(src, "multi_line.json"), encoding="utf-8") as f:
        multi_line = json.load(f)
    lines = corpus_lines()
    for name, with_decoder in OLDER_TOKENIZERS.items():
        d = os.path.join(out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for fname, text in older_tokenizer_files(tokenizer_json, with_decoder).items():
            write_text(os.path.join(d, fname), text)
        tok = transformers.GPT2TokenizerFast.from_pretrained(d)
        assert not os.path.exists(os.path.join(d, "tokenizer.json"))
        assert [tok(s)["input_ids"] for s in lines] == corpus_ids, name
        assert [tok(s)["input_ids"] for s in multi_line["docs"]] == multi_line["ids"], name
        write_text(os.path.join(d, "decode_cases.json"),
                   json.dumps(decode_cases(tok.backend_tokenizer), ensure_ascii=False,
                              indent=1) + "\n")
        print("%-24s %d ids; special: %s" % (name, len(tok), ", ".join(
            repr(t.content) for t in tok.added_tokens_decoder.values() if t.special)))

    twin, model, files = OLDER_TWIN
    d = os.path.join(out, twin)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for fname in ("config.json", "generation_config.json", "model.safetensors",
                  "expected.safetensors"):
        shutil.copy(os.path.join(out, model, fname), d)
    for fname in older_tokenizer_files(tokenizer_json, False):
        shutil.copy(os.path.join(out, files, fname), d)
    torch.set_num_threads(1)
    verify(d, torch.float32)
    print("%-24s %s with the tokenizer of %s: same expected outputs" % (twin, model, files))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

TRAIN_MODELS = ["gptj-f32", "neox-par-f32", "neox-seq-f32"]
TRAIN_STEPS = 10
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
MAX_GRAD_NORM = 1.0
WARMUP_STEPS = 3             # then linear decay to 0 at TRAIN_STEPS
IGNORE = -100


def train_records():
    """Dolly records (instruction, context, response) of different lengths, one with a
    context, short enough for the fixture models' 128 positions."""
    rng = random.Random(SEED + 3)
    return [("Name three primary colors.", "", "Red, blue and yellow."),
            ("Summarize the text.", "The %s is %s." % (rng.choice(NOUNS), rng.choice(ADJS)),
             "It is %s." % rng.choice(ADJS)),
            ("Explain %s." % rng.choice(TOPICS), "", prose_line(rng))]


def train_example(encode, response_id, record):
    """A record as Dolly's trainer tokenizes it, and the index of its first label: the
    labels are the ids with every position up to and including the first "### Response:\n"
    token set to -100, as DataCollatorForCompletionOnlyLM does."""
    instruction, context, response = record
    ids = encode("%s%s\n\n%s" % (dolly_prompt(instruction, context), response, END_KEY))
    return ids, ids.index(response_id) + 1


def collate(examples):
    """input_ids, attention_mask and labels of a batch, right-padded with EOS (Dolly's
    pad token, 0 here) whose labels are -100, as the collator makes them."""
    width = max(len(ids) for ids, _ in examples)
    input_ids, mask, labels = [], [], []
    for ids, first in examples:
        pad = width - len(ids)
        input_ids.append(ids + [0] * pad)
        mask.append([1] * len(ids) + [0] * pad)
        labels.append([IGNORE] * first + ids[first:] + [IGNORE] * pad)
    return {k: torch.tensor(v) for k, v in
            dict(input_ids=input_ids, attention_mask=mask, labels=labels).items()}


def batch_loss(model, examples):
    """transformers' causal-LM loss of the padded batch (mean cross-entropy of logits[:, :-1]
    against labels[:, 1:] over the label tokens), checked against the same sum taken one
    unpadded example at a time."""
    loss = model(**collate(examples)).loss
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, first in examples:
            logits = model(torch.tensor([ids])).logits[0, first - 1:-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits, torch.tensor(ids[first:]), reduction="sum"))
            count += len(ids) - first
    assert abs(total / count - loss.item()) < 1e-5, (total / count, loss.item())
    return loss


# transformers 5 renames GPT-NeoX's output layer in memory; the files keep the old name
FILE_NAMES = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def file_names(path, model):
    """Parameter name -> the name of the tensor in the directory's safetensors files,
    checked to cover those files exactly."""
    rename = FILE_NAMES.get(model.config.model_type, {})
    names = {n: rename.get(n, n) for n, _ in model.named_parameters()}
    stored = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors") and f != "expected.safetensors" and \
                f != "train_expected.safetensors":
            stored |= set(load_file(os.path.join(path, f)).keys())
    assert set(names.values()) == stored, set(names.values()) ^ stored
    return names


def batch_tensors(examples):
    """The batch as the expectations record it: example_<i>_ids, first_label, n_labels."""
    tensors = {"example_%d_ids" % i: torch.tensor(ids, dtype=torch.int32)
               for i, (ids, _) in enumerate(examples)}
    tensors["first_label"] = torch.tensor([f for _, f in examples], dtype=torch.int32)
    tensors["n_labels"] = torch.tensor([sum(len(ids) - f for ids, f in examples)],
                                       dtype=torch.int32)
    return tensors


def adamw_steps(model, examples):
    """TRAIN_STEPS torch.optim.AdamW steps of the model's trainable parameters on the batch:
    the losses, pre-clipping gradient norms and learning rates of the steps."""
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, **ADAMW)
    sched = transformers.get_linear_schedule_with_warmup(opt, WARMUP_STEPS, TRAIN_STEPS)
    losses, norms, lrs = [], [], []
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss = batch_loss(model, examples)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return {"adamw_losses": torch.tensor(losses, dtype=torch.float32),
            "adamw_grad_norms": torch.tensor(norms, dtype=torch.float32),
            "adamw_lrs": torch.tensor(lrs, dtype=torch.float32)}


def train_expected(path, examples):
    """The loss and gradients of one batch, then TRAIN_STEPS AdamW steps on it."""
    model = load_model(path, torch.float32).train()
    tensors = batch_tensors(examples)
    loss = batch_loss(model, examples)
    loss.backward()
    tensors["loss"] = loss.detach().reshape(1)
    names = file_names(path, model)
    for name, p in model.named_parameters():
        tensors["grad." + names[name]] = p.grad.clone()
    tensors.update(adamw_steps(load_model(path, torch.float32).train(), examples))
    return tensors


def build_train(out):
    """<model>/train_expected.safetensors for the float32 models: a batch of Dolly
    examples (example_<i>_ids, first_label: ids[first_label:] are the labels), its
    mean loss over label tokens and the gradient of every parameter ("grad." + the
    tensor's name in the model files, float32, their layout), and the losses, pre-clipping
    gradient norms and learning rates of TRAIN_STEPS torch.optim.AdamW steps on that
    batch (ADAMW, clip_grad_norm_ MAX_GRAD_NORM, get_linear_schedule_with_warmup)."""
    torch.set_num_threads(1)
    for name in TRAIN_MODELS:
        path = os.path.join(out, name)
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        records = train_records()
        examples = [train_example(lambda text: tok.encode(text).ids,
                                  tok.token_to_id(RESPONSE_KEY_NL), r) for r in records]
        assert len(set(len(ids) for ids, _ in examples)) == len(examples)
        tensors = train_expected(path, examples)
        meta = {"records": str(len(records)), "steps": str(TRAIN_STEPS),
                "lr": str(ADAMW["lr"]), "betas": "%s,%s" % ADAMW["betas"],
                "eps": str(ADAMW["eps"]), "weight_decay": str(ADAMW["weight_decay"]),
                "max_grad_norm": str(MAX_GRAD_NORM), "warmup_steps": str(WARMUP_STEPS),
                "schedule": "linear", "transformers": transformers.__version__,
                "torch": torch.__version__}
        for i, (instruction, context, response) in enumerate(records):
            meta.update({"record_%d_instruction" % i: instruction,
                         "record_%d_context" % i: context,
                         "record_%d_response" % i: response})
        save_safetensors(os.path.join(path, "train_expected.safetensors"), tensors, meta)
        print("%-14s train: %d examples of %s tokens, loss %.4f -> %.4f after %d steps" % (
            name, len(examples), "/".join(str(len(ids)) for ids, _ in examples),
            float(tensors["loss"]), float(tensors["adamw_losses"][-1]), TRAIN_STEPS))


# ---------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------

# (base, tag, LoraConfig options, seed): PEFT's default targets for each architecture, and
# every linear module of a layer (GPT-J's six, GPT-NeoX's four, with rsLoRA's scale)
LORA_ADAPTERS = [
    ("gptj-f32", "lora-qv", dict(r=4, lora_alpha=8), 31),
    ("gptj-f32", "lora-all", dict(r=2, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]), 32),
    ("neox-par-f32", "lora-qkv", dict(r=4, lora_alpha=8), 33),
    ("neox-seq-f32", "lora-all", dict(r=3, lora_alpha=6, use_rslora=True, target_modules=[
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]), 34),
    # Dolly's three tokens' rows trained too, as for a base that lacks them (transformers 5
    # names GPT-NeoX's embed_out lm_head)
    ("neox-par-f32", "lora-tok", dict(r=4, lora_alpha=8, trainable_token_indices={
        "embed_in": [512, 513, 514], "lm_head": [512, 513, 514]}), 35),
]
LORA_STD = 0.25              # A and B: B is not PEFT's zeros, so that the adapter shows


def lora_model(base, options, seed):
    """PEFT's LoRA of the base model directory, its A and B drawn from our generator."""
    model = peft.get_peft_model(load_model(base, torch.float32), peft.LoraConfig(
        task_type="CAUSAL_LM", lora_dropout=0.0, **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_STD)
            elif "trainable_tokens_delta" in name:    # token rows: moved off the base's
                p.add_(torch.randn(p.shape, generator=gen) * LORA_STD)
    return model.eval()


def lora_grads(model):
    """The LoRA parameters' gradients under the names PEFT saves them with."""
    return {"grad." + name.replace(".default", ""): p.grad.clone()
            for name, p in model.named_parameters() if p.requires_grad}


def lora_train_expected(base, options, seed, examples):
    """As train_expected, for the adapter's parameters over the frozen base."""
    model = lora_model(base, options, seed).train()
    tensors = batch_tensors(examples)
    loss = batch_loss(model, examples)
    loss.backward()
    tensors["loss"] = loss.detach().reshape(1)
    tensors.update(lora_grads(model))
    tensors.update(adamw_steps(lora_model(base, options, seed).train(), examples))
    return tensors


def build_lora(out):
    """<base>-lora-<tag>/ for each LORA_ADAPTERS entry (beside its base, not in it, so that
    copies of a model directory hold only the model): the adapter as PEFT's save_pretrained
    writes it (base_model_name_or_path: the base's directory name; no README; the targets
    sorted), checked by
    loading it back with PeftModel.from_pretrained; expected.safetensors, the logits of
    every prompt with the adapter (prompt_<i>_ids, prompt_<i>_logits); and
    train_expected.safetensors as build_train's, with the gradients of the adapter's
    tensors ("grad." + PEFT's saved name) and AdamW steps on them alone."""
    torch.set_num_threads(1)
    for name, tag, options, seed in LORA_ADAPTERS:
        base = os.path.join(out, name)
        path = os.path.join(out, "%s-%s" % (name, tag))
        shutil.rmtree(path, ignore_errors=True)
        model = lora_model(base, options, seed)
        model.peft_config["default"].base_model_name_or_path = name
        model.save_pretrained(path)
        os.remove(os.path.join(path, "README.md"))
        os.chmod(os.path.join(path, "adapter_model.safetensors"), 0o644)     # PEFT's is 0600
        # PEFT writes target_modules from a set, in an order that changes from run to run
        config_path = os.path.join(path, "adapter_config.json")
        config = json.load(open(config_path))
        config["target_modules"] = sorted(config["target_modules"])
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
        again = peft.PeftModel.from_pretrained(load_model(base, torch.float32), path).eval()
        tensors = {}
        with torch.no_grad():
            for i, text in enumerate(prompts()):
                x = torch.tensor([tok.encode(text).ids])
                tensors["prompt_%d_ids" % i] = x[0].to(torch.int32)
                tensors["prompt_%d_logits" % i] = model(x).logits[0].float()
                assert torch.equal(again(x).logits[0], tensors["prompt_%d_logits" % i])
        meta = {"prompts": str(len(prompts())), "peft": peft.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
        save_safetensors(os.path.join(path, "expected.safetensors"), tensors, meta)
        examples = [train_example(lambda text: tok.encode(text).ids,
                                  tok.token_to_id(RESPONSE_KEY_NL), r) for r in train_records()]
        tensors = lora_train_expected(base, options, seed, examples)
        meta.update(steps=str(TRAIN_STEPS), lr=str(ADAMW["lr"]))
        save_safetensors(os.path.join(path, "train_expected.safetensors"), tensors, meta)
        print("%-14s %-8s %d parameters, loss %.4f -> %.4f after %d steps, %d bytes" % (
            name, tag, sum(p.numel() for p in model.parameters() if p.requires_grad),
            float(tensors["loss"]), float(tensors["adamw_losses"][-1]), TRAIN_STEPS,
            sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))))


# ---------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------

# .bin directory, its safetensors twin, pickled as an OrderedDict with _metadata (what
# torch.save(model.state_dict()) writes) or as the plain dicts of transformers 4's
# shard_checkpoint, shards.  The float16 twin is made here from neox-par-f32.
BIN_MODELS = [
    ("neox-par-f32-bin", "neox-par-f32", "state_dict", 1),
    ("neox-par-f16-bin", "neox-par-f16", "dict", 1),
    ("gptj-bf16-bin", "gptj-bf16", "dict", 2),
]
COPIED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def twin_f16(out):
    """neox-par-f16/: neox-par-f32's parameters cast to float16, as save_pretrained
    writes them (no expected outputs: it is only the twin of neox-par-f16-bin)."""
    path = os.path.join(out, "neox-par-f16")
    shutil.rmtree(path, ignore_errors=True)
    model = cast_parameters(load_model(os.path.join(out, "neox-par-f32"), torch.float32),
                            torch.float16)
    model.save_pretrained(path)
    for f in COPIED[2:]:
        shutil.copy(os.path.join(out, "neox-par-f32", f), path)


def twin_tensors(path):
    """The tensors of a safetensors model directory, in the order of its files."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) \
        if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(path, f)))
    return tensors


def state_dict_order(twin, tensors):
    """The tensors in the order of the model's state_dict, as transformers 4 saved them,
    with the buffers old GPT-J checkpoints carry before each layer's attention weights
    (transformers 4.x GPTJAttention: the causal mask attn.bias, bool [1, 1, P, P], and
    attn.masked_bias, -1e9), which loaders ignore."""
    config = json.load(open(os.path.join(twin, "config.json")))
    model = load_model(twin, torch.float32)
    rename = FILE_NAMES.get(config["model_type"], {})
    order = collections.OrderedDict()
    for name in model.state_dict():
        name = rename.get(name, name)
        layer = re.match(r"transformer\.h\.\d+\.attn\.", name)
        if layer and layer.group(0) + "bias" not in order:
            p = config["n_positions"]
            order[layer.group(0) + "bias"] = torch.tril(
                torch.ones((p, p), dtype=torch.bool)).view(1, 1, p, p)
            order[layer.group(0) + "masked_bias"] = torch.tensor(-1e9)
        order[name] = tensors[name]
    assert set(tensors) <= set(order), set(tensors) - set(order)
    return order


def save_bin(path, tensors, form, shards):
    """pytorch_model.bin, or pytorch_model-0000K-of-0000N.bin with their index split as
    transformers 4's shard_checkpoint split (in order, a shard full at 1/shards of the
    bytes)."""
    limit = sum(t.numel() * t.element_size() for t in tensors.values()) / shards
    blocks, size = [collections.OrderedDict()], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if blocks[-1] and size + nbytes > limit and len(blocks) < shards:
            blocks.append(collections.OrderedDict())
            size = 0
        blocks[-1][name] = t
        size += nbytes
    assert len(blocks) == shards
    names = ["pytorch_model.bin"] if shards == 1 else \
        ["pytorch_model-%05d-of-%05d.bin" % (k + 1, shards) for k in range(shards)]
    for name, block in zip(names, blocks):
        if form == "state_dict":
            block._metadata = collections.OrderedDict([("", {"version": 1})])
        torch.save(block if form == "state_dict" else dict(block), os.path.join(path, name))
    if shards > 1:
        index = {"metadata": {"total_size": int(sum(t.numel() * t.element_size()
                                                    for t in tensors.values()))},
                 "weight_map": {n: names[k] for k, b in enumerate(blocks) for n in b}}
        write_text(os.path.join(path, "pytorch_model.bin.index.json"),
                   json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_bin_models(out):
    """<name>-bin/: each BIN_MODELS twin's weights as PyTorch checkpoints (the same
    names, dtypes and bytes), its config and tokenizer copied; checked by loading them
    with torch.load(weights_only=True) against the twin."""
    twin_f16(out)
    for name, twin, form, shards in BIN_MODELS:
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        for f in COPIED:
            shutil.copy(os.path.join(out, twin, f), path)
        tensors = twin_tensors(os.path.join(out, twin))
        save_bin(path, state_dict_order(os.path.join(out, twin), tensors), form, shards)
        loaded = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".bin"):
                loaded.update(torch.load(os.path.join(path, f), weights_only=True))
        for k, t in tensors.items():
            assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
        print("%-16s %d tensors of %s, %d shard(s), %d bytes" % (
            name, len(loaded), twin, shards,
            sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))))


class SystemCall:
    """What a malicious checkpoint pickles: unpickling it runs os.system."""

    def __reduce__(self):
        return (os.system, ("echo this checkpoint ran a command",))


def zip_entries(path):
    """(name, bytes) of every entry of a zip archive, in order."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rezip(path, entries, compression=zipfile.ZIP_STORED):
    """Write entries as Python's zipfile does (sizes in the local headers, no data
    descriptors, nothing aligned), with a fixed date so the bytes do not change."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            z.writestr(info, data)


def zip64(path, entries):
    """Write entries as miniz (torch's writer) lays out an archive past 4 GB: data
    descriptors with 8-byte sizes, ZIP64 extra fields in the local headers and the
    central records (which hold all ones), a ZIP64 end record and its locator."""
    out, central = bytearray(), bytearray()
    for name, data in entries:
        n, crc, size = name.encode(), zlib.crc32(data), len(data)
        local_extra = struct.pack("<HHQQ", 1, 16, size, size)
        central_extra = struct.pack("<HHQQQ", 1, 24, size, size, len(out))
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 8, 0, 0, 0x21, crc,
                               0xFFFFFFFF, 0xFFFFFFFF, len(n), len(central_extra), 0, 0, 0, 0,
                               0xFFFFFFFF) + n + central_extra
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 8, 0, 0, 0x21, 0, 0, 0, len(n),
                           len(local_extra)) + n + local_extra + data
        out += struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    cd_off, count = len(out), len(entries)
    out += central
    end64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central),
                       cd_off)
    out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(out)


def replace_pickle(entries, old, new):
    """entries with one occurrence of old in data.pkl replaced by new."""
    out = []
    for name, data in entries:
        if name.endswith("/data.pkl"):
            assert data.count(old) == 1, (old, data)
            data = data.replace(old, new)
        out.append((name, data))
    return out


def build_torch_archives(out):
    """torch-ckpt/: small archives for the reader's tests and the fuzzer's seeds.

    views.bin (read back with its values in tests/engine/test_torch_ckpt.c): storages
    shared by several tensors and views at an offset, a scalar, every float dtype, bool
    and int64. zip64.bin: the same entries laid out as torch lays out archives past 4 GB.
    The rest must be refused, each with its own error: os_system.bin (a pickle that
    calls os.system), numpy_global.bin (a global outside the list: a numpy array),
    short_storage.bin (a storage entry shorter than its declared size),
    past_storage.bin (a tensor running past the end of its storage), bad_offset.bin (a
    central record pointing at the wrong local header), noncontiguous.bin (a transposed
    view), compressed.bin (deflated entries), legacy.bin (torch.save's format before
    1.6); truncated archives are made by the test from views.bin."""
    path = os.path.join(out, "torch-ckpt")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    base = torch.arange(10, dtype=torch.float32) / 4
    views = collections.OrderedDict([
        ("whole", base), ("head", base[:4]), ("tail", base[4:]), ("row", base.view(2, 5)[1]),
        ("matrix", (torch.arange(6, dtype=torch.float32) - 2.5).view(2, 3)),
        ("half", torch.tensor([1.5, -2.0, 65504.0], dtype=torch.float16)),
        ("brain", torch.tensor([0.5, -3.0, 1e30], dtype=torch.bfloat16)),
        ("mask", torch.tril(torch.ones(3, 3, dtype=torch.bool)).view(1, 1, 3, 3)),
        ("scalar", torch.tensor(-1e9)), ("ids", torch.tensor([7, -1, 2**40])),
        ("empty", torch.zeros(0, 4))])
    torch.save(views, os.path.join(path, "views.bin"))
    entries = zip_entries(os.path.join(path, "views.bin"))
    zip64(os.path.join(path, "zip64.bin"), entries)
    rezip(os.path.join(path, "compressed.bin"), entries, zipfile.ZIP_DEFLATED)
    torch.save(SystemCall(), os.path.join(path, "os_system.bin"))
    torch.save({"w": numpy.ones(2, dtype=numpy.float32)}, os.path.join(path, "numpy_global.bin"))
    torch.save({"w": torch.arange(6.0).view(2, 3).t()}, os.path.join(path, "noncontiguous.bin"))
    legacy = os.path.join(path, "legacy.bin")
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with open(legacy, "rb") as f:
        data = f.read()
    # the storage's key is its memory address: zeroed, so that the bytes do not change
    for key in set(re.findall(rb"X..\x00\x00(\d{8,})", data, re.S)):
        data = data.replace(key, b"0" * len(key))
    with open(legacy, "wb") as f:
        f.write(data)

    small = os.path.join(path, "small.bin")
    torch.save({"w": torch.arange(4.0)[1:]}, small)
    entries = zip_entries(small)
    os.remove(small)
    rezip(os.path.join(path, "short_storage.bin"),
          [(n, d[:8] if n.endswith("/data/0") else d) for n, d in entries])
    # size (3,) -> (4,): BININT1 3, TUPLE1 -> BININT1 4, TUPLE1
    rezip(os.path.join(path, "past_storage.bin"), replace_pickle(entries, b"K\x03\x85", b"K\x04\x85"))
    rezip(os.path.join(path, "bad_offset.bin"), entries)
    with open(os.path.join(path, "bad_offset.bin"), "r+b") as f:
        data = f.read()
        name = [n for n, _ in entries if n.endswith("/data/0")][0].encode()
        # the central record of data/0: its local header offset (at +42) moved by one
        at = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i) and
              data[i + 46:i + 46 + len(name)] == name][0]
        f.seek(at + 42)
        f.write(struct.pack("<I", struct.unpack("<I", data[at + 42:at + 46])[0] + 1))
    print("torch-ckpt: %d archives, %d bytes" % (len(os.listdir(path)), sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))))


def main():
    """Build every fixture under --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "fixtures"))
    args = ap.parse_args()
    hf_tok = build_tokenizer(args.out)
    build_models(args.out, hf_tok)
    build_older_tokenizers(args.out)
    build_train(args.out)
    build_lora(args.out)
    build_bin_models(args.out)
    build_torch_archives(args.out)


if __name__ == "__main__":
    main()
