"""A character-level tokenizer built locally (no downloads) for the synthetic tasks and the CPU demo.

    tok = build_char_tokenizer("runs/demo/model")          # writes tokenizer.json + tokenizer_config.json
    AutoTokenizer.from_pretrained("runs/demo/model")        # transformers, offline
    vllm.LLM(model="runs/demo/model", tokenizer="runs/demo/model")   # vLLM loads the same files

Every character of the alphabet is one token; special tokens are ``<pad>``, ``<s>`` (BOS, prepended by the
post-processor when ``add_special_tokens=True``), ``</s>`` (EOS) and ``<unk>``. Decoding concatenates characters
(no spaces between tokens), so ``decode(encode(text, add_special_tokens=False)) == text`` for any text over the
alphabet. Built with the ``tokenizers`` library (WordLevel over a one-character split) so that both transformers'
fast tokenizer and vLLM's incremental detokenizer (``tokenizers.decoders.DecodeStream``) handle it natively.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
#: Characters of the arithmetic tasks: digits, operators, '=', space, newline, '#' (the answer marker).
DEFAULT_ALPHABET = "0123456789+-*= \n#"


def char_vocab(alphabet: str = DEFAULT_ALPHABET) -> dict[str, int]:
    """Token → id: the special tokens first (0..3), then each character of ``alphabet`` in order."""
    if len(set(alphabet)) != len(alphabet):
        dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
        raise ValueError(f"alphabet has repeated characters {dup!r}")
    for c in alphabet:
        if c in "<>/" or not c.isprintable() and c not in "\n\t":
            # '<', '>', '/' are excluded so that no character sequence can spell a special token.
            raise ValueError(f"alphabet character {c!r} is not allowed (printable, not one of '<>/', or newline/tab)")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in alphabet:
        vocab[c] = len(vocab)
    return vocab


def _build_backend(alphabet: str) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=char_vocab(alphabet), unk_token=UNK))
    # One pre-token per character; [\s\S] (not ".") so that the newline is a character like any other.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate token strings (the default would join them with spaces)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return tok


def build_char_tokenizer(out_dir: str | Path, alphabet: str = DEFAULT_ALPHABET, model_max_length: int = 4096):
    """Build the character tokenizer, save it to ``out_dir`` (created) and return it.

    Args:
        out_dir: directory for ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``; the
            model's ``config.json`` may live in the same directory (vLLM's ``model=`` and ``tokenizer=``).
        alphabet: the ordinary characters, one token each (ids 4, 5, ... in this order).
        model_max_length: recorded in the tokenizer config (transformers warns beyond it).

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with ``pad/bos/eos/unk`` set; ``len(tok)`` is the vocabulary size
        the model's embedding must have.
    """
    from transformers import PreTrainedTokenizerFast  # late import: transformers is heavy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(alphabet),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # spaces are real characters here; never "clean" them
    )
    tok.save_pretrained(str(out))
    _check_saved(out, alphabet)
    return tok


def _check_saved(out: Path, alphabet: str) -> None:
    """Fail loudly if the saved files do not describe the tokenizer that was built."""
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab")
    if vocab != char_vocab(alphabet):
        raise RuntimeError(f"{path}: saved vocabulary differs from the built one (tokenizers/transformers mismatch?)")


def decode_completion(tokenizer, token_ids: Sequence[int]) -> str:
    """Text of a generated completion *with special tokens kept*, the form task rewards parse.

    vLLM's ``CompletionOutput.text`` drops the EOS token's text, so a completion that stopped on EOS cannot be told
    apart from one cut at ``max_tokens``; its ``token_ids`` keep the EOS id, and decoding them with
    ``skip_special_tokens=False`` yields ``"...</s>"`` exactly when the model emitted EOS.
    """
    return tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """The token ids the engines (and the warm start) see for ``prompt`` — the one prompt encoding.

    A task that rendered the prompt (a chat template, a length filter) keeps the ids it checked in
    ``prompt.meta["prompt_token_ids"]``: those are used as they are, so a template that already emits BOS is not
    given a second one. A raw-text prompt (the synthetic tasks) is tokenized without special tokens and gets exactly
    one BOS in front when the tokenizer has one.
    """
    ids = prompt.meta.get("prompt_token_ids")
    if ids is not None:
        return list(ids)
    ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids
