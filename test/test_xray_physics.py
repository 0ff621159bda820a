"""X-ray physics (spectra, attenuation, material paths) and the held-out appearance family."""
import heldout_family
import numpy as np
import pytest

from xray_ct_reg import geometry, xray_physics


def test_tube_spectrum_is_a_hardened_distribution_below_kvp():
    soft = xray_physics.tube_spectrum(80.0, 2.5)
    hard = xray_physics.tube_spectrum(80.0, 6.0)
    energies = xray_physics.ENERGIES_KEV
    for spectrum in (soft, hard):
        assert spectrum.sum() == pytest.approx(1.0) and np.all(spectrum >= 0)
        assert np.all(spectrum[energies >= 80.0] == 0)
    assert energies @ hard > energies @ soft, 'more filtration must raise the mean energy'
    with pytest.raises(ValueError, match='no photons'):
        xray_physics.tube_spectrum(10.0, 3.0)


def test_attenuation_comes_from_the_tables():
    water = xray_physics.mu_per_mm('water', [60.0])[0]
    assert water == pytest.approx(0.0206, rel=0.05)  # NIST: 0.2059 cm^2/g at 60 keV
    assert xray_physics.mu_per_mm('bone_mineral', [60.0])[0] > 5 * water
    assert xray_physics.mu_per_mm('steel', [60.0])[0] > 30 * water
    low, high = xray_physics.mu_per_mm('water', [30.0, 100.0])
    assert low > high


def test_material_densities_split_soft_tissue_and_mineral():
    soft, mineral = xray_physics.material_densities(np.array([-1000.0, 0.0, 100.0, 1600.0]))
    np.testing.assert_allclose(soft, [0.0, 1.0, 1.1, 1.1])
    assert mineral[:3].tolist() == [0.0, 0.0, 0.0] and mineral[3] > 0.2


def test_polyenergetic_intensity_follows_beer_lambert():
    spectrum = xray_physics.tube_spectrum(90.0, 3.0)
    paths = {'water': np.full((2, 2), 100.0), 'bone_mineral': np.array([[0.0, 5.0], [10.0, 0]])}
    intensity = xray_physics.polyenergetic_intensity(paths, spectrum)
    assert intensity[0, 0] > intensity[0, 1] > intensity[1, 0]
    assert intensity[0, 0] == pytest.approx(intensity[1, 1])
    mono = np.exp(-xray_physics.mu_per_mm('water', [60.0])[0] * 100.0)
    assert 0.3 * mono < intensity[0, 0] < 3 * mono
    harder = xray_physics.polyenergetic_intensity(paths, xray_physics.tube_spectrum(120.0, 3.0))
    assert np.all(harder > intensity), 'a higher kVp penetrates more'


@pytest.fixture(scope='module')
def patient():
    from xray_ct_reg import ct
    return ct.load_patient('example')


@pytest.fixture(scope='module')
def projector(patient):
    return xray_physics.MaterialProjector(patient.ct)


def test_material_projector_renders_both_materials(patient, projector):
    intrinsics = geometry.default_intrinsics(64)
    soft, mineral = projector.render(geometry.carm_pose(patient.bone_centroid), intrinsics)
    assert soft.shape == mineral.shape == (64, 64)
    assert 100.0 < soft.max() < 600.0, 'a chest is 20-40 cm of water-equivalent tissue'
    spine = mineral[:, 28:36].mean()
    assert spine > 1.0 and spine > 2 * mineral[:, :8].mean(), 'bone mineral peaks on the spine'


def test_heldout_family_is_varied_deterministic_and_unlike_training(patient, projector):
    cases = list(heldout_family.test_set(patient, projector, 4, size=64, seed=5))
    again = list(heldout_family.test_set(patient, projector, 4, size=64, seed=5))
    assert len(cases) == 12
    for case, repeat in zip(cases, again, strict=True):
        np.testing.assert_array_equal(case['image'], repeat['image'])
        assert case['image'].dtype == np.uint16
        assert case['image'].max() <= 2 ** case['recipe']['bits'] - 1
        assert case['image'].min() < case['image'].max()
    recipes = [case['recipe'] for case in cases]
    assert {r['polarity'] for r in recipes} == {'bright_bone', 'dark_bone'}
    assert len({r['collimation'] for r in recipes}) >= 3
    assert sum(r['implants'] for r in recipes) > 0
    assert len({round(r['kvp']) for r in recipes}) > 6


def test_heldout_ablations_leave_out_one_part_and_keep_the_draws(patient, projector):
    full = list(heldout_family.test_set(patient, projector, 2, size=64, seed=5, groups=('full',)))
    quiet = list(heldout_family.test_set(patient, projector, 2, size=64, seed=5, groups=('full',),
                                         without=('noise',)))
    for noisy, clean in zip(full, quiet, strict=True):
        np.testing.assert_array_equal(noisy['pose'], clean['pose'])  # the same draws
        assert noisy['recipe'] == clean['recipe']
        assert not np.array_equal(noisy['image'], clean['image'])
        # without quantum noise neighbouring pixels differ less
        roughness = [np.abs(np.diff(case['image'].astype(float), axis=1)).mean()
                     for case in (noisy, clean)]
        assert roughness[1] < roughness[0]
    with pytest.raises(ValueError, match='unknown ablations'):
        list(heldout_family.test_set(patient, projector, 1, size=64, without=('dust',)))
