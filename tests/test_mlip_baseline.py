"""The MLIP-energy baseline's fit: fractions and chemical potentials on a case with a known answer."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_chemical_potentials_recover_a_linear_offset(tmp_path):
    from mlip_baseline import fit_potentials, fractions, load_energies

    x = fractions([[11, 17], [11, 11, 8], [12, 8], [17, 17, 8, 12]])
    assert x[0, 11] == x[0, 17] == 0.5 and abs(x[3, 17] - 0.5) < 1e-12 and x.sum(1).tolist() == [1.0] * 4
    mu = np.zeros(119)
    mu[[8, 11, 12, 17]] = [-4.9, -1.3, -1.6, -1.8]
    rng = np.random.default_rng(0)
    comps = [list(rng.choice([8, 11, 12, 17], size=rng.integers(1, 6))) for _ in range(60)]
    xf = fractions(comps)
    fit = fit_potentials(xf, xf @ mu, penalty=1e-9)
    assert np.allclose(xf @ fit, xf @ mu, atol=1e-6)
    assert np.allclose(fit[[8, 11, 12, 17]], mu[[8, 11, 12, 17]], atol=1e-4)
    (tmp_path / "m.json").write_text(json.dumps({"entries": {"mp-1:abc": {"e": -3.0}, "mp-2:def": {"e": None}}}))
    assert load_energies(tmp_path / "m.json") == {"mp-1": -3.0}  # a failed single point is left out
