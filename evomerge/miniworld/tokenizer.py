"""A character-level tokenizer for the mini-world, saved as an ordinary Hugging Face tokenizer.

Every character of the world's texts is one token; ``AutoTokenizer.from_pretrained(folder)``
loads it back with no custom code. Padding is on the left (batched generation).
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = list("0123456789")
LATIN = list("abcdefghijklmnopqrstuvwxyz")
SYMBOLS = list(" :?.,+=-\n")
JAPANESE = list("たすはこえでのつぎおきいちさとをかいてどれひくがふやにばすうわせるまなんもし？。、")
CHARS = list(dict.fromkeys(DIGITS + LATIN + SYMBOLS + JAPANESE))


def build_tokenizer():
    """The mini-world tokenizer: a ``PreTrainedTokenizerFast`` (WordLevel over characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(folder: str | Path) -> Path:
    """Write the tokenizer files into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(folder)
    return folder
