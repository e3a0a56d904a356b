"""Build the two Kandinsky 2.1 tokenizers locally: no hub, no downloads, deterministic.

The real checkpoints ship an OpenAI CLIP BPE tokenizer (prior) and the XLM-RoBERTa sentencepiece
tokenizer (decoders). Neither can be downloaded here, so tiny look-alikes are trained on a small
corpus generated from the word lists below, then saved through transformers' own classes so the
folders have the hub's layout and load with ``from_pretrained`` / ``AutoTokenizer`` offline:

* CLIP: byte-level BPE with the ``</w>`` end-of-word suffix, trained with ``tokenizers``. The
  vocabulary is ordered as OpenAI's: 256 byte symbols, the same 256 with ``</w>``, the merges in
  order, then ``<|startoftext|>`` and ``<|endoftext|>`` (so end-of-text has the largest id, which
  CLIP's argmax pooling relies on). ``vocab.json``/``merges.txt``/``special_tokens_map.json`` are
  written beside ``tokenizer.json``/``tokenizer_config.json`` as in the hub folder.
* XLM-R: a sentencepiece unigram model trained with ``sentencepiece``; the transformers vocabulary
  is fairseq's (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, pieces shifted by one, ``<mask>``
  last), and ``sentencepiece.bpe.model`` is kept in the folder as on the hub.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, XLMRobertaTokenizer

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 1000
XLMR_VOCAB_SIZE = 900  # sentencepiece pieces + <pad> + <mask>; the corpus supports ~970
CLIP_MAX_LENGTH = 77
XLMR_MAX_LENGTH = 512  # xlm-roberta-large's model_max_length; the pipelines pass max_length=77 anyway
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
SPM_FILE = "sentencepiece.bpe.model"
_CORPUS_SENTENCES = 600
_FOREIGN_SENTENCES = 12  # per language

_ADJECTIVES = (
    "red blue green yellow purple orange golden silver black white pink tiny huge ancient modern "
    "futuristic cozy quiet busy foggy sunny rainy snowy glowing shiny rusty wooden glass marble "
    "happy sad sleepy curious brave fluffy wild calm stormy dreamy colorful dark bright beautiful "
    "mysterious magical detailed realistic abstract surreal minimalist vintage elegant"
).split()
_NOUNS = (
    "cat dog horse fox owl rabbit dragon robot astronaut knight princess wizard castle lighthouse "
    "tree flower mountain river lake ocean island forest city street bridge tower house cottage "
    "village garden window door boat ship train car bicycle balloon clock book lamp teapot cup "
    "apple cake sunflower rose butterfly whale elephant tiger lion bear penguin squirrel frog "
    "portrait landscape skyline cathedral temple market festival"
).split()
_SETTINGS = (
    "in a misty forest", "on the moon", "under the sea", "at sunset", "at night", "in the rain",
    "on a snowy hill", "in a busy market", "near a waterfall", "in outer space", "on a sandy beach",
    "in a cyberpunk city", "inside a cozy library", "above the clouds", "in a flower field",
    "by the old harbor", "in the desert", "on a frozen lake", "in an enchanted garden",
)
_STYLES = (
    "oil painting", "watercolor", "digital art", "photograph", "4k photo", "8k render",
    "pencil sketch", "studio lighting", "trending on artstation", "by a famous artist",
    "cinematic lighting", "concept art", "pixel art", "ukiyo-e print", "3d render", "anime style",
    "highly detailed", "soft focus", "1920s poster", "low poly",
)
_VERBS = (
    "sleeping running flying swimming dancing reading singing walking jumping climbing watching "
    "eating drinking playing fishing sailing skating cooking writing smiling laughing dreaming "
    "floating glowing melting blooming hiding waiting exploring"
).split()
_MORE_NOUNS = (
    "crystal feather mirror candle lantern umbrella chimney meadow canyon glacier volcano jungle "
    "orchard vineyard palace pyramid windmill carousel telescope violin piano guitar strawberry "
    "pineapple mushroom cactus bamboo pumpkin peacock flamingo dolphin octopus jellyfish hedgehog "
    "raccoon koala panda giraffe zebra kangaroo parrot hummingbird seahorse unicorn phoenix "
    "spaceship submarine helicopter motorcycle skyscraper greenhouse waterfall rainbow thunderstorm "
    "aurora nebula galaxy comet meteor satellite compass treasure pirate samurai ninja viking "
    "mermaid goblin fairy giant scarecrow snowman gingerbread cupcake croissant pancake lemonade"
).split()
# One line of everyday words per language; sentences are random runs of them. Word order does not
# matter for tokenizer training: the point is that every script yields characters and pieces.
_FOREIGN_WORDS = (
    "Katze Hund Haus Baum Wald Fluss Berg Himmel Sonne Mond rot blau grün alt schön klein groß",
    "chat chien maison arbre forêt rivière montagne ciel soleil lune rouge bleu vert vieux belle",
    "gato perro casa árbol bosque río montaña cielo sol luna rojo azul verde viejo hermosa",
    "gatto cane casa albero bosco fiume montagna cielo sole luna rosso blu verde vecchio bella",
    "gato cão casa árvore floresta rio montanha céu sol lua vermelho azul verde velho bonita",
    "кошка собака дом дерево лес река гора небо солнце луна красный синий зелёный старый",
    "γάτα σκύλος σπίτι δέντρο δάσος ποτάμι βουνό ουρανός ήλιος φεγγάρι κόκκινο μπλε πράσινο",
    "قطة كلب بيت شجرة غابة نهر جبل سماء شمس قمر أحمر أزرق أخضر قديم جميل",
    "बिल्ली कुत्ता घर पेड़ जंगल नदी पहाड़ आसमान सूरज चाँद लाल नीला हरा पुराना सुंदर",
    "猫 犬 家 木 森 川 山 空 太陽 月 赤い 青い 緑 古い 美しい 小さい 大きい",
    "猫 狗 房子 树 森林 河流 山 天空 太阳 月亮 红色 蓝色 绿色 古老 美丽 小 大",
    "고양이 개 집 나무 숲 강 산 하늘 태양 달 빨간 파란 초록 오래된 아름다운",
    "kedi köpek ev ağaç orman nehir dağ gökyüzü güneş ay kırmızı mavi yeşil eski güzel",
    "kot pies dom drzewo las rzeka góra niebo słońce księżyc czerwony niebieski zielony stary",
    "mèo chó nhà cây rừng sông núi bầu trời mặt trời mặt trăng đỏ xanh cũ đẹp",
    "แมว สุนัข บ้าน ต้นไม้ ป่า แม่น้ำ ภูเขา ท้องฟ้า ดวงอาทิตย์ ดวงจันทร์ สีแดง สีฟ้า",
    "חתול כלב בית עץ יער נהר הר שמיים שמש ירח אדום כחול ירוק ישן יפה",
    "kat hond huis boom bos rivier berg hemel zon maan rood blauw groen oud mooi",
    "katt hund hus träd skog flod berg himmel sol måne röd blå grön gammal vacker",
    "кіт собака будинок дерево ліс річка гора небо сонце місяць червоний синій зелений",
    "კატა ძაღლი სახლი ხე ტყე მდინარე მთა ცა მზე მთვარე წითელი ლურჯი მწვანე",
    "կատու շուն տուն ծառ անտառ գետ լեռ երկինք արև լուսին կարմիր կապույտ կանաչ",
    "kucing anjing rumah pohon hutan sungai gunung langit matahari bulan merah biru hijau",
)
_MULTILINGUAL = (
    "ein rotes Haus im Wald bei Sonnenuntergang", "une maison ancienne près de la rivière",
    "un perro pequeño corre en la playa", "кошка сидит на крыше старого дома",
    "屋根の上に座っている猫", "一只可爱的小狗在花园里", "ένα πλοίο στη θάλασσα",
    "قطة صغيرة تجلس على النافذة", "बारिश में एक लाल घर", "바닷가의 작은 등대",
)


def training_corpus(seed: int = 0) -> list[str]:
    """A few hundred prompt-like English sentences plus the multilingual ones, deterministic."""
    rng = random.Random(seed)
    nouns, sentences = _NOUNS + _MORE_NOUNS, []
    for _ in range(_CORPUS_SENTENCES):
        sentence = f"a {rng.choice(_ADJECTIVES)} {rng.choice(nouns)} {rng.choice(_VERBS)} {rng.choice(_SETTINGS)}"
        if rng.random() < 0.7:
            sentence += f", {rng.choice(_STYLES)}"
        if rng.random() < 0.3:
            sentence = sentence.capitalize() + "."
        sentences.append(sentence)
    for line in _FOREIGN_WORDS:
        words = line.split()
        sentences.extend(" ".join(rng.sample(words, 5)) for _ in range(_FOREIGN_SENTENCES))
    sentences.extend(_MULTILINGUAL)
    return sentences


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in OpenAI's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = list(printable), list(printable)
    for b in range(256):  # the remaining bytes map past U+00FF, in byte order
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + len(code_points) - len(printable))
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _train_clip_merges(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """BPE merges over the exact normalizer/pre-tokenizer of transformers' CLIPTokenizer.

    A plain Python trainer rather than ``tokenizers.trainers.BpeTrainer``: the latter breaks ties
    between equally frequent pairs in hash-map order, so two runs gave different vocabularies.
    Here the most frequent pair wins and ties go to the smallest pair, so a seed fixes the files.
    """
    from transformers import CLIPTokenizer

    template = CLIPTokenizer().backend_tokenizer  # the pipeline normalizer + pre-tokenizer, not restated
    counts: Counter[str] = Counter()
    for text in corpus:
        for piece, _ in template.pre_tokenizer.pre_tokenize_str(template.normalizer.normalize_str(text)):
            counts[piece] += 1
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    known = {s for w in words for s in w}
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                if pair[0] + pair[1] not in known:  # one merge per token keeps the vocabulary distinct
                    pairs[pair] += count
        if not pairs:
            raise RuntimeError(f"CLIP BPE training: expected {n_merges} merges, the corpus gave {len(merges)}")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        known.add(best[0] + best[1])
        words = {_merge_pair(symbols, best): c for symbols, c in words.items()}
    return merges


def train_clip_tokenizer(seed: int = 0) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (max length 77, pad = ``<|endoftext|>``) with :data:`CLIP_VOCAB_SIZE` tokens."""
    from transformers import CLIPTokenizer

    byte_symbols = list(_bytes_to_unicode().values())
    base = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = _train_clip_merges(training_corpus(seed), CLIP_VOCAB_SIZE - len(base) - 2)
    tokens = base + ["".join(pair) for pair in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    if len(vocab) != len(tokens):
        raise RuntimeError(f"CLIP vocabulary: expected {len(tokens)} distinct tokens, found {len(vocab)}")
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH,
        bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS, pad_token=CLIP_EOS,
    )


def write_clip_tokenizer(folder: Path, seed: int = 0) -> CLIPTokenizer:
    """Train and save the CLIP tokenizer into ``folder`` (hub layout); return the tokenizer."""
    tokenizer = train_clip_tokenizer(seed)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_special_tokens_map(folder, tokenizer)
    return tokenizer


def train_sentencepiece_model(seed: int = 0) -> bytes:
    """A sentencepiece unigram model proto (``<unk>``=0, ``<s>``=1, ``</s>``=2 as XLM-R's)."""
    import io

    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus(seed)), model_writer=buffer,
        model_type="unigram", vocab_size=XLMR_VOCAB_SIZE - 2, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    return buffer.getvalue()


def xlmr_tokenizer_from_spm(spm_model: bytes) -> XLMRobertaTokenizer:
    """transformers' ``XLMRobertaTokenizer`` over a sentencepiece model, with fairseq's id layout.

    Mirrors transformers' XLM-R slow->fast conversion: ``<s> <pad> </s> <unk>``, then the pieces
    after sentencepiece's own three control pieces, then ``<mask>``; the normalizer is the model's
    precompiled character map.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import XLMRobertaTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = specials + [(p.piece, p.score) for p in proto.pieces[3:]] + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(
        vocab=vocab, _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        model_max_length=XLMR_MAX_LENGTH,
    )


def write_xlmr_tokenizer(folder: Path, seed: int = 0) -> XLMRobertaTokenizer:
    """Train and save the XLM-R tokenizer into ``folder`` (hub layout); return the tokenizer."""
    spm_model = train_sentencepiece_model(seed)
    tokenizer = xlmr_tokenizer_from_spm(spm_model)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    (folder / SPM_FILE).write_bytes(spm_model)
    _write_special_tokens_map(folder, tokenizer)
    return tokenizer


def _write_special_tokens_map(folder: Path, tokenizer: CLIPTokenizer | XLMRobertaTokenizer) -> None:
    """transformers 5 no longer writes this file; the hub folders (and older readers) have it."""
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    special = {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None) is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
