"""A real CLIP tokenizer written from a word list (for tiny models; no hub access needed).

A BPE model is trained with the HF ``tokenizers`` library on the words (CLIP's ``</w>``
end-of-word convention, every word one token), written as CLIP's ``vocab.json`` + ``merges.txt``
and loaded back through ``CLIPTokenizer.from_pretrained`` — the same loading path as SD's
tokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_clip_tokenizer(out_dir: str | os.PathLike, words: list[str],
                         model_max_length: int = 16) -> CLIPTokenizer:
    """Train a BPE where each of ``words`` is one token; save CLIP files in ``out_dir``; load them."""
    words = sorted({w.lower() for w in words})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIAL_TOKENS[1]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted({c for w in words for c in w})
    # Upper bound on the vocabulary that merges every word into one symbol.
    vocab_size = len(SPECIAL_TOKENS) + 2 * len(alphabet) + sum(len(w) for w in words) + 8
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=alphabet)
    bpe.train_from_iterator(words * 2, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"),
                        model_max_length=model_max_length) if _takes_files() else \
        CLIPTokenizer.from_pretrained(out, model_max_length=model_max_length)
    tok.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


def _takes_files() -> bool:
    """transformers <5 builds CLIPTokenizer from file paths; 5.x from vocab/merges objects."""
    import inspect
    return "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters
