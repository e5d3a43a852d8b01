"""Post-install repairs for third-party packaging gaps, run by ``make install``.

hpsv2 1.2.0 on PyPI lacks ``hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz``; its tokenizer
then fails when first used. open_clip ships the identical BPE vocabulary, so copy it across.
Idempotent; prints what it did.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def fix_hpsv2_bpe_vocab() -> str:
    hps = importlib.util.find_spec("hpsv2")
    clip = importlib.util.find_spec("open_clip")
    if hps is None or clip is None or hps.origin is None or clip.origin is None:
        return "hpsv2 or open_clip not installed; nothing to fix"
    target = os.path.join(os.path.dirname(hps.origin), "src", "open_clip", BPE_FILE)
    if os.path.isfile(target):
        return f"ok: {target} present"
    source = os.path.join(os.path.dirname(clip.origin), BPE_FILE)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"open_clip's {BPE_FILE} not found at {source}; reinstall open_clip_torch")
    shutil.copyfile(source, target)
    return f"copied {source} -> {target}"


def main() -> None:
    print("install_fixups:", fix_hpsv2_bpe_vocab())


if __name__ == "__main__":
    main()
