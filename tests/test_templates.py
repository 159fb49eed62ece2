import pytest
from pymatgen.core import Lattice, Structure

from mmmat.generative.templates import TemplateLibrary, consensus_rank, group_candidates


def rocksalt(a: str, b: str, lat: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl(a: str, b: str, lat: float) -> Structure:
    return Structure(Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def library():
    structs = [rocksalt("Na", "Cl", 5.64), rocksalt("K", "Cl", 6.29), rocksalt("Li", "F", 4.03),
               cscl("Cs", "Cl", 4.12), rocksalt("Mg", "O", 4.21).get_primitive_structure()]
    return TemplateLibrary(structs, ["nacl", "kcl", "lif", "cscl", "mgo_prim"], [0.0, 0.0, 0.0, 0.0, 0.0])


def test_candidates_rank_alike_elements_first_and_keep_the_composition(library):
    cands = library.candidates("Na4Br4", k=5)  # 8 atoms: the conventional rock-salt cells only
    assert [c.template_id for c in cands][0] == "nacl"  # Na stays Na, Br is most like Cl
    assert {c.template_id for c in cands} == {"nacl", "kcl", "lif"}
    for c in cands:
        assert c.structure.composition.reduced_formula == "NaBr" and len(c.structure) == 8
    assert [c.cost for c in cands] == sorted(c.cost for c in cands)
    # leave-one-out: the excluded template is skipped, and counted out
    assert "nacl" not in [c.template_id for c in library.candidates("Na4Br4", k=5, exclude=["nacl"])]
    assert library.count("Na4Br4") == 3 and library.count("Na4Br4", exclude=["nacl"]) == 2
    assert library.candidates("Na3Br", k=5) == []  # no template with that formula type


def test_group_candidates_joins_the_same_structure_type():
    a = rocksalt("Na", "Br", 5.9)
    b = rocksalt("Na", "Br", 6.1)  # the same structure, 3 % larger
    c = cscl("Na", "Br", 3.6)  # another structure type
    assert group_candidates([a, c, b]) == [0, 1, 0]


def test_consensus_rank_goes_from_cost_order_to_a_vote():
    costs, groups = [0.0, 0.1, 0.2, 0.3], [0, 1, 1, 1]
    assert consensus_rank(costs, groups, 0.0) == [0, 1, 2, 3]  # the substitution baseline
    assert consensus_rank(costs, groups, 0.01) == [0, 1, 2, 3]  # the lone cheapest still outweighs the rest
    assert consensus_rank(costs, groups, 1.0) == [1, 2, 3, 0]  # three agreeing templates win
    assert consensus_rank([], [], 1.0) == []
