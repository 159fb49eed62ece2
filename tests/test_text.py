import io
import json
import lzma
import pickle
import random
import tarfile

import pytest
from conftest import shared_data

from data_pipelines.literature import LiteratureIndex, mat_entities, parse_conll, repair_mojibake
from data_pipelines.recipes import RecipeIndex
from mmmat.data.schema import TextItem
from mmmat.data.text import (
    MAX_TEXT_CHARS,
    clip_text,
    describe_structure,
    find_formulas,
    formula_key,
    render_recipe,
)

# ---------------------------------------------------------------------------------------------- fixtures


def _reaction(target, precursors, mp_id=None, temp=900.0, temp_units="C", time=12.0, time_units="h",
              atmosphere=("air",), doi="10.1000/x", media=("ethanol",), synthesis_type=None):
    r = {
        "doi": doi,
        "targets_string": [target],
        "reaction_string": f"{' + '.join(precursors)} == {target}",
        "target": {"material_string": target, "material_formula": target, "mp_id": mp_id,
                   "composition": [{"formula": target, "elements": {}, "amount": "1"}]},
        "precursors": [{"material_formula": p, "material_string": p} for p in precursors],
        "operations": [
            {"type": "Mixing", "token": "ball-milled",
             "conditions": {"heating_temperature": [], "heating_time": [], "heating_atmosphere": [],
                            "mixing_media": list(media), "mixing_device": ["zirconia"]}},
            {"type": "HeatingOperation", "token": "calcined",
             "conditions": {"heating_temperature": [{"values": [temp], "units": temp_units,
                                                     "min_value": temp, "max_value": temp}],
                            "heating_time": [{"values": [time], "units": time_units}],
                            "heating_atmosphere": list(atmosphere), "mixing_media": [], "mixing_device": []}},
        ],
    }
    if synthesis_type:
        r["synthesis_type"] = synthesis_type
    return r


def _write_xz_json(path, reactions):
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        json.dump({"release_date": "test", "reactions": reactions}, fh)


# ---------------------------------------------------------------------------------------------- render_recipe


def test_render_recipe_contains_every_condition():
    text = render_recipe(_reaction("LiCoO2", ["Li2CO3", "Co3O4"], mp_id="mp-22526"))
    assert text.startswith("Target: LiCoO2.")
    assert "Precursors: Li2CO3, Co3O4." in text
    assert "Reaction: Li2CO3 + Co3O4 == LiCoO2." in text
    assert "900 °C" in text and "12 h" in text and "in air" in text
    assert "ethanol" in text and "zirconia" in text and "calcined" in text
    assert "Steps: 1. mixing" in text and "2. heating" in text


def test_render_recipe_units():
    text = render_recipe(_reaction("YMnO3", ["Y2O3", "Mn2O3"], temp=1173, temp_units="K", time=30,
                                   time_units="min", synthesis_type="sol-gel"))
    assert "1173 K" in text and "°C" not in text
    assert "0.5 h" in text and "min" not in text
    assert "Synthesis: sol-gel." in text
    text = render_recipe(_reaction("YMnO3", ["Y2O3"], temp=700, temp_units="°C", time=2, time_units="days"))
    assert "700 °C" in text and "48 h" in text
    # a range with no listed values
    r = _reaction("YMnO3", ["Y2O3"])
    r["operations"][1]["conditions"]["heating_temperature"] = [{"values": [], "units": "°C",
                                                                 "min_value": 70.0, "max_value": 80.0}]
    assert "70–80 °C" in render_recipe(r)


def test_render_recipe_missing_conditions_omitted():
    r = _reaction("LiCoO2", ["Li2CO3"])
    r["operations"][1]["conditions"] = {"heating_temperature": None, "heating_time": [], "heating_atmosphere": None,
                                        "mixing_media": None, "mixing_device": None}
    text = render_recipe(r)
    assert "heating (calcined)." in text
    assert " at " not in text.split("heating")[1] and " for " not in text.split("heating")[1]


@pytest.mark.parametrize(
    "reaction",
    [
        {},
        {"target": None, "precursors": None, "operations": None, "reaction_string": None},
        {"target": "LiCoO2", "precursors": "Li2CO3", "operations": "heated"},
        {"target": {"material_formula": None, "material_string": ""}, "targets_string": [None, "ZnO"]},
        {"operations": [None, 3, "mixed", {"type": None, "token": None, "conditions": "hot"},
                        {"type": "HeatingOperation", "conditions": {
                            "heating_temperature": [{"values": ["about 900", None, "1000"], "units": None},
                                                    None, "800", {"values": None, "min_value": "x"}],
                            "heating_time": [{"values": [float("nan"), 5], "units": "fortnights"}, 7],
                            "heating_atmosphere": [None, 5, ["air"]], "mixing_media": {"a": 1},
                            "mixing_device": 42}}]},
        {"precursors": [{"material_formula": {"nested": True}}, None, 7], "synthesis_type": ["x"]},
        {"reaction_string": 5, "doi": None, "operations": [{"type": "Mixing", "conditions": []}]},
    ],
)
def test_render_recipe_never_raises(reaction):
    text = render_recipe(reaction)
    assert isinstance(text, str)


def test_render_recipe_odd_values_kept_where_meaningful():
    r = {"target": {"material_formula": "ZnO"}, "operations": [{"type": "HeatingOperation", "conditions": {
        "heating_temperature": [{"values": ["1000"], "units": "C"}], "heating_time": [{"values": ["3"]}]}}]}
    text = render_recipe(r)
    assert "1000 °C" in text and "for 3 h" in text
    assert render_recipe("not a dict") == ""  # type: ignore[arg-type]


def test_render_recipe_random_json_never_raises():
    rng = random.Random(0)
    atoms = [None, 0, 1.5, -3, "", "x", "900", True, [], {}, float("inf")]

    def value(depth):
        k = rng.random()
        if depth > 3 or k < 0.4:
            return rng.choice(atoms)
        if k < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        keys = ["values", "units", "min_value", "max_value", "type", "token", "conditions", "heating_temperature",
                "heating_time", "heating_atmosphere", "mixing_media", "mixing_device", "material_formula"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}

    base = _reaction("LiCoO2", ["Li2CO3"])
    for _ in range(300):
        r = json.loads(json.dumps(base))
        for key in rng.sample(sorted(r), 3):
            r[key] = value(0)
        op = r["operations"][1] if isinstance(r.get("operations"), list) and len(r["operations"]) > 1 else None
        if isinstance(op, dict) and isinstance(op.get("conditions"), dict):
            op["conditions"][rng.choice(sorted(op["conditions"]))] = value(1)
        assert isinstance(render_recipe(r), str)


# ---------------------------------------------------------------------------------------------- clip_text


def test_clip_text_long():
    words = ("lorem ipsum dolor sit amet " * 5000)[:100_000]
    assert len(words) == 100_000
    out, truncated = clip_text(words)
    assert truncated and len(out) <= MAX_TEXT_CHARS
    assert words.startswith(out) and words[len(out)] == " "  # cut at a word boundary
    assert len(out) > MAX_TEXT_CHARS - 10
    same, truncated = clip_text("short text")
    assert same == "short text" and not truncated
    hard, truncated = clip_text("x" * 100_000, 100)  # one huge word: hard cut
    assert truncated and hard == "x" * 100


# ---------------------------------------------------------------------------------------------- formulas


def test_formula_key():
    assert formula_key("O2Si") == "SiO2"
    assert formula_key("TiO2") == "TiO2"
    assert formula_key("Fe2O3") == formula_key("O3Fe2") == "Fe2O3"
    assert formula_key("La0.8Sr0.2MnO3") == formula_key("Sr0.2La0.8MnO3") is not None
    assert formula_key("CO") == "CO"  # pymatgen's reading: carbon monoxide
    assert formula_key("Co") == "Co"
    for bad in ["", "O", "co", "silica", "lithium niobate", "AZrO3", "Xx", "NiZn ferrite", "Fe2O3-δ", None, 5,
                ["TiO2"], {"a": 1}]:
        assert formula_key(bad) is None, bad


def test_find_formulas_tricky():
    assert find_formulas("In the TiO2 film") == {"TiO2"}
    assert find_formulas("La0.8Sr0.2MnO3") == {formula_key("La0.8Sr0.2MnO3")}
    assert find_formulas("CO2 and H2O") == {"CO2", "H2O"}
    assert find_formulas("As shown") == set()
    assert find_formulas("I think He said No to In and As.") == set()
    assert find_formulas("LiFePO4 cathodes, (Bi0.5Na0.5)TiO3 and Ni(OH)2.") == {
        "LiFePO4", formula_key("(Bi0.5Na0.5)TiO3"), "Ni(HO)2"}
    # acronyms and ions are not materials; O2 gas is
    assert find_formulas("SOFC with NIR emission of Eu2+ and Ni-YSZ in O2 at 800 °C") == {"O2"}
    assert find_formulas("") == set()
    assert find_formulas("SOFCs (SOFCs) and PCFCs with SCN20 and LSCF6428 cathodes, see Figure S1 and P25") == set()
    assert find_formulas("the SrCo1−xNbxO3−δ system and La0.6Sr0.4Co0.2Fe0.8O3−δ cathodes, O2− ions") == {
        formula_key("La0.6Sr0.4Co0.2Fe0.8O3")}
    assert find_formulas("the Ba0.5Sr0.5(Co0.8–xFe0.2)O3−δ phase") == set()
    assert find_formulas("CH4, HNO3, C60 and Cl2") == {formula_key("CH4"), "HNO3", "C", "Cl2"}


# ---------------------------------------------------------------------------------------------- describe_structure


def test_describe_structure(nacl):
    text = describe_structure(nacl)
    assert text.startswith("NaCl")
    for part in ["Fm-3m", "No. 225", "cubic", "a = 5.640 Å", "α = 90.0°", "8 atoms", "g/cm³",
                 "2.82 Å", "coordination number 6.0"]:
        assert part in text, part


def test_describe_structure_without_symmetry(monkeypatch, gan):
    import pymatgen.symmetry.analyzer as analyzer

    def boom(*args, **kwargs):
        raise RuntimeError("spglib failed")

    monkeypatch.setattr(analyzer, "SpacegroupAnalyzer", boom)
    text = describe_structure(gan)
    assert "space group not determined" in text and "GaN" in text and "4 atoms" in text


# ---------------------------------------------------------------------------------------------- RecipeIndex


@pytest.fixture
def recipe_root(tmp_path):
    root = tmp_path / "synthesis_textmined"
    root.mkdir()
    solid = [
        _reaction("LiCoO2", ["Li2CO3", "Co3O4"], mp_id="mp-22526", doi="10.1/a"),
        _reaction("BaTiO3", ["BaCO3", "TiO2"], mp_id=None, doi="10.1/b", temp=1200),
        _reaction("O3TiBa", ["BaCO3", "TiO2"], mp_id="mp-5986", doi="10.1/c", temp=1300),  # other polymorph
    ]
    sol = [_reaction("BaTiO3", ["Ba(CH3COO)2", "Ti(OC4H9)4"], doi="10.1/d", synthesis_type="sol-gel"),
           _reaction("BaTiO3", ["Ba(CH3COO)2", "Ti(OC4H9)4"], doi="10.1/e", synthesis_type="sol-gel"),
           {"target": {"material_formula": "lithium niobate"}, "doi": "10.1/f"},
           {"target": {"material_formula": ["LiNbO3"], "mp_id": 5, "composition": "LiNbO3"}}, None]
    _write_xz_json(root / "solid-state_dataset_2019-12-03.json.xz", solid)
    _write_xz_json(root / "sol-gel_dataset_20200713.json.xz", sol)
    return root


def test_recipe_index_lookup(recipe_root):
    index = RecipeIndex.from_root(recipe_root)
    by_id = index.lookup("mp-22526", "LiCoO2")
    assert len(by_id) == 1 and isinstance(by_id[0], TextItem)
    assert by_id[0].source == "synthesis_textmined/solid-state" and by_id[0].ref == "10.1/a"
    assert not by_id[0].generated and "LiCoO2" in by_id[0].text and "900 °C" in by_id[0].text
    # by formula (another spelling); the recipe linked to a different mp_id is left out, the two identical
    # sol-gel texts appear once
    by_formula = index.lookup("mp-2998", "TiBaO3")
    assert [t.ref for t in by_formula] == ["10.1/d", "10.1/b"]
    assert by_formula[0].source == "synthesis_textmined/sol-gel"
    assert "1300 °C" not in " ".join(t.text for t in by_formula)
    # without an mp_id every formula match counts
    assert len(index.lookup(None, "BaTiO3")) == 3
    assert index.lookup("mp-5986", "BaTiO3")[0].ref == "10.1/c"
    assert index.lookup(None, "BaTiO3", max_items=1)[0].ref == "10.1/d"
    assert index.lookup("mp-1", "ZnO") == [] and index.lookup(None, None) == []
    # fresh objects: callers may edit them
    by_id[0].text = "changed"
    assert index.lookup("mp-22526", None)[0].text != "changed"
    st = index.stats()
    assert st["reactions_read"] == 8 and st["rendered"] == 5 and st["skipped_total"] == 3
    assert st["skipped"] == {"target has no mp_id and no parsable formula": 2, "not a JSON object": 1}
    assert st["mp_ids_indexed"] == 2 and st["formulas_indexed"] == 2
    assert st["unique_texts"] == 4


def test_recipe_index_pickle_and_subset(recipe_root):
    files = sorted(recipe_root.glob("*.json.xz"))
    index = RecipeIndex.from_files(files)
    clone = pickle.loads(pickle.dumps(index))
    for mp, f in [("mp-22526", "LiCoO2"), (None, "BaTiO3"), ("mp-2998", "BaTiO3")]:
        assert clone.lookup(mp, f) == index.lookup(mp, f)
    small = index.subset(mp_ids=["mp-22526"], formulas=[])
    assert small.lookup("mp-22526", None) == index.lookup("mp-22526", None)
    assert small.lookup(None, "BaTiO3") == [] and len(small) == 1


def test_recipe_index_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        RecipeIndex.from_root(tmp_path)


# ---------------------------------------------------------------------------------------------- LiteratureIndex

CONLL = """\
the O
NiZn B-MAT
ferrite I-MAT
/ O
O2Si B-MAT
nanocomposite B-DSC
. O


films O
of O
MPam 1/2  O
TiO2 B-MAT
at O
<nUm> O
C \n. O

"""


def _write_literature(root):
    (root / "matscholar_ner").mkdir()
    (root / "matscholar_ner" / "train.txt.xz").write_bytes(lzma.compress(CONLL.encode()))
    (root / "glass_abstracts_matscibert").mkdir()
    csv_text = ('Abstract,Label\n"Borosilicate glass with B2O3 and SiO2, 270Â nm films.",1\n'
                '"Thin TiO2 layers in the SOFC were studied, as shown here.",0\n')
    (root / "glass_abstracts_matscibert" / "train.csv.xz").write_bytes(lzma.compress(csv_text.encode()))
    (root / "sofc_exp_corpus").mkdir()
    doc = ("Title block of a paper about LSCF cathodes by many authors " * 20 + "with La0.6Sr0.4CoO3.\n"
           "The anode was Ni and the electrolyte was Gd0.1Ce0.9O1.95 at 600 °C.\n"
           "No formula here.\n")
    lines = doc.split("\n")
    pos, rows = 0, []
    for i, ln in enumerate(lines[:3], 1):
        rows.append(f"{i}\t0\t{pos}\t{pos + len(ln)}")
        pos += len(ln) + 1
    with tarfile.open(root / "sofc_exp_corpus" / "sofc-exp-corpus.tar.xz", "w:xz") as tar:
        for name, data in [("sofc-exp-corpus/texts/00_PMC1.txt", doc.encode()),
                           ("sofc-exp-corpus/annotations/sentences/PMC1.csv", "\n".join(rows).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_conll_parsing():
    sentences = parse_conll(CONLL)
    assert len(sentences) == 2
    assert ("MPam 1/2", "O") in sentences[1] and ("C", "O") in sentences[1]
    assert mat_entities(sentences[0]) == [["NiZn", "ferrite"], ["O2Si"]]


def test_literature_index(tmp_path):
    _write_literature(tmp_path)
    index = LiteratureIndex.from_root(tmp_path)
    sio2 = index.lookup("SiO2")
    assert [t.source for t in sio2] == ["matscholar_ner", "glass_abstracts"]
    assert sio2[0].text == "the NiZn ferrite / O2Si nanocomposite." and sio2[0].ref == "train/0"
    assert "270 nm" in sio2[1].text and sio2[1].ref == "train/0" and not sio2[1].generated
    assert index.lookup("ZnNi")[0].ref == "train/0"  # formula from a MAT span token
    tio2 = index.lookup("O2Ti")
    assert [t.source for t in tio2] == ["matscholar_ner", "glass_abstracts"]
    assert tio2[0].text.startswith("films of MPam 1/2 TiO2")
    gdc = index.lookup("Gd0.1Ce0.9O1.95")
    assert len(gdc) == 1 and gdc[0].source == "sofc_exp_corpus" and gdc[0].ref == "PMC1/2"
    assert index.lookup("La0.6Sr0.4CoO3") == []  # only in an over-long title block
    assert index.lookup("B2O3", max_items=0) == [] and index.lookup("ZnO") == [] and index.lookup(None) == []
    assert pickle.loads(pickle.dumps(index)).lookup("SiO2") == sio2
    st = index.stats()
    assert st["sources"]["matscholar_ner"]["texts_read"] == 2
    assert st["sources"]["glass_abstracts"]["texts_with_formulas"] == 2
    assert st["sources"]["sofc_exp_corpus"]["skipped_long"] == 1
    assert st["missing"] == []


def test_literature_index_partial_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        LiteratureIndex.from_root(tmp_path)
    (tmp_path / "matscholar_ner").mkdir()
    (tmp_path / "matscholar_ner" / "dev.txt").write_text(CONLL)
    index = LiteratureIndex.from_root(tmp_path)
    assert index.lookup("TiO2")[0].ref == "dev/1"
    assert set(index.stats()["missing"]) == {"glass_abstracts_matscibert", "sofc_exp_corpus"}


def test_repair_mojibake():
    assert repair_mojibake("2.0Â Î¼m at 25 Â°C, 3.20â\x80\x933.23 eV") == "2.0 μm at 25 °C, 3.20–3.23 eV"
    assert repair_mojibake("café, naïve, 10 °C") == "café, naïve, 10 °C"


# ---------------------------------------------------------------------------------------------- integration


@pytest.mark.slow
def test_indexes_on_shared_data():
    import pandas as pd

    root = shared_data()
    mp20 = shared_data("mp_20")
    files = ["REASSEMBLED_test_partial.csv.xz", "REASSEMBLED_val_partial.csv.xz",
             "slices_raw_mp20_dataset_mini_train.csv.xz"]
    df = pd.concat([pd.read_csv(mp20 / f, usecols=["material_id", "pretty_formula"]) for f in files])
    df = df.drop_duplicates("material_id")
    recipes = RecipeIndex.from_root(shared_data("synthesis_textmined"))
    st = recipes.stats()
    assert st["reactions_read"] == 30_031 + 9_518
    linked = [m for m in df.material_id if recipes.has_mp_id(m)]
    assert 300 <= len(linked) <= 500  # the data README: 370 MP-20 materials link by mp_id
    with_text = sum(1 for m, f in zip(df.material_id, df.pretty_formula) if recipes.lookup(m, f))
    assert with_text > len(linked)
    literature = LiteratureIndex.from_root(root)
    formulas = set(df.pretty_formula)
    covered = [f for f in formulas if literature.lookup(f)]
    assert len(covered) >= 200
    assert all(t.source in {"matscholar_ner", "glass_abstracts", "sofc_exp_corpus"}
               for t in literature.lookup("SiO2"))
