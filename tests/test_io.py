"""Readers of mmmat.io: each vendor format built from its published layout, bad files, real XRDML scans."""

from __future__ import annotations

import math
import struct
import tarfile
import zipfile

import numpy as np
import pytest

from mmmat.io import InputError, Pattern, read_pattern, read_structure
from tests.conftest import shared_data

TT = np.round(np.arange(10.0, 30.0, 0.02), 4)
Y = np.round(100 + 1000 * np.exp(-4 * math.log(2) * ((TT - 20.0) / 0.1) ** 2))


def _xrdml(counts=Y, axis="2Theta", listed=False) -> str:
    pos = (f"<listPositions>{' '.join(f'{t:.4f}' for t in TT)}</listPositions>" if listed else
           f"<startPosition>{TT[0]}</startPosition><endPosition>{TT[-1]}</endPosition>")
    return f"""<?xml version="1.0"?>
<xrdMeasurements xmlns="http://www.xrdml.com/XRDMeasurement/2.1">
 <xrdMeasurement measurementType="Scan">
  <usedWavelength intended="K-Alpha 1">
   <kAlpha1 unit="Angstrom">1.5405980</kAlpha1><kAlpha2 unit="Angstrom">1.5444260</kAlpha2>
   <kBeta unit="Angstrom">1.3922500</kBeta><ratioKAlpha2KAlpha1>0.5000</ratioKAlpha2KAlpha1>
  </usedWavelength>
  <scan appendNumber="0" scanAxis="Gonio"><dataPoints>
   <positions axis="{axis}" unit="deg">{pos}</positions>
   <commonCountingTime unit="seconds">1.0</commonCountingTime>
   <counts unit="counts">{' '.join(str(int(c)) for c in counts)}</counts>
  </dataPoints></scan>
 </xrdMeasurement>
</xrdMeasurements>
"""


def _check(p: Pattern, wl=1.5405980, wl2=1.544426, ratio=0.5):
    assert np.allclose(p.two_theta, TT, atol=1e-4) and np.allclose(p.intensity, Y)
    assert p.wavelength == pytest.approx(wl) if wl else p.wavelength is None
    assert p.wavelength2 == pytest.approx(wl2) if wl2 else p.wavelength2 is None
    assert p.ka2_ratio == pytest.approx(ratio) if ratio else p.ka2_ratio is None


def test_xrdml(tmp_path):
    f = tmp_path / "scan.xrdml"
    f.write_text(_xrdml())
    _check(read_pattern(f))
    f.write_text(_xrdml(listed=True))
    _check(read_pattern(f))
    assert read_pattern(f, wavelength=0.7093).wavelength == 0.7093


def test_xrdml_bad(tmp_path):
    text = _xrdml()
    cut = tmp_path / "cut.xrdml"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"cut\.xrdml: truncated or malformed XML"):
        read_pattern(cut)
    omega = tmp_path / "omega.xrdml"
    omega.write_text(_xrdml(axis="Omega"))
    with pytest.raises(InputError, match=r"omega\.xrdml: no usable 2θ scan .*no 2Theta axis"):
        read_pattern(omega)
    with pytest.raises(InputError, match=r"missing\.xrdml: pattern file not found"):
        read_pattern(tmp_path / "missing.xrdml")
    odd = tmp_path / "scan.abc"
    odd.write_text("1 2\n")
    with pytest.raises(InputError, match=r"scan\.abc: unknown pattern format"):
        read_pattern(odd)


def _brml(tmp_path, with_column=True):
    views = ('<RawDataView xsi:type="VaryingRawDataView" Start="2" Length="1">'
             '<Varying><FieldDefinitions TwoTheta="1"/></Varying></RawDataView>') if with_column else ""
    rows = "".join(f"<Datum>1,1,{t:.4f},{t / 2:.4f},{int(c)}</Datum>" for t, c in zip(TT, Y))
    raw = f"""<?xml version="1.0"?>
<RawData xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <FixedInformation><Instrument><PrimaryTracks><TrackInfoData><MountedTube>
  <WaveLengthAlpha1 Value="1.5406" Unit="Angstrom"/><WaveLengthAlpha2 Value="1.54439" Unit="Angstrom"/>
  <WaveLengthRatio Value="0.5"/></MountedTube></TrackInfoData></PrimaryTracks></Instrument></FixedInformation>
 <DataRoutes><DataRoute>
  <ScanInformation><ScanAxes><ScanAxisInfo AxisId="TwoTheta"><Start>{TT[0]}</Start><Increment>0.02</Increment>
  </ScanAxisInfo></ScanAxes></ScanInformation>
  <DataViews>{views}<RawDataView xsi:type="RecordedRawDataView" Start="4" Length="1">
   <Recording LogicName="ScanCounter"/></RawDataView></DataViews>
  {rows}
 </DataRoute></DataRoutes>
</RawData>"""
    f = tmp_path / "scan.brml"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("Experiment0/DataContainer.xml", "<DataContainer/>")
        z.writestr("Experiment0/RawData0.xml", raw)
    return f


def test_brml(tmp_path):
    _check(read_pattern(_brml(tmp_path)), 1.5406, 1.54439, 0.5)
    _check(read_pattern(_brml(tmp_path, with_column=False)), 1.5406, 1.54439, 0.5)
    bad = tmp_path / "bad.brml"
    bad.write_bytes(_brml(tmp_path).read_bytes()[:300])
    with pytest.raises(InputError, match=r"bad\.brml"):
        read_pattern(bad)


def _raw3(steps=TT.size, truncate=0) -> bytes:
    head = bytearray(712)
    head[0:7] = b"RAW1.01"
    struct.pack_into("<II", head, 8, 1, 1)
    head[608:610] = b"Cu"
    struct.pack_into("<5d", head, 616, 1.5418, 1.5406, 1.54439, 1.39222, 0.5)
    rng = bytearray(304)
    struct.pack_into("<II", rng, 0, 304, steps)
    struct.pack_into("<dd", rng, 8, TT[0] / 2, TT[0])
    struct.pack_into("<d", rng, 176, 0.02)
    struct.pack_into("<d", rng, 240, 1.5406)
    data = bytes(head) + bytes(rng) + Y.astype("<f4").tobytes()
    return data[: len(data) - truncate]


def test_bruker_raw_v3(tmp_path):
    f = tmp_path / "scan.raw"
    f.write_bytes(_raw3())
    _check(read_pattern(f), 1.5406, 1.54439, 0.5)
    f.write_bytes(_raw3(truncate=40))
    with pytest.raises(InputError, match=r"scan\.raw: truncated Bruker RAW"):
        read_pattern(f)
    f.write_bytes(b"RAW4.00" + bytes(2000))
    with pytest.raises(InputError, match=r"scan\.raw: Bruker RAW version 4 is not supported"):
        read_pattern(f)


def _ras(axis="TwoThetaTheta", end=True) -> str:
    lines = ["*RAS_DATA_START", "*RAS_HEADER_START", '*HW_XG_TARGET_NAME "Cu"',
             '*HW_XG_WAVE_LENGTH_ALPHA1 "1.540593"', '*HW_XG_WAVE_LENGTH_ALPHA2 "1.544414"',
             f'*MEAS_SCAN_AXIS_X "{axis}"', f'*MEAS_DATA_COUNT "{TT.size}"', "*RAS_HEADER_END", "*RAS_INT_START"]
    lines += [f"{t:.4f} {c / 2:.1f} 2.0" for t, c in zip(TT, Y)]
    lines += ["*RAS_INT_END", "*RAS_DATA_END"] if end else []
    return "\n".join(lines) + "\n"


def test_ras(tmp_path):
    f = tmp_path / "scan.ras"
    f.write_text(_ras())
    _check(read_pattern(f), 1.540593, 1.544414, None)
    f.write_text(_ras(end=False))
    with pytest.raises(InputError, match=r"scan\.ras: truncated RAS file"):
        read_pattern(f)
    f.write_text(_ras(axis="Omega"))
    with pytest.raises(InputError, match=r"scan\.ras: the scan axis is 'Omega', not 2θ"):
        read_pattern(f)


def test_gsas(tmp_path):
    n = TT.size
    std = [("  " + f"{int(c):6d}") for c in Y]
    body = ["".join(std[i:i + 10]) for i in range(0, n, 10)]
    f = tmp_path / "scan.gsa"
    f.write_text("\n".join(["test pattern", f"BANK 1 {n} {math.ceil(n / 10)} CONS {TT[0] * 100:.2f} 2.0 0 0 STD",
                            *body]) + "\n")
    _check(read_pattern(f, wavelength=1.5406), 1.5406, None, None)
    assert read_pattern(f).wavelength is None
    esd = ["".join(f"{int(c):8d}{math.sqrt(c):8.2f}" for c in Y[i:i + 5]) for i in range(0, n, 5)]
    f.write_text("\n".join(["t", f"BANK 1 {n} {len(esd)} CONS {TT[0] * 100:.2f} 2.0 0 0 ESD", *esd]) + "\n")
    _check(read_pattern(f), None, None, None)
    fx = tmp_path / "scan.fxye"
    rows = [f"{t * 100:.3f} {c:.1f} {math.sqrt(c):.2f}" for t, c in zip(TT, Y)]
    fx.write_text("\n".join(["t", f"BANK 1 {n} {n} CONS {TT[0] * 100:.2f} 2.0 0 0 FXYE", *rows]) + "\n")
    _check(read_pattern(fx), None, None, None)
    fx.write_text("\n".join(["t", f"BANK 1 {n} {n} CONS {TT[0] * 100:.2f} 2.0 0 0 FXYE", *rows[:50]]) + "\n")
    with pytest.raises(InputError, match=r"scan\.fxye: truncated GSAS file"):
        read_pattern(fx)


def test_xy_without_wavelength(tmp_path):
    f = tmp_path / "scan.xy"
    f.write_text("\n".join(f"{t} {c}" for t, c in zip(TT, Y)))
    p = read_pattern(f)
    assert p.wavelength is None and p.meta["format"] == "xy"
    _check(p, None, None, None)


def test_read_structure(tmp_path, nacl):
    cif = tmp_path / "nacl.cif"
    cif.write_text(nacl.to(fmt="cif"))
    assert read_structure(cif).composition.reduced_formula == "NaCl"
    poscar = tmp_path / "POSCAR"
    poscar.write_text(nacl.to(fmt="poscar"))
    assert len(read_structure(poscar)) == len(nacl)
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    xyz = tmp_path / "nacl.extxyz"
    ase.io.write(xyz, AseAtomsAdaptor.get_atoms(nacl))
    assert read_structure(xyz).composition.reduced_formula == "NaCl"
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    with pytest.raises(InputError, match=r"bad\.cif"):
        read_structure(bad)
    with pytest.raises(InputError, match=r"nothere\.cif: structure file not found"):
        read_structure(tmp_path / "nothere.cif")


def test_real_xrdml_scans(tmp_path):
    tar = shared_data("xrd_measured/alab_binary_reactions/binary_reactions_xrdml.tar.xz")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter="data")
    files = sorted(tmp_path.rglob("*.xrdml"))
    assert len(files) == 20
    for f in files:
        p = read_pattern(f)
        assert len(p) > 1000 and p.two_theta[0] < 15 and p.two_theta[-1] > 90, f.name
        assert p.wavelength == pytest.approx(1.5406, abs=1e-3) and p.wavelength2 > p.wavelength
        assert p.ka2_ratio == pytest.approx(0.5) and p.intensity.max() > 1000
