"""Tests of online training data: the patient file, the torch simulator and the appearance."""
import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from xray_ct_reg import (
    appearance,
    ct,
    example_data,
    geometry,
    online_sim,
    patient_file,
    simulate,
    xray_physics,
)
from xray_ct_reg import train as training

REPO = Path(__file__).resolve().parent.parent
PATIENT_FILE = REPO / 'models' / 'chest_example_patient.npz'


@pytest.fixture(scope='module')
def patient():
    if not (Path(example_data.example_dir()) / example_data.CT_FILE).exists():
        pytest.skip('example data not fetched (scripts/bootstrap.sh)')
    return ct.load_patient('example')


@pytest.fixture(scope='module')
def volumes():
    return patient_file.read_patient_file(PATIENT_FILE)


def _views(simulator, count, seed=4, local_fraction=0.0):
    return simulator.draw_views(np.random.default_rng(seed), count,
                                local_fraction=local_fraction)


def test_committed_patient_file_belongs_to_the_example_ct(patient, volumes):
    assert volumes.ct_sha256 == patient.ct_sha256
    assert PATIENT_FILE.stat().st_size < 40e6
    np.testing.assert_allclose(volumes.bone_centroid, patient.bone_centroid, atol=1e-6)
    assert volumes.materials.values.shape[0] == len(patient_file.MATERIAL_CHANNELS)
    assert 0.0 <= volumes.bone_field.values.min() and volumes.bone_field.values.max() <= 1.0
    for material in patient_file.TABLE_MATERIALS:
        np.testing.assert_allclose(volumes.mu_per_mm[material],
                                   xray_physics.mu_per_mm(material, volumes.energies_kev),
                                   rtol=1e-6)
    np.testing.assert_allclose(volumes.spectra.sum(axis=1), 1.0, atol=1e-4)


def test_scene_coordinates_match_open3d_ray_casting(patient, volumes):
    """Entry/exit from marching the bone field agree with the mesh ray casting to < 0.5 px."""
    size = 48
    simulator = online_sim.OnlineSimulator(volumes, size, surface_step_mm=1.5)
    reference = simulate.Simulator(patient)
    poses, intrinsics, local = _views(simulator, 4, local_fraction=0.5)
    rendered = simulator.render(poses, intrinsics)
    for index in range(len(poses)):
        expected = reference.simulate(poses[index], geometry.Intrinsics(intrinsics[index], size,
                                                                        size))
        hit = rendered['hit'][index].numpy()
        assert (hit == expected['hit']).mean() > 0.98
        both = hit & expected['hit']
        footprint_mm = geometry.transform_points(poses[index], expected['entry'][both])[:, 2] / (
            intrinsics[index][0, 0])
        for key in ('entry', 'exit'):
            error_px = np.linalg.norm(rendered[key][index].numpy()[both] - expected[key][both],
                                      axis=1) / footprint_mm
            assert np.median(error_px) < 0.2 and np.percentile(error_px, 90) < 0.5, key
        assert not rendered['entry'][index].numpy()[~hit].any()


def test_material_paths_match_the_drr_projector(patient, volumes):
    """The soft-tissue path of a view equals the DRR projector's on the same body-only CT."""
    size = 40
    simulator = online_sim.OnlineSimulator(volumes, size)
    projector = xray_physics.MaterialProjector(patient_file.body_only(
        sitk.Cast(patient.ct, sitk.sitkFloat32)))
    poses, intrinsics, _ = _views(simulator, 2, seed=9)
    paths = simulator.render(poses, intrinsics)['paths'].numpy()
    for index in range(len(poses)):
        expected = projector.render(poses[index], geometry.Intrinsics(intrinsics[index], size,
                                                                      size))[0]
        relative = np.abs(paths[index, 0] - expected) / expected.max()
        assert np.median(relative) < 0.01 and relative.max() < 0.05


def test_anatomy_continues_past_the_ends_of_the_ct(volumes):
    simulator = online_sim.OnlineSimulator(volumes, 32)
    poses, intrinsics, _ = _views(simulator, 2, seed=2)
    sources, directions = simulator.rays(poses, intrinsics)
    plain = simulator.path_lengths(sources, directions)
    none = simulator.path_lengths(sources, directions, np.zeros(2))
    longer = simulator.path_lengths(sources, directions, np.array([200.0, 200.0]))
    assert torch.equal(plain, none)
    assert (longer >= plain - 1e-3).all() and (longer[:, 0] > plain[:, 0] + 1.0).any()


def test_random_appearance_is_reproducible_varied_and_labels_only_exposed_bone(volumes):
    simulator = online_sim.OnlineSimulator(volumes, 32)
    poses, intrinsics, _ = _views(simulator, 24, seed=5)
    rendered = simulator.render(poses, intrinsics)
    draw = appearance.RandomAppearance(volumes, 'cpu')
    image, bone = draw(rendered, torch.Generator().manual_seed(1))
    again, bone_again = draw(rendered, torch.Generator().manual_seed(1))
    other, _ = draw(rendered, torch.Generator().manual_seed(2))
    assert torch.equal(image, again) and torch.equal(bone, bone_again)
    assert not torch.equal(image, other)
    assert image.shape == (24, 1, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert not (bone & ~rendered['hit']).any() and bone.any()
    # both polarities: bone pixels are brighter than the rest in some images, darker in others
    contrast = [float(image[i, 0][bone[i]].mean() - image[i, 0][~bone[i]].mean())
                for i in range(24) if bone[i].any() and (~bone[i]).any()]
    assert min(contrast) < 0 < max(contrast)


def test_table_is_crossed_whichever_way_the_beam_runs(volumes):
    """The table slab adds its path for rays from under the table (-y, the C-arm's) and above."""
    ranges = dataclasses.replace(appearance.AppearanceRanges(), table_probability=1.0,
                                 table_gap_mm=(5.0, 5.0), table_thickness_mm=(20.0, 20.0),
                                 table_density=(0.2, 0.2))
    draw = appearance.RandomAppearance(volumes, 'cpu', ranges)
    below, above = volumes.posterior_mm + 600.0, volumes.posterior_mm - 400.0
    sources = torch.tensor([[0.0, below, 0.0], [0.0, above, 0.0], [0.0, below, 0.0]])
    tilted = torch.tensor([0.0, -0.8, 0.6])
    directions = torch.stack([torch.tensor([[0.0, -1.0, 0.0], tilted, [1.0, 0.0, 0.0]]),
                              torch.tensor([[0.0, 1.0, 0.0]] * 3),
                              torch.tensor([[0.0, 1.0, 0.0]] * 3)])  # away from the table
    path = draw.table_path(torch.Generator().manual_seed(0), sources, directions)
    assert torch.allclose(path[0, 0], torch.tensor(4.0))            # 20 mm at density 0.2
    assert torch.allclose(path[0, 1], torch.tensor(4.0 / 0.8))      # slanted: longer chord
    assert path[0, 2] == 0.0                                        # parallel to the slab
    assert torch.allclose(path[1], torch.tensor(4.0))               # from above, downwards
    assert (path[2] == 0.0).all()                                   # pointing away from it


def test_patient_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='patient file not found'):
        patient_file.read_patient_file(tmp_path / 'missing.npz')
    (tmp_path / 'bad.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='corrupt patient file'):
        patient_file.read_patient_file(tmp_path / 'bad.npz')
    np.savez(tmp_path / 'other.npz', format=np.array('something else'))
    with pytest.raises(ValueError, match='is not a xray_ct_reg.patient/1'):
        patient_file.read_patient_file(tmp_path / 'other.npz')


def test_online_training_runs_without_simpleitk_open3d_or_ros(tmp_path, patient):
    """What a GPU node has: torch, numpy, scipy, OpenCV. A tiny online run, then its resume."""
    out = tmp_path / 'model.pt'
    blocker = ("import sys\nfor m in ('SimpleITK', 'open3d', 'rclpy', 'xraydb', 'skimage'):\n"
               "    sys.modules[m] = None\nfrom xray_ct_reg import cli\n"
               "sys.exit(cli.main(sys.argv[1:]))\n")
    command = [sys.executable, '-c', blocker, 'train', '--patient', str(PATIENT_FILE), '--out',
               str(out), '--train-size', '32', '--width', '4', '--depth', '2',
               '--epoch-views', '8', '--batch-size', '4', '--epochs', '2', '--device', 'cpu',
               '--quiet']
    done = subprocess.run(command + ['--stop-after-minutes', '0'], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    state = training.state_path(out)
    done = subprocess.run(command + ['--resume', str(state)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'after 2 epochs' in done.stdout
    log = json.loads((tmp_path / training.LOG_NAME).read_text())
    assert [entry['step'] for entry in log['epochs']] == [2, 4]
    from xray_ct_reg import model as scr
    network, metadata = scr.load_checkpoint(out, expected_ct_sha256=patient.ct_sha256)
    assert metadata['image_size'] == [32, 32] and metadata['dataset']['online']
