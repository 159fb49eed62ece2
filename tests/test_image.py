import time

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from mmmat.data.image import IMAGE_KIND, plane_lattice_vectors, simulate_image, simulate_zcontrast
from mmmat.data.schema import MaterialRecord, RecordError


def _pbo_cell():
    # tetragonal cell with a Pb column at the origin and an O column at (1/2, 1/2)
    lattice = Lattice.tetragonal(4.0, 3.0).matrix
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    return lattice, frac, np.array([82, 8])


def _triclinic(seed=0, n=20):
    rng = np.random.default_rng(seed)
    lattice = Lattice.from_parameters(5.1, 6.2, 7.3, 80, 95, 105).matrix
    numbers = np.array([82, 8, 38, 22, 3] * (n // 5))
    return lattice, rng.random((n, 3)), numbers


def _pixel(coord_x, coord_y, size=64, pixel_size=0.25):
    # pixel (row, col) of an in-plane position (x right, y up), origin at the image centre
    col = int(round(coord_x / pixel_size + (size - 1) / 2))
    row = int(round((size - 1) / 2 - coord_y / pixel_size))
    return row, col


def test_shape_dtype_meta():
    lattice, frac, z = _triclinic()
    img, meta = simulate_zcontrast(lattice, frac, z, size=48, pixel_size=0.3, zone_axis=(1, 1, 0))
    assert img.shape == (48, 48) and img.dtype == np.uint8
    assert img.max() == 255 and img.min() < 255
    assert meta == {
        "kind": IMAGE_KIND,
        "simulated": True,
        "zone_axis": [1, 1, 0],
        "pixel_size_A": 0.3,
        "size": 48,
        "sigma_A": 0.45,
        "z_exponent": 1.7,
    }
    # deterministic
    img2, _ = simulate_zcontrast(lattice, frac, z, size=48, pixel_size=0.3, zone_axis=(1, 1, 0))
    assert np.array_equal(img, img2)


def test_heavy_column_brighter_than_light():
    lattice, frac, z = _pbo_cell()
    img, _ = simulate_zcontrast(lattice, frac, z)
    pb = img[_pixel(0.0, 0.0)]  # Pb column at the cell origin, the image centre
    o = img[_pixel(2.0, 2.0)]  # O column at (a/2, b/2): a along x, b along y
    assert pb == 255
    assert o < 0.5 * pb
    # intensity ratio follows (Z_Pb / Z_O) ** exponent (columns 2.8 Å apart barely overlap)
    assert pb / max(int(o), 1) == pytest.approx((82 / 8) ** 1.7, rel=0.35)
    # and the O column is a local maximum, brighter than the empty point between columns
    assert o > img[_pixel(1.0, 1.0)]


def test_atom_order_and_lattice_translation_invariance():
    lattice, frac, z = _triclinic(1)
    ref, _ = simulate_zcontrast(lattice, frac, z, zone_axis=(1, 0, 1))
    perm = np.random.default_rng(5).permutation(len(z))
    img, _ = simulate_zcontrast(lattice, frac[perm], z[perm], zone_axis=(1, 0, 1))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    shifted = frac + np.array([1.0, -2.0, 3.0])  # every atom moved by one lattice vector
    img, _ = simulate_zcontrast(lattice, shifted, z, zone_axis=(1, 0, 1))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    one = frac.copy()
    one[3] += np.array([0.0, 1.0, 0.0])  # a single atom moved to an equivalent position
    img, _ = simulate_zcontrast(lattice, one, z, zone_axis=(1, 0, 1))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("zone_axis", [(0, 0, 1), (1, 1, 0), (0, 1, 0)])
def test_supercell_gives_same_image(zone_axis):
    s = Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.25, 5.2), ["Zn", "O"],
                                  [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.38]])
    ref, _ = simulate_zcontrast(s.lattice.matrix, s.frac_coords, s.atomic_numbers, zone_axis=zone_axis)
    sc = s.copy()
    sc.make_supercell([2, 2, 2])
    # a diagonal 2x2x2 supercell: the same [uvw] names the same direction, and the field of view is the same
    img, _ = simulate_zcontrast(sc.lattice.matrix, sc.frac_coords, sc.atomic_numbers, zone_axis=zone_axis)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


def test_supercell_along_axis_and_multiple_axis_indices():
    lattice, frac, z = _triclinic(2, n=10)
    ref, _ = simulate_zcontrast(lattice, frac, z, zone_axis=(1, 1, 1))
    img, meta = simulate_zcontrast(lattice, frac, z, zone_axis=(2, 2, 2))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    s = Structure(Lattice(lattice), z.tolist(), frac)
    sc = s.copy()
    sc.make_supercell([1, 1, 3])
    ref, _ = simulate_zcontrast(lattice, frac, z)
    img, _ = simulate_zcontrast(sc.lattice.matrix, sc.frac_coords, sc.atomic_numbers)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


def test_rotation_of_crystal_gives_same_histogram():
    lattice, frac, z = _triclinic(3)
    ref, _ = simulate_zcontrast(lattice, frac, z, zone_axis=(1, 2, 0))
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1  # proper rotation
    img, _ = simulate_zcontrast(lattice @ q.T, frac, z, zone_axis=(1, 2, 0))
    h_ref = np.bincount(ref.ravel(), minlength=256)
    h_img = np.bincount(img.ravel(), minlength=256)
    # same histogram up to rounding of a few pixels by one grey level
    assert np.abs(np.cumsum(h_ref) - np.cumsum(h_img)).max() <= 0.01 * ref.size
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


def test_plane_lattice_vectors_unimodular():
    for uvw in [(0, 0, 1), (1, 1, 0), (1, 1, 1), (2, 3, 5), (-4, 6, 0), (0, 3, 0), (7, -5, 3)]:
        m = plane_lattice_vectors(uvw)
        g = np.gcd.reduce(np.abs(uvw))
        full = np.vstack([m, np.array(uvw) // g])
        assert abs(round(np.linalg.det(full))) == 1


def test_general_axis_columns_are_lattice_periodic():
    # with a single atom per primitive cell, every column along any [uvw] holds the same weight:
    # all local maxima in the interior have the same brightness
    s = Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])
    img, _ = simulate_zcontrast(s.lattice.matrix, s.frac_coords, s.atomic_numbers, zone_axis=(1, 2, 0),
                                size=96, pixel_size=0.1, sigma=0.3)
    a = img.astype(int)
    c = a[10:-10, 10:-10]
    is_peak = ((c > 100) & (c >= a[9:-11, 10:-10]) & (c >= a[11:-9, 10:-10])
               & (c >= a[10:-10, 9:-11]) & (c >= a[10:-10, 11:-9]))
    peaks = c[is_peak]
    assert len(peaks) >= 4
    assert peaks.max() - peaks.min() <= 25  # same columns, sampled off-centre by up to half a pixel


def test_simulate_image_record_and_errors():
    lattice, frac, z = _pbo_cell()
    rec = MaterialRecord("mp-test", lattice, frac, z)
    img, meta = simulate_image(rec, size=32)
    assert img.shape == (32, 32) and meta["simulated"] is True
    empty = MaterialRecord("mp-empty", lattice, np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(RecordError, match="mp-empty"):
        simulate_image(empty)
    with pytest.raises(RecordError):
        simulate_zcontrast(np.zeros((3, 3)), frac, z)
    with pytest.raises(RecordError):
        simulate_zcontrast(lattice, frac, np.array([82, 0]))
    with pytest.raises(ValueError):
        simulate_zcontrast(lattice, frac, z, zone_axis=(0, 0, 0))
    with pytest.raises(ValueError):
        simulate_zcontrast(lattice, frac, z, zone_axis=(0.5, 0, 1))


def test_fast():
    lattice, frac, z = _triclinic(4, n=20)
    simulate_zcontrast(lattice, frac, z)
    t0 = time.perf_counter()
    for _ in range(10):
        simulate_zcontrast(lattice, frac, z)
    elapsed = time.perf_counter() - t0
    print(f"simulate_zcontrast: {elapsed / 10 * 1e3:.2f} ms per 20-atom 64x64 image")
    assert elapsed < 0.5
