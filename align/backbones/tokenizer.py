"""A real CLIP tokenizer written from a word list (for tiny models; no hub access needed).

A BPE model is trained with the HF ``tokenizers`` library on the words (CLIP's ``</w>``
end-of-word convention, every word one token), written as CLIP's ``vocab.json`` + ``merges.txt``
and loaded back through ``CLIPTokenizer.from_pretrained`` — the same loading path as SD's
tokenizer.

The toy presets use a committed copy (:data:`TOY_TOKENIZER_DIR`) rather than training one per
build: ``BpeTrainer`` breaks ties between equally frequent pairs in a per-process hash order, so
token ids (and therefore text-encoder embeddings of the shipped toy model) would differ between
runs. Regenerate it with ``python -m align.backbones.tokenizer`` only together with re-pretraining.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: The toy vocabulary's tokenizer (max length 16), written once by :func:`write_clip_tokenizer`.
TOY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "toy_tokenizer"
#: The files of a saved CLIP tokenizer: the fast one reads ``tokenizer.json``; the slow one (and
#: transformers 4.x) needs ``vocab.json`` + ``merges.txt``, so both are kept side by side.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_clip_tokenizer(out_dir: str | os.PathLike, words: list[str], model_max_length: int = 16) -> CLIPTokenizer:
    """Train a BPE where each of ``words`` is one token; save CLIP files in ``out_dir``; load them."""
    words = sorted({w.lower() for w in words})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted({c for w in words for c in w})
    # An upper bound on the vocabulary needed to merge every word into a single symbol.
    vocab_size = 2 + 2 * len(alphabet) + sum(len(w) for w in words) + 8
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        show_progress=False,
        initial_alphabet=alphabet,
    )
    bpe.train_from_iterator(words, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in TOKENIZER_FILES:  # a stale tokenizer.json would win over the new vocab.json/merges.txt
        (out / stale).unlink(missing_ok=True)
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=model_max_length, pad_token=EOS)
    tok.save_pretrained(out)  # tokenizer_config.json: max length and pad token survive from_pretrained
    _check_single_tokens(tok, words, str(out))
    return CLIPTokenizer.from_pretrained(out)


def copy_bpe_files(out_dir: str | os.PathLike, source: str | os.PathLike = TOY_TOKENIZER_DIR) -> None:
    """Put ``vocab.json`` and ``merges.txt`` of ``source`` beside a saved tokenizer in ``out_dir``
    (``save_pretrained`` of transformers 5 writes only ``tokenizer.json``)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(source) / name, Path(out_dir) / name)


def _check_single_tokens(tok: CLIPTokenizer, words: list[str], where: str) -> None:
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise ValueError(
            f"tokenizer {where} splits {len(split)} word(s) into several tokens, e.g. {split[0]!r}; "
            "regenerate it with `python -m align.backbones.tokenizer` (then re-pretrain the toy model)"
        )


def toy_tokenizer() -> CLIPTokenizer:
    """The committed CLIP tokenizer of the toy vocabulary (tests/test_backbones.py checks that every word of
    ``align.toy.world.vocabulary()`` is one token of it)."""
    return CLIPTokenizer.from_pretrained(TOY_TOKENIZER_DIR)


if __name__ == "__main__":  # the regeneration tool: the one place this module reads the toy world
    from align.toy.world import vocabulary

    print(write_clip_tokenizer(TOY_TOKENIZER_DIR, vocabulary()))
