"""Prompt size bounded before tokenization (issue 18 §1.2).

A prompt over ``MAX_PROMPT_BYTES`` of UTF-8 is refused at once, by every entry (tokenizer, pipeline
arguments, interpolate texts, the served path); a long prompt under the cap is tokenized from a head
that fills the 77 tokens, and the ids are those of the whole prompt: shown here over many generated
prompts (multibyte scripts, odd whitespace, long unbroken runs, special tokens), against the whole
prompt through the same backend and against transformers.
"""

from __future__ import annotations

import os
import random
import time
import tracemalloc

import numpy as np
import pytest

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, PipelineInputError
from kandinsky_trt.runtime.pipelines import inputs
from kandinsky_trt.runtime.processing.tokenization import HEAD_CHARS, MAX_PROMPT_BYTES, TextTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_WORDS = ("cat dog castle fox painting, oil detailed 4k, red-blue Кот шляпе café naïve résumé ß Straße "
          "猫と犬 富士山の絵 🎨 🐱‍👤 e\u0301 a\u0308 x's it'll <|endoftext|> <mask> <pad> 12345 ½ ℌ ﬁ "
          "العربية हिन्दी 한국어 ...!!! \"quoted\" l'été").split()
_SPACES = (" ", " ", " ", "  ", "\t", "\n", " \u3000 ", "\u00a0", " \r\n ")
BIG = 5 * 1024 * 1024


def _prompt(rng: random.Random) -> str:
    """A random prompt of 0.3k-20k characters; some with long unbroken runs (no spaces at all)."""
    kind = rng.random()
    target = rng.choice((300, 600, 1500, 4000, 20000))
    if kind < 0.1:
        return "".join(rng.choice(("猫", "犬", "a", "é", "🎨")) for _ in range(target))  # no space at all
    parts, size = [], 0
    while size < target:
        word = rng.choice(_WORDS) * (rng.randint(20, 200) if rng.random() < 0.03 else 1)
        parts += [word, rng.choice(_SPACES)]
        size += len(word) + 1
    return "".join(parts)


PROMPTS = [_prompt(random.Random(seed)) for seed in range(120)]


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint):
    from transformers import AutoTokenizer

    prior_dir, decoder_dir = tiny_checkpoint.prior / "tokenizer", tiny_checkpoint.decoder / "tokenizer"
    prior = AutoTokenizer.from_pretrained(prior_dir), TextTokenizer.from_folder(prior_dir, max_length=None)
    decoder = AutoTokenizer.from_pretrained(decoder_dir), TextTokenizer.from_folder(decoder_dir, max_length=77)
    return {"prior": prior, "decoder": decoder}


def _whole(ours: TextTokenizer, prompts: list[str]) -> np.ndarray:
    """The ids of the whole prompts, through the same backend without any head."""
    return np.array([e.ids for e in ours._backend.encode_batch(prompts, add_special_tokens=True)])


@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_heads_give_the_whole_prompts_ids(which, tokenizers):
    reference, ours = tokenizers[which]
    assert ours._heads, "both Kandinsky tokenizer layouts must take the head path"
    heads = [ours._head(p) for p in PROMPTS]
    shortened = sum(len(h) < len(p) for h, p in zip(heads, PROMPTS))
    assert shortened >= 80, f"only {shortened} of {len(PROMPTS)} prompts exercised the head"
    ids, mask = ours.encode(PROMPTS)
    np.testing.assert_array_equal(ids, _whole(ours, PROMPTS))
    ref = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref.input_ids)
    np.testing.assert_array_equal(mask, ref.attention_mask)


@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_short_prompts_are_tokenized_unchanged(which, tokenizers):
    """Prompts up to HEAD_CHARS take the old path exactly: same string, same ids as before."""
    _, ours = tokenizers[which]
    short = [p[:HEAD_CHARS] for p in PROMPTS] + ["", "a cat", "猫 " * 200]
    assert all(ours._head(p) is p for p in short)
    np.testing.assert_array_equal(ours.encode(short)[0], _whole(ours, short))


def test_other_tokenizer_layouts_are_tokenized_whole(tmp_path, tokenizers):
    """A pre-tokenizer not known to split at spaces (here: none) gets no head."""
    import json

    _, ours = tokenizers["decoder"]
    config = json.loads(ours._backend.to_str())
    config["pre_tokenizer"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    other = TextTokenizer(path, pad_id=ours.pad_id)
    assert not other._heads and other._head(PROMPTS[5]) is PROMPTS[5]


@pytest.mark.parametrize("size", [MAX_PROMPT_BYTES + 1, BIG])
def test_tokenizer_refuses_oversized_prompts_fast(size, tokenizers):
    _, ours = tokenizers["prior"]
    prompt = "é" * (size // 2) + "a" * (size % 2)  # multibyte: the bytes count, not the characters
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(PipelineInputError) as caught:
        ours.encode(["ok", prompt])
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(caught.value) == f"prompts[1]: expected at most {MAX_PROMPT_BYTES} bytes of UTF-8, found {size}"
    assert seconds < 0.5 and peak < 2 * size + (1 << 20), (seconds, peak)
    if os.environ.get("KTRT_MEASURE"):
        print(f"\nrefused {size} bytes in {seconds * 1e3:.2f} ms, traced peak {peak / 2**20:.2f} MiB")


def test_largest_prompt_is_accepted_and_bounded(tokenizers):
    """At the cap: a prompt with no spaces at all (no head possible) is tokenized whole, quickly."""
    for which in ("prior", "decoder"):
        _, ours = tokenizers[which]
        for prompt in ("a" * MAX_PROMPT_BYTES, "猫" * (MAX_PROMPT_BYTES // 3), "cat " * (MAX_PROMPT_BYTES // 4)):
            start = time.perf_counter()
            ids, _ = ours.encode(prompt)
            seconds = time.perf_counter() - start
            np.testing.assert_array_equal(ids, _whole(ours, [prompt]))
            assert seconds < 5.0, (which, prompt[:3], seconds)
            if os.environ.get("KTRT_MEASURE"):
                print(f"\n{which} {prompt[:4]!r}x: {len(prompt.encode())} bytes tokenized in {seconds * 1e3:.1f} ms")


@pytest.mark.parametrize("call", [
    lambda big: inputs.check_prompts(big, None, 1),
    lambda big: inputs.check_prompts(["a cat", big], None, 1),
    lambda big: inputs.check_prompts("a cat", big, 1),
    lambda big: inputs.negative_prompts(big, 2),
    lambda big: inputs.check_conditions(["a cat", big]),
], ids=["prompt", "prompt_list", "negative_prompt", "negative_prior_prompt", "interpolate_texts"])
def test_pipeline_arguments_refuse_oversized_texts_first(call):
    big = "x" * BIG
    start = time.perf_counter()
    with pytest.raises(KandinskyTrtError, match=rf"^\S+: expected at most {MAX_PROMPT_BYTES} bytes of UTF-8, "
                                                rf"found {BIG}$"):
        call(big)
    assert time.perf_counter() - start < 0.5


def test_pipelines_refuse_a_5mb_prompt_before_any_network(artifacts_fp32):
    from kandinsky_trt.runtime import Components, KandinskyCombinedPipeline, KandinskyPriorPipeline

    components = Components(artifacts_fp32[0])
    big = "a photo of a cat " * (BIG // 17 + 1)
    prior, combined = KandinskyPriorPipeline(components=components), KandinskyCombinedPipeline(components=components)
    cases = {"prompt": lambda: prior(big, num_inference_steps=2),
             "negative_prompt": lambda: combined("a cat", negative_prompt=big, num_inference_steps=2),
             "images_and_prompts[1]": lambda: prior.interpolate(["a cat", big], [0.5, 0.5])}
    size = len(big.encode())
    for name, call in cases.items():
        start = time.perf_counter()
        with pytest.raises(PipelineInputError) as caught:
            call()
        assert str(caught.value) == f"{name}: expected at most {MAX_PROMPT_BYTES} bytes of UTF-8, found {size}"
        assert time.perf_counter() - start < 0.5
