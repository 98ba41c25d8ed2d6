"""A byte-level tokenizer built offline: the 256 byte values plus pad, bos and eos.

Token ``b`` (0..255) is byte ``b`` of the UTF-8 text, so any text round-trips and the
vocabulary (259 tokens) fits ``tiny_spec``'s 272 rows. It is a ``tokenizers`` BPE model with the
byte alphabet and no merges, wrapped in ``transformers.PreTrainedTokenizerFast`` (so
``save_pretrained``/``from_pretrained`` work as for any HF tokenizer), padding on the left as
generation needs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Vocabulary size of :func:`byte_tokenizer` (ids 0-255 bytes, 256 pad, 257 bos, 258 eos)."""


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for each byte, the alphabet tokenizers' ByteLevel uses.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer(model_max_length: int = 2048) -> Any:
    """A fresh byte-level ``PreTrainedTokenizerFast`` (left padding, no special tokens added by encode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
    )
    return fast


def save_tokenizer(tokenizer: Any, folder: str | Path) -> Path:
    """Write ``tokenizer`` to ``folder`` (HF layout: tokenizer.json, tokenizer_config.json, ...)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer(source: str | Path | Any | None = None) -> Any:
    """A tokenizer from a local folder, an already built tokenizer, or None (the byte tokenizer).

    The result pads on the left and has a pad token (eos when the folder's tokenizer has none).
    Nothing is downloaded: a folder without ``tokenizer.json``/``tokenizer_config.json`` is an error.
    """
    if source is None:
        return byte_tokenizer()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_dir() or not any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            raise FileNotFoundError(
                f"tokenizer={str(source)!r}: not a folder holding tokenizer.json or tokenizer_config.json "
                "(give a local tokenizer folder, a tokenizer object, or None for the byte tokenizer)"
            )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tok = source
    if not hasattr(tok, "encode") or not hasattr(tok, "decode"):
        raise TypeError(f"tokenizer {type(tok).__name__} has no encode/decode; give an HF tokenizer")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
