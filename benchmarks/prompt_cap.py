"""Time and memory of the prompt cap (issue 18 §1.2) on a checkpoint's tokenizers.

``.venv/bin/python benchmarks/prompt_cap.py CHECKPOINT`` (a folder with ``prior/tokenizer`` and
``decoder/tokenizer``, e.g. from ``kandinsky_trt.export.checkpoints.write_tiny_checkpoint``) prints
one line per case; ``--before`` also tokenizes a 5 MB prompt whole, as the code did before the cap
(tens of seconds, ~1 GB). benchmarks/results/cpu-2core_tiny_prompt-cap.txt is its output.
"""

from __future__ import annotations

import resource
import sys
import time
import tracemalloc

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.processing.tokenization import MAX_PROMPT_BYTES, TextTokenizer

CASES = (("5 MB ascii (refused)", "a cat " * (5 * 2**20 // 6)),
         ("5 MB multibyte (refused)", "猫 " * (5 * 2**20 // 4)),
         ("64 KiB + 1 (refused)", "a" * (MAX_PROMPT_BYTES + 1)),
         ("64 KiB no space (tokenized whole)", "a" * MAX_PROMPT_BYTES),
         ("64 KiB CJK no space (tokenized whole)", "猫" * (MAX_PROMPT_BYTES // 3)),
         ("64 KiB words (head)", "a red cat " * (MAX_PROMPT_BYTES // 10)),
         ("short prompt", "a red cat on a blue chair"))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(tokenizer: TextTokenizer, which: str, label: str, prompt: str) -> str:
    rss, start = _rss_mib(), time.perf_counter()
    tracemalloc.start()
    try:
        tokenizer.encode(prompt)
        outcome = "ok"
    except PipelineInputError as err:
        outcome = str(err)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (f"{which:8s} {label:40s} {seconds * 1e3:9.2f} ms  traced peak {peak / 2**20:6.2f} MiB  "
            f"max-RSS growth {_rss_mib() - rss:6.1f} MiB  {outcome}")


def main(checkpoint: str, before: bool) -> None:
    for which, max_length in (("prior", None), ("decoder", 77)):
        tokenizer = TextTokenizer.from_folder(f"{checkpoint}/{which}/tokenizer", max_length=max_length)
        for label, prompt in CASES:
            print(measure(tokenizer, which, label, prompt))
        if before:
            rss, start = _rss_mib(), time.perf_counter()
            tokenizer._backend.encode_batch([CASES[0][1]], add_special_tokens=True)  # the pre-cap code path
            print(f"{which} before the cap: 5 MB ascii prompt tokenized whole in {time.perf_counter() - start:.2f} s, "
                  f"max-RSS growth {_rss_mib() - rss:.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], "--before" in sys.argv[2:])
