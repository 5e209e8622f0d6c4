"""In-process word-level tokenizers for the tiny test pipelines.

Real pipelines load their tokenizers from the Hub; tests here must run offline,
so these build ``PreTrainedTokenizerFast`` objects from a fixed vocabulary that
mimic the special-token conventions of CLIP, T5 and Llama-3. Lower-cased words
outside the vocabulary map to ``<unk>``. Everything is deterministic.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Ids 0-2 follow T5 (pad, eos, unk) so the T5 encoder configs can use the usual ids.
# CLIP's eos deliberately is not id 2: transformers treats eos_token_id == 2 as a
# legacy CLIP config and pools at argmax(input_ids) instead of at the eos token.
PAD, T5_EOS, UNK = "<pad>", "</s>", "<unk>"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
LLAMA_BOS = "<|begin_of_text|>"
# The Llama-3 chat markers appear in HunyuanVideo's prompt template.
LLAMA_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIAL_TOKENS = (PAD, T5_EOS, UNK, CLIP_BOS, CLIP_EOS, LLAMA_BOS, *LLAMA_MARKERS)

_WORDS = """
. , : ; ! ? ' " - ( ) 0 1 2 3 4 5 6 7 8 9
a an the of on in at to from with and or but by for into onto over under above below
behind between near next is are was be being it its this that these there here
one two three four five many some small large big tiny huge little long short tall
circle circles square squares triangle triangles rectangle star stars line lines dot
dots ball box cube sphere ring shape shapes object objects
red green blue yellow orange purple pink black white gray grey brown cyan magenta
dark light bright colorful color colors
left right top bottom center middle corner side up down upper lower
moving moves move rotating rotates spinning falling rising bouncing sliding flying
walking running jumping dancing slowly quickly fast slow towards away around across
cat dog bird fish horse monkey person man woman child car tree house flower sky sun
moon water sea river mountain city street road field forest grass snow rain cloud
photo picture image painting drawing video scene view background foreground style
realistic simple detailed high quality beautiful
describe describing detailing following aspects main content theme size texture
quantity text spatial relationships actions events behaviors temporal physical
movement changes environment atmosphere camera angles movements transitions used
system user
""".split()


def _vocab() -> dict[str, int]:
    tokens = list(dict.fromkeys((*SPECIAL_TOKENS, *_WORDS)))
    return {token: i for i, token in enumerate(tokens)}


VOCAB = _vocab()
VOCAB_SIZE = len(VOCAB)


def _build(template: str, special: dict[str, str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose post-processor adds the family's bos/eos tokens."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Registering the specials keeps e.g. "<|eot_id|>" whole instead of split at "|".
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tokens_in_template = [t for t in template.split() if t in VOCAB]
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        pair=f"{template} $B:1",
        special_tokens=[(t, VOCAB[t]) for t in tokens_in_template],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, model_max_length=model_max_length, **special
    )


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP-like: ``<|startoftext|> words <|endoftext|>``, 77 tokens max."""
    return _build(
        f"{CLIP_BOS} $A {CLIP_EOS}",
        {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": PAD},
        model_max_length=77,
    )


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """T5/UMT5-like: ``words </s>``, padded with ``<pad>`` (id 0)."""
    return _build(f"$A {T5_EOS}", {"eos_token": T5_EOS, "pad_token": PAD}, model_max_length=512)


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3-like: ``<|begin_of_text|> words``, with the chat markers as special tokens."""
    return _build(
        f"{LLAMA_BOS} $A",
        {"bos_token": LLAMA_BOS, "eos_token": LLAMA_MARKERS[2], "pad_token": PAD},
        model_max_length=1024,
    )
