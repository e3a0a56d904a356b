"""runtime.tokenization against transformers' CLIPTokenizer / XLMRobertaTokenizer.

The tokenizers are those of the tiny checkpoint (``write_tiny_checkpoint``), loaded by transformers
with ``AutoTokenizer.from_pretrained(folder)`` and called with the exact arguments of the diffusers
pipelines (kandinsky_map §1.1 step 2 and §1.3 step 2). Comparisons are exact (ids and masks equal).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kandinsky_trt.runtime.processing.tokenization import TextTokenizer, TokenizerFileError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = {
    "empty": [""],
    "short": ["a photo of a cat"],
    "long": ["a very " + "very " * 120 + "long prompt about a red fox in the snow"],
    "several": ["horse", "", "a castle on a hill, oil painting, highly detailed", "red " * 90],
    "non_ascii": ["Кот в шляпе, 猫と犬, café naïve résumé 🎨 — ß"],
    "whitespace_casing": ["  A   PHOTO\tof\n a CAT  ", "HORSE", "horse ", " Horse"],
}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_ckpt")
    write_tiny_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="module")
def prior_pair(checkpoint_dir):
    from transformers import AutoTokenizer

    folder = checkpoint_dir / "prior" / "tokenizer"
    return AutoTokenizer.from_pretrained(folder), TextTokenizer.from_folder(folder, max_length=None)


@pytest.fixture(scope="module")
def decoder_pair(checkpoint_dir):
    from transformers import AutoTokenizer

    folder = checkpoint_dir / "decoder" / "tokenizer"
    return AutoTokenizer.from_pretrained(folder), TextTokenizer.from_folder(folder, max_length=77)


def _prior_reference(tokenizer, prompts):
    """KandinskyPriorPipeline._encode_prompt's call."""
    out = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    )
    return out.input_ids, out.attention_mask


def _decoder_reference(tokenizer, prompts):
    """KandinskyPipeline._encode_prompt's call (also img2img / inpaint)."""
    out = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=77,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="np",
    )
    return out.input_ids, out.attention_mask


def test_tokenizer_classes_are_the_pipelines(prior_pair, decoder_pair):
    assert type(prior_pair[0]).__name__ == "CLIPTokenizer"
    assert type(decoder_pair[0]).__name__ == "XLMRobertaTokenizer"
    assert prior_pair[1].max_length == prior_pair[0].model_max_length == 77
    assert prior_pair[1].pad_id == prior_pair[0].pad_token_id
    assert decoder_pair[1].pad_id == decoder_pair[0].pad_token_id


@pytest.mark.parametrize("case", sorted(PROMPTS))
@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_matches_transformers(case, which, prior_pair, decoder_pair):
    reference, ours = prior_pair if which == "prior" else decoder_pair
    call = _prior_reference if which == "prior" else _decoder_reference
    prompts = PROMPTS[case]
    ref_ids, ref_mask = call(reference, prompts)
    ids, mask = ours.encode(prompts)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(prompts), 77)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_truncation_keeps_end_of_sequence(which, prior_pair, decoder_pair):
    reference, ours = prior_pair if which == "prior" else decoder_pair
    ids, mask = ours.encode(PROMPTS["long"])
    assert mask.sum() == 77  # really truncated: no padding left
    assert ids[0, 0] == reference.bos_token_id and ids[0, -1] == reference.eos_token_id
    ids, mask = ours.encode([""])
    assert mask.sum() == 2 and list(ids[0, :2]) == [reference.bos_token_id, reference.eos_token_id]
    assert (ids[0, 2:] == ours.pad_id).all()


def test_single_string_is_a_batch_of_one(decoder_pair):
    _, ours = decoder_pair
    ids, _ = ours.encode("horse")
    np.testing.assert_array_equal(ids, ours.encode(["horse"])[0])


def test_settings_stored_in_tokenizer_json_are_ignored(checkpoint_dir, decoder_pair, tmp_path):
    """A tokenizer.json carrying its own padding/truncation (other lengths, other pad) gives the same ids."""
    from tokenizers import Tokenizer

    reference, _ = decoder_pair
    stored = Tokenizer.from_file(str(checkpoint_dir / "decoder" / "tokenizer" / "tokenizer.json"))
    stored.enable_truncation(max_length=5, direction="left")
    stored.enable_padding(length=9, direction="left", pad_id=0, pad_token="<s>")
    stored.save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["padding"] is not None
    ours = TextTokenizer(tmp_path / "tokenizer.json", max_length=77, pad_token=reference.pad_token)
    prompts = PROMPTS["several"] + PROMPTS["long"]
    ref_ids, ref_mask = _decoder_reference(reference, prompts)
    ids, mask = ours.encode(prompts)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_from_manifest_entry(checkpoint_dir, prior_pair):
    reference, ours = prior_pair
    entry = {"file": "prior/tokenizer/tokenizer.json", "max_length": 77, "pad_id": reference.pad_token_id}
    loaded = TextTokenizer.from_manifest_entry(entry, checkpoint_dir)
    assert loaded.pad_token == ours.pad_token
    np.testing.assert_array_equal(loaded.encode(PROMPTS["several"])[0], ours.encode(PROMPTS["several"])[0])
    with pytest.raises(TokenizerFileError, match="pad_id"):
        TextTokenizer.from_manifest_entry({"file": entry["file"]}, checkpoint_dir)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextTokenizer(missing, pad_token="<pad>")
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTokenizer.from_folder(tmp_path / "nope")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=str(corrupt)):
        TextTokenizer(corrupt, pad_token="<pad>")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        TextTokenizer.from_folder(tmp_path)


def test_bad_settings(checkpoint_dir, decoder_pair):
    path = checkpoint_dir / "decoder" / "tokenizer" / "tokenizer.json"
    with pytest.raises(TokenizerFileError, match="not-a-token"):
        TextTokenizer(path, pad_token="not-a-token")
    with pytest.raises(ValueError, match="pad_id"):
        TextTokenizer(path, pad_token=decoder_pair[0].pad_token, pad_id=decoder_pair[0].pad_token_id + 1)
    with pytest.raises(ValueError, match="neither"):
        TextTokenizer(path)
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer(path, max_length=0, pad_token=decoder_pair[0].pad_token)


def test_bad_prompts(decoder_pair):
    _, ours = decoder_pair
    with pytest.raises(TypeError, match="non-empty list"):
        ours.encode([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        ours.encode(["ok", 3])


def test_serialised_transformers_backend_is_what_to_ship(checkpoint_dir, tmp_path):
    """transformers 5 rebuilds XLMRobertaTokenizer's pre-tokenizer from its class, ignoring the one in
    tokenizer.json. A hub file with the older pipeline (Replace normaliser + Metaspace only) then
    tokenizes extra whitespace differently from transformers when read as-is; the serialised
    ``backend_tokenizer`` of the loaded transformers tokenizer matches. Export must ship the latter.
    """
    from transformers import AutoTokenizer

    source = checkpoint_dir / "decoder" / "tokenizer"
    folder = tmp_path / "old_style"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")

    reference = AutoTokenizer.from_pretrained(folder)
    prompts = PROMPTS["whitespace_casing"]
    ref_ids, _ = _decoder_reference(reference, prompts)
    raw_ids, _ = TextTokenizer.from_folder(folder).encode(prompts)
    assert not np.array_equal(raw_ids, ref_ids)  # the hazard is real
    (tmp_path / "backend.json").write_text(reference.backend_tokenizer.to_str(), encoding="utf-8")
    shipped = TextTokenizer(tmp_path / "backend.json", pad_token=reference.pad_token)
    np.testing.assert_array_equal(shipped.encode(prompts)[0], ref_ids)
