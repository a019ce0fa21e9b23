"""Tokenizers: the model's own (``from_pretrained``), or a word-level one built locally for the
synthetic vocabulary, so that tiny configs run offline. Importable by data and model code alike.

The local tokenizer follows CLIP's conventions: ``<|startoftext|> words <|endoftext|>``, so the
sentence embedding is read at the end-of-text token as with a real CLIP text tower.
"""

from __future__ import annotations

from vmr.errors import UserError
from vmr.io import first_line
from vmr.vocab import synthetic_vocabulary

SYNTHETIC = "synthetic"
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"


def build_word_tokenizer(words: list[str]):
    """A transformers fast tokenizer over ``words`` (lower-cased, split on spaces and punctuation)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    # Punctuation is dropped, not mapped to <unk>: "a red circle, moving left." reads like the rest.
    core.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " "),
    ])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=77)


def load_tokenizer(name: str):
    """``synthetic``, a hub name or a local directory holding tokenizer files."""
    if name == SYNTHETIC:
        return build_word_tokenizer(synthetic_vocabulary())
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load tokenizer {name!r} ({first_line(error)})") from None


def check_query(tokenizer, query: str) -> str:
    """``query``, refused with one line when it tokenizes to nothing but the start, end and padding
    tokens: spaces, emoji or zero-width characters that a tokenizer drops would otherwise score as
    an empty query does (moments of nothing). An unknown word is still a token."""
    if not isinstance(query, str) or not query.strip():
        raise UserError("the query is empty")
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    framing = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if not any(i not in framing for i in ids):
        raise UserError(f"the query {query[:80]!r} tokenizes to nothing (only spaces, symbols or characters "
                        "the model's tokenizer drops)")
    return query
