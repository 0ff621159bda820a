"""Tests of the simulator: scene coordinates, DRR geometry, local views, dataset shards."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from xray_ct_reg import ct, dataset, drr, example_data, geometry, simulate
from xray_ct_reg import train as training
from xray_ct_reg.drr import DRRProjector
from xray_ct_reg.xray_physics import MaterialProjector


@pytest.fixture(scope='module')
def simulator():
    if not (Path(example_data.example_dir()) / example_data.CT_FILE).exists():
        pytest.skip('example data not fetched (scripts/bootstrap.sh)')
    return simulate.Simulator(ct.load_patient('example'))


def random_views(simulator, count, size, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        pose, _ = simulate.PoseSampler().sample(rng, simulator.vertices,
                                                simulator.patient.bone_centroid)
        yield pose, geometry.default_intrinsics(size)


def test_scene_coordinates_reproject_onto_their_pixels(simulator):
    for pose, intrinsics in random_views(simulator, 3, 80):
        sample = simulator.simulate(pose, intrinsics)
        hit = sample['hit']
        assert 0.05 < hit.mean() < 1.0
        assert np.isnan(sample['entry'][~hit]).all() and np.isfinite(sample['entry'][hit]).all()
        pixels = geometry.pixel_centers(intrinsics.width, intrinsics.height)[hit]
        for key in ('entry', 'exit'):
            projected, depth = geometry.project_points(pose, intrinsics.K, sample[key][hit])
            assert np.abs(projected - pixels).max() < 0.5
            assert np.all(depth > 0)
        entry_depth = geometry.transform_points(pose, sample['entry'][hit])[:, 2]
        exit_depth = geometry.transform_points(pose, sample['exit'][hit])[:, 2]
        assert np.all(exit_depth >= entry_depth - 1e-3)


def test_drr_is_brighter_on_bone(simulator):
    for pose, intrinsics in random_views(simulator, 2, 64, seed=2):
        sample = simulator.simulate(pose, intrinsics)
        line_integral, hit = sample['line_integral'], sample['hit']
        assert line_integral.dtype == np.float32 and np.all(line_integral >= 0)
        assert line_integral[hit].mean() > line_integral[~hit].mean()


def test_ct_point_projects_to_its_drr_peak(tmp_path):
    size = (60, 50, 40)
    spacing = np.array([1.0, 1.2, 1.5])
    array = np.full(size[::-1], -1000.0, dtype=np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((-30.0, 20.0, 100.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # like the example CT
    centre_index = np.array([37.0, 21.0, 13.0])
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    z, y, x = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    offsets = (np.stack([x, y, z], axis=-1) - centre_index) * spacing
    array[np.linalg.norm(offsets, axis=-1) <= 2.5] = 3000.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((-30.0, 20.0, 100.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / 'sphere.nii.gz'))
    projector = DRRProjector(ct.load_ct(tmp_path / 'sphere.nii.gz'), voxel_mm=1.0, step_mm=0.5)
    isocenter = np.array(image.TransformContinuousIndexToPhysicalPoint([30.0, 25.0, 20.0]))
    intrinsics = geometry.default_intrinsics(64)
    for angles in [(0, 0, 0), (30, -15, 10), (-40, 20, -5)]:
        pose = geometry.carm_pose(isocenter, *angles)
        line_integral = projector.render(pose, intrinsics)
        peak = np.unravel_index(np.argmax(line_integral), line_integral.shape)[::-1]
        weights = np.clip(line_integral - 0.5 * line_integral.max(), 0, None)
        v, u = np.mgrid[0:64, 0:64]
        centroid = np.array([(u * weights).sum(), (v * weights).sum()]) / weights.sum()
        projected, _ = geometry.project_points(pose, intrinsics.K, centre[None])
        assert np.linalg.norm(np.array(peak) - projected[0]) <= 1.0
        assert np.linalg.norm(centroid - projected[0]) < 0.5


def test_render_torch_is_differentiable(simulator):
    pose, intrinsics = next(random_views(simulator, 1, 32, seed=3))
    pose_tensor = torch.tensor(pose, requires_grad=True)
    image = simulator.projector.render_torch(pose_tensor, intrinsics)
    image.sum().backward()
    assert torch.isfinite(pose_tensor.grad).all() and pose_tensor.grad.abs().sum() > 0
    np.testing.assert_allclose(image.detach().numpy(), simulator.projector.render(
        pose, intrinsics), rtol=1e-5, atol=1e-5)


def test_rendering_by_slices_matches_ray_marching(simulator):
    """The refinement's fast renderer agrees with the ray marcher, from AP to lateral."""
    patient = simulator.patient
    projector = DRRProjector(patient.ct, voxel_mm=4.0)
    slabs = DRRProjector(patient.ct, voxel_mm=4.0, slab_slices=2)  # two slices per warp
    for size, lao, cranial in ((32, 0.0, 0.0), (48, 60.0, 20.0), (32, -85.0, 5.0),
                               (40, 30.0, -40.0)):
        pose = geometry.carm_pose(patient.bone_centroid, lao_deg=lao, cranial_deg=cranial)
        intrinsics = geometry.default_intrinsics(size)
        marched = projector.render(pose, intrinsics)
        sliced = projector.render_by_slices(pose, intrinsics)
        assert sliced.shape == marched.shape and sliced.dtype == np.float32
        assert np.median(np.abs(sliced - marched)) < 0.005 * marched.mean()
        assert np.corrcoef(sliced.ravel(), marched.ravel())[0, 1] > 0.999
        # a slab sampled at its middle plane ignores the ray's parallax across it: close, and
        # the total attenuation is kept
        by_slabs = slabs.render_by_slices(pose, intrinsics)
        assert np.median(np.abs(by_slabs - marched)) < 0.01 * marched.mean()
        assert np.corrcoef(by_slabs.ravel(), marched.ravel())[0, 1] > 0.998
        assert abs(by_slabs.sum() / marched.sum() - 1.0) < 0.01
    materials = MaterialProjector(patient.ct, voxel_mm=4.0)  # channels: soft tissue, mineral
    marched, sliced = materials.render(pose, intrinsics), materials.render_by_slices(
        pose, intrinsics)
    assert sliced.shape == marched.shape == (2, 40, 40)
    for channel in range(2):
        assert np.corrcoef(sliced[channel].ravel(), marched[channel].ravel())[0, 1] > 0.999


def test_scatter_lowers_contrast_behind_dense_anatomy_and_none_is_the_line_integral():
    """``drr.with_scatter``: a smooth fraction of the primary added before the log."""
    yy, xx = np.mgrid[0:64, 0:64]
    line_integral = np.where((xx - 20) ** 2 + (yy - 32) ** 2 < 64, 6.0, 2.0)  # a dense disc
    assert drr.with_scatter(line_integral, 0.0, 5.0) is line_integral
    scattered = drr.with_scatter(line_integral, 0.5, 5.0)
    assert np.all(scattered < line_integral)  # more photons reach every pixel
    # far from the disc the scatter is the primary's own blur: log(1 + k) less everywhere
    np.testing.assert_allclose(scattered[:, 50:], 2.0 - np.log(1.5), atol=1e-6)
    # behind the disc the scatter from around it dominates: its contrast drops
    contrast = scattered[32, 20] - scattered[32, 60]
    assert 0.5 < contrast < 0.6 * (6.0 - 2.0)


def test_crop_equals_simulation_with_cropped_intrinsics(simulator):
    pose, intrinsics = next(random_views(simulator, 1, 96, seed=4))
    full = simulator.simulate(pose, intrinsics)
    x0, y0, width, height = 10, 22, 48, 36
    crop = simulator.simulate(pose, intrinsics.crop(x0, y0, width, height))
    window = (slice(y0, y0 + height), slice(x0, x0 + width))
    agree = full['hit'][window] == crop['hit']
    assert agree.mean() > 0.995
    both = full['hit'][window] & crop['hit']
    for key in ('entry', 'exit'):
        np.testing.assert_allclose(full[key][window][both], crop[key][both], atol=1e-2)
    np.testing.assert_allclose(full['line_integral'][window], crop['line_integral'],
                               rtol=1e-3, atol=1e-3)


def test_local_views_collimation_and_appearance():
    rng = np.random.default_rng(0)
    intrinsics = geometry.default_intrinsics(64)
    local = simulate.local_view_intrinsics(intrinsics, rng)
    assert (local.width, local.height) == (64, 64) and local.K[0, 0] >= intrinsics.K[0, 0]
    mask = simulate.collimation_mask(64, 64, rng)
    assert mask.dtype == bool and mask.shape == (64, 64) and 0.2 < mask.mean() <= 1.0
    line_integral = np.linspace(0, 5, 64 * 64, dtype=np.float32).reshape(64, 64)
    images = [simulate.xray_appearance(line_integral, np.random.default_rng(7), 'random', mask)
              for _ in range(2)]
    np.testing.assert_array_equal(images[0], images[1])
    for polarity, sign in (('bright_bone', 1), ('dark_bone', -1)):
        image = simulate.xray_appearance(line_integral, None, polarity)
        assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
        assert sign * (image[-1, -1] - image[0, 0]) > 0.5
    with pytest.raises(ValueError):
        simulate.xray_appearance(line_integral, None, 'sideways')


def test_pose_sampler_ranges(simulator):
    sampler = simulate.PoseSampler()
    rng = np.random.default_rng(5)
    for extreme in (False, True):
        pose, params = sampler.sample(rng, simulator.vertices, simulator.patient.bone_centroid,
                                      extreme)
        assert geometry.is_rigid(pose)
        assert abs(params['lao_deg']) <= sampler.lao_deg
        if extreme:
            assert abs(params['cranial_deg']) == sampler.cranial_deg


def test_dataset_is_deterministic_and_readable(simulator, tmp_path):
    def write(name, seed):
        simulate.write_dataset(simulator.patient, tmp_path / name, n=6, size=32, seed=seed,
                               shard_size=4, progress=False, simulator=simulator)
        return [p.read_bytes() for p in sorted((tmp_path / name).glob('shard_*.npz'))]

    first, second, other = write('a', 0), write('b', 0), write('c', 1)
    assert len(first) == 2 and first == second and first != other
    manifest = dataset.read_manifest(tmp_path / 'a')
    assert manifest['ct_sha256'] == simulator.patient.ct_sha256
    assert manifest['counts'] == {'total': 6, 'train': 5, 'val': 1,
                                  'local_views': manifest['counts']['local_views'],
                                  'collimated': manifest['counts']['collimated']}
    assert (tmp_path / 'a' / 'contact_sheet.png').stat().st_size > 1000
    train, val = (training.load_split(tmp_path / 'a', split) for split in ('train', 'val'))
    assert len(train['K']) == 5 and len(val['K']) == 1
    assert val['entry'].shape == (1, 32, 32, 3) and val['entry'].dtype == np.float32
    assert val['hit'].dtype == bool and val['K'].shape == (1, 3, 3)
    with np.load(tmp_path / 'a' / 'shard_00001.npz') as shard:
        np.testing.assert_array_equal(shard['entry'][1], val['entry'][0])
        assert shard['index'][1] == 5
    assert not list(tmp_path.glob('.*tmp*'))  # no leftovers of the atomic write
    with pytest.raises(FileExistsError):
        write('a', 0)


@pytest.mark.parametrize('fractions', [dict(val_fraction=1.5), dict(val_fraction=-0.1),
                                       dict(local_fraction=2.0)])
def test_dataset_fractions_out_of_range_are_refused_before_writing(simulator, tmp_path,
                                                                    fractions):
    with pytest.raises(ValueError, match='fraction'):
        simulate.write_dataset(simulator.patient, tmp_path / 'never', n=4, size=32,
                               progress=False, simulator=simulator, **fractions)
    assert not (tmp_path / 'never').exists() and not list(tmp_path.iterdir())


def test_read_manifest_errors(tmp_path):
    with pytest.raises(dataset.DatasetError, match='not found'):
        dataset.read_manifest(tmp_path)
    (tmp_path / 'manifest.json').write_text('{"broken": ')
    with pytest.raises(dataset.DatasetError, match='corrupt'):
        dataset.read_manifest(tmp_path)
    (tmp_path / 'manifest.json').write_text(json.dumps({'ct_sha256': 'x'}))
    with pytest.raises(dataset.DatasetError, match='lacks'):
        dataset.read_manifest(tmp_path)
