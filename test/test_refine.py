"""Intensity refinement: the exposed-pixel mask, the similarities and convergence against a DRR."""
from conftest import REPO
import heldout_family
import numpy as np
import pytest
import torch

from xray_ct_reg import drr, geometry, model, refine, xray_physics
from xray_ct_reg.register import RegistrationConfig, refine_and_judge


def test_exposed_mask_drops_shutters_and_keeps_anatomy():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    anatomy = 0.5 + 0.3 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 0.02 * rng.standard_normal(
        (96, 96))
    image = anatomy.copy()
    image[:, :20] = 0.02 + 0.003 * rng.standard_normal((96, 20))  # shutter, no exposure
    mask = refine.exposed_mask(image)
    assert not mask[:, :18].any()
    assert mask[:, 30:].mean() > 0.95
    assert refine.exposed_mask(anatomy).mean() > 0.95
    # polarity does not matter: a bright shutter on an inverted image is found too
    assert not refine.exposed_mask(1.0 - image)[:, :18].any()
    # the blurred shutter edge is dropped with it (no ring of half-exposed pixels)
    assert not mask[:, :22].any()
    # a thin shutter strip at the other edge is found too
    strip = anatomy.copy()
    strip[:, -3:] = 0.02
    assert not refine.exposed_mask(strip)[:, -3:].any()


def test_masked_ncc_ignores_pixels_outside_the_mask():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random((32, 32)))
    b = 3.0 * a + 1.0
    b[:, :8] = torch.from_numpy(rng.random((32, 8)))
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[:, :8] = False
    assert float(refine.similarity('ncc', a, b, mask)) == pytest.approx(1.0)
    assert float(refine.similarity('ncc', a, b)) < 0.99
    assert float(refine.similarity('ncc', a, -b, mask)) == pytest.approx(-1.0)


@pytest.fixture(scope='module')
def patient():
    from xray_ct_reg import ct
    return ct.load_patient('example')


@pytest.fixture(scope='module')
def projectors(patient):
    """The refinement's level projectors of the patient (built once: a few seconds)."""
    return refine.level_projectors(patient.ct)


def test_levels_alike_share_one_projector(projectors):
    """A projector per level of the schedule; levels of one voxel size and slab share one."""
    keys = list(zip(refine.LEVEL_VOXELS_MM, refine.LEVEL_SLAB_SLICES, strict=True))
    assert len(projectors) == len(keys) == len(refine.LEVEL_SIZES_PX)
    for (voxel_mm, slab_slices), projector in zip(keys, projectors, strict=True):
        assert projector is projectors[keys.index((voxel_mm, slab_slices))]
        assert (projector.step_mm, projector.slab_slices) == (voxel_mm, slab_slices)
    assert len({id(projector) for projector in projectors}) == len(set(keys)) < len(keys)


@pytest.mark.parametrize('similarity', refine.SIMILARITIES)
@pytest.mark.parametrize('polarity', ['bright_bone', 'dark_bone'])
def test_refinement_recovers_a_perturbed_pose(patient, projectors, polarity, similarity):
    """From 10 mm and 3 deg off: within 1 mm projected distance and 5 mm mTRE, a sharp optimum.

    Depth along the beam is the weak direction of one view, so mTRE is looser than the projected
    distance.
    """
    from xray_ct_reg import simulate
    projector = projectors[-1]
    rng = np.random.default_rng(3)
    truth = geometry.carm_pose(patient.bone_centroid, lao_deg=10.0, cranial_deg=-5.0)
    intrinsics = geometry.default_intrinsics(128)
    image = simulate.xray_appearance(projector.render(truth, intrinsics), rng, polarity=polarity)
    perturbation = geometry.pose_from_rotvec(np.radians([2.0, -1.5, 1.5]), [6.0, -5.0, 6.0])
    start = geometry.compose(perturbation, truth)
    assert geometry.mtre(start, truth, patient.targets) > 8.0
    refined, info = refine.refine_pose(projectors, image, intrinsics, start,
                                       centre_ct=patient.bone_centroid, similarity=similarity)
    assert geometry.projected_distance_mm(refined, truth, patient.targets, intrinsics) < 1.0
    assert geometry.mtre(refined, truth, patient.targets) < 5.0
    assert info.improved and info.ncc_after > info.ncc_before + 0.1
    assert info.polarity == (1.0 if polarity == 'bright_bone' else -1.0)
    assert info.depth_margin > 0.0  # converged: the similarity peaks along the beam
    # ... and drops the more the farther along it: the depth gate judges the farther probe
    assert info.depth_drop > info.depth_margin
    # no restart along the beam ends at a pose nearly as good
    assert info.rival_margin >= RegistrationConfig().min_weak_sharpness
    if similarity == RegistrationConfig.similarity:  # the gate's similarity: a sharp optimum
        assert info.across_drop >= RegistrationConfig().min_sharpness
        assert info.depth_drop >= RegistrationConfig().min_depth_sharpness
    # Broyden updates reuse Jacobians: fresh ones at every iteration would take at least 7
    # renders per iteration at the coarse level (forward differences) and 13 at the 64 px ones
    # (central), where most of the iterations are: over 10 per iteration
    assert 0 < info.iterations and info.renders < 10 * info.iterations
    assert info.exposed_fraction > 0.5  # no shutters; only saturated areas are dropped


def test_refinement_of_a_blank_image_keeps_the_pose(patient):
    projector = drr.DRRProjector(patient.ct)
    start = geometry.carm_pose(patient.bone_centroid)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        refined, info = refine.refine_pose(projector, np.zeros((64, 64)),
                                           geometry.default_intrinsics(64), start)
        assert torch.get_num_threads() == 2  # the refinement's one thread is given back
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(refined, start)
    assert not info.improved and info.exposed_fraction == 0.0
    assert not np.isfinite(info.ncc_after)


def _burn_cpu(seconds, started):
    """Keep one core busy (another job on the machine); set `started` once running."""
    import time
    started.set()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_refinement_is_deterministic_under_load_and_a_budget_only_rejects(patient):
    """Same image and start, same pose, idle or busy; a short budget only rejects.

    A budget too short to finish the fixed schedule returns the start unrefined, and the gate
    rejects it.
    """
    import multiprocessing
    import os

    from xray_ct_reg import simulate
    from xray_ct_reg.gates import intensity_gates
    from xray_ct_reg.register import RegistrationConfig
    projector = drr.DRRProjector(patient.ct)
    rng = np.random.default_rng(8)
    truth = geometry.carm_pose(patient.bone_centroid, lao_deg=-15.0, cranial_deg=5.0)
    intrinsics = geometry.default_intrinsics(96)
    image = simulate.xray_appearance(projector.render(truth, intrinsics), rng)
    start = geometry.compose(geometry.pose_from_rotvec(np.radians([1.0, 1.0, -1.0]),
                                                       [4.0, 3.0, -5.0]), truth)
    quiet, quiet_info = refine.refine_pose(projector, image, intrinsics, start,
                                           centre_ct=patient.bone_centroid)
    # One burner more than the cores this process may use; the load is checked by the burners
    # running before and after the refinement, not by its time, which varies with the host.
    started = [multiprocessing.Event() for _ in range(len(os.sched_getaffinity(0)) + 1)]
    burners = [multiprocessing.Process(target=_burn_cpu, args=(60.0, event)) for event in started]
    for burner in burners:
        burner.start()
    try:
        assert all(event.wait(30.0) for event in started), 'a burner did not start'
        busy, busy_info = refine.refine_pose(projector, image, intrinsics, start,
                                             centre_ct=patient.bone_centroid)
        assert all(burner.is_alive() for burner in burners), 'the load stopped early'
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
    assert quiet_info.finished and busy_info.finished
    np.testing.assert_array_equal(busy, quiet)
    assert busy_info.ncc_after == quiet_info.ncc_after
    assert busy_info.iterations == quiet_info.iterations

    cut, cut_info = refine.refine_pose(projector, image, intrinsics, start, time_budget_s=0.05,
                                       centre_ct=patient.bone_centroid)
    assert not cut_info.finished
    np.testing.assert_array_equal(cut, start)
    accepted, reason = intensity_gates(cut, cut_info, intrinsics, patient.bone_centroid,
                                       RegistrationConfig())
    assert not accepted and 'did not finish' in reason


def test_gradient_ncc_ignores_gain_offset_and_linear_shading():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.random((32, 32)))
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing='ij')
    shaded = 2.0 * a + 0.5 + 0.05 * xx.double() - 0.03 * yy.double()  # gain, offset, heel/scatter
    assert float(refine.similarity('gradient_ncc', a, shaded)) == pytest.approx(1.0)
    assert float(refine.similarity('ncc', a, shaded)) < 0.9
    assert float(refine.similarity('gradient_ncc', a, -shaded)) == pytest.approx(-1.0)
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[:, :8] = False
    scrambled = shaded.clone()
    scrambled[:, :8] = torch.from_numpy(rng.random((32, 8)))
    assert float(refine.similarity('gradient_ncc', a, scrambled, mask)) == pytest.approx(1.0)
    assert set(refine.SIMILARITIES) >= {'ncc', 'gradient_ncc'}


def test_ngf_counts_a_strong_edge_like_any_other():
    """NGF: a strong step the DRR lacks counts like any edge; a LUT keeps it high.

    The step (a collimator or wire edge, 5x the anatomy's range) outweighs the anatomy in
    gradient correlation but not in normalised gradient fields; a processing LUT (sigmoid) keeps
    the gradients' directions, so NGF stays high, and polarity flips its sign.
    """
    import cv2
    rng = np.random.default_rng(4)
    a = torch.from_numpy(cv2.GaussianBlur(rng.random((48, 48)), (0, 0), 1.5))
    a = (a - a.min()) / (a.max() - a.min())
    stepped = a.clone()
    stepped[:, 30:] += 5.0
    assert float(refine.similarity('ngf', a, stepped)) > 0.95
    assert float(refine.similarity('gradient_ncc', a, stepped)) < 0.7
    assert float(refine.similarity('ngf', a, torch.sigmoid(8.0 * (a - 0.5)))) > 0.95
    assert float(refine.similarity('ngf', a, -a)) == pytest.approx(-1.0)


def test_a_crop_of_the_detector_turns_and_probes_depth_about_what_it_shows():
    """A crop that misses the bone centroid turns about a point in what it shows.

    That point lies on the ray through the exposed pixels, at the centroid's depth; depth probes
    move along that ray.
    """
    full = geometry.default_intrinsics(64)
    crop = full.crop(44, 40, 20, 24)  # the lower right corner: the optical axis is outside
    pose = geometry.carm_pose(np.zeros(3))
    centroid = np.zeros(3)  # projects at the principal point, outside the crop
    mask = np.zeros((24, 20), dtype=bool)
    mask[4:20, 2:18] = True  # exposed pixels centred at (9.5, 11.5)
    centre = refine._view_centre(pose, centroid, mask, crop)
    u, v = (crop.K @ (centre / centre[2]))[:2]
    assert u == pytest.approx(9.5) and v == pytest.approx(11.5)
    assert centre[2] == pytest.approx(geometry.transform_points(pose, centroid[None])[0, 2])
    # when the centroid is in view it is the centre itself
    centred = refine._view_centre(pose, centroid, np.ones((64, 64), dtype=bool), full)
    np.testing.assert_allclose(centred, geometry.transform_points(pose, centroid[None])[0])
    frame = refine._beam_frame(torch.as_tensor(centre))
    np.testing.assert_allclose(frame.T @ frame, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(frame[:, 2].numpy(), centre / np.linalg.norm(centre))
    assert abs(float(frame[2, 2])) < 0.999  # not the optical axis: a crop's beam is oblique


def test_restarts_along_the_beam_find_a_better_optimum_elsewhere(patient, projectors):
    """From a pose 12 mm off in depth, a restart along the beam ends near the truth, higher."""
    truth = geometry.carm_pose(patient.bone_centroid, lao_deg=-8.0, cranial_deg=6.0)
    intrinsics = geometry.default_intrinsics(128)
    image = projectors[-1].render(truth, intrinsics)  # ray-marched: slabs do not apply
    level_image, level_intrinsics = model.resize_for_network(image, intrinsics, (64, 64))
    level = refine._make_level(projectors[-1], level_image, refine.exposed_mask(level_image),
                               level_intrinsics, 64, 'ngf', 0.0)
    centre = geometry.transform_points(truth, patient.bone_centroid.reshape(1, 3))[0]
    beam = torch.as_tensor(centre / np.linalg.norm(centre))
    off = truth.copy()
    off[:3, 3] -= 12.0 * beam.numpy()
    objective = refine._Objective(level, torch.as_tensor(off), torch.as_tensor(centre), 1.0,
                                  'ngf', refine._Clock(float('inf')))
    at_off = objective.similarity(torch.zeros(6, dtype=torch.float64))
    rivals = refine._restarts(objective, beam)
    assert len(rivals) >= 1 and max(rivals) > at_off + 0.01
    # centred on the truth, no restart ends elsewhere higher
    objective.pose = torch.as_tensor(truth)
    at_truth = objective.similarity(torch.zeros(6, dtype=torch.float64))
    assert all(rival <= at_truth for rival in refine._restarts(objective, beam))


def test_depth_profile_peaks_at_the_true_depth_in_either_polarity(patient, projectors):
    """Along the beam through the truth, the finest level's similarity peaks at the truth."""
    truth = geometry.carm_pose(patient.bone_centroid, lao_deg=12.0, cranial_deg=4.0)
    intrinsics = geometry.default_intrinsics(128)
    image = projectors[-1].render(truth, intrinsics)
    offsets = np.array([-20.0, -10.0, 0.0, 10.0, 20.0])
    bright = refine.depth_profile(projectors[-1], image, intrinsics, truth, offsets,
                                  centre_ct=patient.bone_centroid)
    assert int(np.argmax(bright)) == 2 and bright[2] > 0.9
    # as the depth gate judges it: weighted, DEPTH_SHARPNESS_PROBE_MM either way
    probe = refine.DEPTH_SHARPNESS_PROBE_MM
    judged = refine.depth_profile(projectors[-1], image, intrinsics, truth, [-probe, 0.0, probe],
                                  centre_ct=patient.bone_centroid, expansion_weighted=True)
    assert judged[1] - max(judged[0], judged[2]) >= RegistrationConfig().min_depth_sharpness
    # an inverted image gives the same profile: the polarity is the sign at the pose
    dark = refine.depth_profile(projectors[-1], -image, intrinsics, truth, offsets,
                                centre_ct=patient.bone_centroid)
    np.testing.assert_allclose(dark, bright, atol=1e-9)


def test_depth_is_judged_where_it_shows_away_from_the_focus_of_expansion(patient, projectors):
    """Weighted by the distance from the focus of expansion, depth drops more 10 mm away.

    Moving along the beam scales the image about the centre's projection, so the pixels far
    from it move and the ones near it do not.
    """
    truth = geometry.carm_pose(patient.bone_centroid, lao_deg=-20.0, cranial_deg=8.0)
    intrinsics = geometry.default_intrinsics(128)
    image = projectors[-1].render(truth, intrinsics)
    offsets = np.array([-10.0, 0.0, 10.0])
    plain, weighted = (refine.depth_profile(projectors[-1], image, intrinsics, truth, offsets,
                                            centre_ct=patient.bone_centroid,
                                            expansion_weighted=weighted)
                       for weighted in (False, True))
    plain_drop, weighted_drop = (profile[1] - max(profile[0], profile[2])
                                 for profile in (plain, weighted))
    assert weighted_drop > 1.3 * plain_drop > 0.0
    level = refine._Level(None, geometry.default_intrinsics(64), torch.ones(64, 64, dtype=bool),
                          0.0)
    weight = refine._expansion_weight(level, torch.tensor([0.0, 0.0, 700.0]))  # on the axis
    centre = int(round(level.intrinsics.K[0, 2]))
    assert weight[centre, centre] < 0.02 and weight.max() == 1.0
    assert float(weight[centre, centre + 20]) == pytest.approx(
        2.0 * float(weight[centre, centre + 10]), rel=0.05)


class _NarrowValley:
    """Rosenbrock's curved valley over the first two parameters (the others pinned at 0).

    ``residual`` as ``refine._Objective``'s; the level says how LM steps (``follow_ridges``).
    """

    def __init__(self, follow_ridges):
        self.level = refine._Level(None, geometry.default_intrinsics(8),
                                   torch.ones(8, 8, dtype=torch.bool), 0.0, follow_ridges)
        self.clock = refine._Clock(float('inf'))

    def residual(self, delta):
        x, y = delta[0], delta[1]
        return torch.cat([torch.stack([30.0 * (y - x * x), 1.0 - x]), delta[2:]])


def test_levenberg_marquardt_follows_a_narrow_ridge_where_forward_differences_stall():
    """On a curved valley's floor, forward differences' bias stalls LM; following ridges not.

    The bias of a forward difference grows with the curvature across the valley and outweighs
    the small slope along it, so no damped step lowers the cost (as on held-out views, where
    a depth traded for a tilt is such a valley); central differences and stretched steps go on.
    """
    start = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    start_cost = float(_NarrowValley(False).residual(start).square().sum())
    stalled, stalled_cost = refine._levenberg_marquardt(_NarrowValley(False), start, 20)
    followed, followed_cost = refine._levenberg_marquardt(_NarrowValley(True), start, 20)
    assert stalled_cost == pytest.approx(start_cost)
    torch.testing.assert_close(stalled, start)
    assert followed_cost < 0.05 * start_cost and float(followed[0]) > 0.5  # on towards (1, 1)
    # per-level settings for fewer or more levels than the default schedule's three
    table = ('coarse', 'middle', 'finest')
    assert refine._per_level(table, 2) == ('middle', 'finest')
    assert refine._per_level(table, 4) == ('coarse', 'coarse', 'coarse', 'finest')


def test_probe_jacobian_and_covariance_of_a_known_cost():
    """Residuals linear in the perturbation: the probes recover J and its flat direction.

    J^T J's weakest eigenvector is the flat direction (depth with a tilt), and the covariance
    is sigma^2 (J^T J)^-1 (sigma^2 widened for correlated residuals), widest along it, plus
    the model's depth variance along the beam (probed axis 2).
    """
    rng = np.random.default_rng(0)
    flat = torch.tensor([0.0, 0.0, 0.8, 0.6, 0.0, 0.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([flat[:, None], torch.as_tensor(
        rng.normal(size=(6, 5)))], dim=1))
    jacobian = torch.as_tensor(rng.normal(size=(50, 6))) @ basis @ torch.diag(
        torch.tensor([0.01, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)) @ basis.T
    residuals = {}
    for axis, offset in refine.SHARPNESS_PROBES:
        delta = torch.zeros(6, dtype=torch.float64)
        delta[axis] = offset
        residuals[(axis, offset)] = jacobian @ delta
    recovered = refine._probe_jacobian(residuals)
    torch.testing.assert_close(recovered, jacobian)
    weakest = torch.linalg.eigh(recovered.T @ recovered)[1][:, 0]
    assert abs(float(weakest @ flat)) == pytest.approx(1.0, abs=1e-3)
    covariance = refine._covariance(recovered, 0.9, torch.eye(6, dtype=torch.float64),
                                    np.zeros(3))
    mm_like = np.array([1.0, 1.0, 1.0] + [refine.RADIUS_MM] * 3)  # undo the radians
    in_axes = covariance * np.outer(mm_like, mm_like)
    noise = refine.CORRELATED_RESIDUALS_FACTOR * (2.0 - 2.0 * 0.9) / (len(jacobian) - 6)
    along_beam = np.diag([0.0, 0.0, refine.DEPTH_MODEL_SIGMA_MM ** 2, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(
        in_axes, noise * np.linalg.inv((jacobian.T @ jacobian).numpy()) + along_beam, rtol=1e-6)
    widest = np.linalg.eigh(in_axes - along_beam)[1][:, -1]  # the curvature's part
    assert abs(float(widest @ flat.numpy())) == pytest.approx(1.0, abs=1e-3)


def test_the_covariance_widens_along_the_beam_for_what_the_drr_does_not_model():
    """A perfectly sharp optimum still publishes DEPTH_MODEL_SIGMA_MM along the beam, only there.

    The beam runs from the source through the refinement's centre; off the optical axis it is
    tilted, and the widened direction of the imager-frame covariance follows it.
    """
    centre = torch.tensor([60.0, -40.0, 640.0], dtype=torch.float64)
    frame = refine._beam_frame(centre)
    basis = torch.block_diag(frame, torch.eye(3, dtype=torch.float64))
    sharp = torch.eye(6, dtype=torch.float64).repeat(200, 1) * 1e3  # curvature ~ 2e8
    covariance = refine._covariance(sharp, 0.9, basis, np.zeros(3))
    beam = (centre / centre.norm()).numpy()
    translation = covariance[:3, :3]
    np.testing.assert_allclose(translation, refine.DEPTH_MODEL_SIGMA_MM ** 2 * np.outer(beam, beam),
                               atol=1e-6)
    assert np.abs(covariance[3:, 3:]).max() < 1e-9


def test_covariance_is_of_the_pose_origin_not_of_the_refinement_centre():
    """The refinement turns about a centre; the published covariance is about the pose's origin.

    Small perturbations (d about the centre, rotation r) move the pose's translation and
    rotation as ``_about_origin`` says, so a covariance over (d, r) maps onto the pose's.
    """
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(3)
    pose = torch.as_tensor(geometry.pose_from_rotvec([0.3, -0.2, 0.1], [20.0, -35.0, 780.0]))
    centre = torch.tensor([5.0, 10.0, 640.0], dtype=torch.float64)
    to_origin = refine._about_origin((pose[:3, 3] - centre).numpy())
    for _ in range(5):
        d, r = rng.normal(size=3) * 1e-3, rng.normal(size=3) * 1e-6  # mm, rad
        moved = refine._perturbed_pose(
            pose, torch.as_tensor(np.concatenate([d, r * refine.RADIUS_MM])), centre).numpy()
        dt = moved[:3, 3] - pose[:3, 3].numpy()
        dr = Rotation.from_matrix(moved[:3, :3] @ pose[:3, :3].numpy().T).as_rotvec()
        np.testing.assert_allclose(np.concatenate([dt, dr]), to_origin @ np.concatenate([d, r]),
                                   rtol=1e-5, atol=1e-12)
    assert np.abs(to_origin[:3, 3:]).max() > 100.0  # the lever arm is the centre's 140 mm


def test_a_sharp_looking_optimum_on_a_ridge_is_rejected(patient, projectors, monkeypatch):
    """A wrong optimum sharp on every probed axis is caught along its flattest direction.

    An own extreme view of a smooth body outline (evaluate's seed 5150, extreme view 2): started
    at the truth, a search in plain steps (no level following ridges) ends over 20 mm deeper and
    a little turned, scoring higher than the truth; the schedule's ridge following ends nearer.
    """
    from xray_ct_reg import evaluate, simulate
    cases = evaluate.simulate_test_set(simulate.Simulator(patient), 3, seed=5150,
                                       groups=('extreme',))
    case = list(cases)[2]
    # the project's own views have no scatter: its DRR models none (the scenario is a DRR's)
    config = RegistrationConfig(intensity_refine=True, drr_scatter_to_primary=0.0)

    def refine_from_truth():
        return refine_and_judge(projectors, case['image'], case['intrinsics'], case['pose'],
                                patient.bone_centroid, config)

    followed, *_ = refine_from_truth()
    monkeypatch.setattr(refine, 'LEVEL_FOLLOW_RIDGES', (False, False, False))
    pose, info, accepted, reason = refine_from_truth()
    assert geometry.mtre(pose, case['pose'], patient.targets) > 20.0
    assert (geometry.mtre(followed, case['pose'], patient.targets)
            < geometry.mtre(pose, case['pose'], patient.targets))
    assert info.across_drop >= config.min_sharpness and info.depth_margin > 0.0
    assert info.depth_drop >= config.min_depth_sharpness
    assert info.weak_margin < config.min_weak_sharpness
    assert not accepted and 'flattest direction' in reason


def _heldout_full_view(patient, seed, index):
    """Full view ``index`` of the held-out appearance family's sample ``seed`` (a case dict)."""
    cases = heldout_family.test_set(patient, xray_physics.MaterialProjector(patient.ct),
                                    index + 1, seed=seed, groups=('full',))
    return list(cases)[index]


def _refined_from(projectors, patient, case, start, **settings):
    """``case`` refined from ``start`` and judged by the default gates (``settings`` changed).

    Returns (mTRE mm, RefineInfo, accepted, reason).
    """
    pose, info, accepted, reason = refine_and_judge(
        projectors, case['image'], case['intrinsics'], start, patient.bone_centroid,
        RegistrationConfig(intensity_refine=True, **settings))
    return geometry.mtre(pose, case['pose'], patient.targets), info, accepted, reason


def test_a_close_start_the_coarse_levels_lead_away_from_ends_near_the_truth(
        patient, projectors, monkeypatch):
    """The second search, at the finest level from the start, keeps a view the blur misleads.

    A held-out-family full view (seed 4242, view 23: dark bone, 67 kVp, scatter, a screw or
    wire, a rectangular collimator) started about 10 mm off: the blurred coarse levels lead far
    away and the pose is rejected; the search from the start at the finest level ends near the
    truth, accepted.
    """
    case = _heldout_full_view(patient, seed=4242, index=23)
    start = heldout_family._perturbed(case['pose'], patient.bone_centroid,
                                      np.random.default_rng([23, 7]))
    assert 5.0 < geometry.mtre(start, case['pose'], patient.targets) < 15.0

    error, _, accepted, _ = _refined_from(projectors, patient, case, start)
    assert accepted and error < 2.0
    monkeypatch.setattr(refine, 'FINE_FROM_START_ITERATIONS', 0)  # the coarse-to-fine path only
    error, _, accepted, _ = _refined_from(projectors, patient, case, start)
    assert not accepted and error > 50.0


def test_a_pose_still_rising_in_depth_moves_there_and_is_judged_again(
        patient, projectors, monkeypatch):
    """The depth continuation: a pose whose depth judge still rises 10 mm along the beam.

    A held-out-family full view (seed 2222, view 21) refined from its SCR + PnP start (about
    29 mm off) ends 4 mm off in depth with the similarity still rising along the beam: rejected
    as not converged. Moved there, polished and judged again, it ends within 2 mm, accepted.
    The scenario is one of a DRR without scatter (modelled, the DRR's scatter takes much of the
    depth bias out and the search converges in depth without the continuation).
    """
    from xray_ct_reg.register import Registrar
    case = _heldout_full_view(patient, seed=2222, index=21)
    scr_only = Registrar.from_checkpoint(REPO / 'models' / 'chest_example.pt', patient=patient,
                                         config=RegistrationConfig(intensity_refine=False))
    start = scr_only.register(case['image'], case['intrinsics']).pose
    assert geometry.mtre(start, case['pose'], patient.targets) > 10.0

    error, info, accepted, _ = _refined_from(projectors, patient, case, start,
                                             drr_scatter_to_primary=0.0)
    assert accepted and error < 2.0 and info.depth_margin > 0.0
    monkeypatch.setattr(refine, 'DEPTH_CONTINUATIONS', 0)
    error, info, accepted, reason = _refined_from(projectors, patient, case, start,
                                                  drr_scatter_to_primary=0.0)
    assert not accepted and 'depth along the beam not converged' in reason
    assert info.depth_margin <= 0.0 and error > 3.0


def test_the_drrs_scatter_takes_the_depth_bias_of_scattered_views_out(patient, projectors):
    """A DRR without scatter puts the optimum too deep on scattered views; the default, not.

    Held-out-family full views (scatter 0.3-1.2 of the primary) profiled along the beam through
    the truth: the similarity peaks deeper on average without the DRR's scatter, about at the
    truth with the default one (``refine.SCATTER_TO_PRIMARY``).
    """
    cases = heldout_family.test_set(patient, xray_physics.MaterialProjector(patient.ct), 10,
                                    seed=606, groups=('full',))
    offsets = np.arange(-20.0, 20.1, 2.5)
    peaks = {0.0: [], refine.SCATTER_TO_PRIMARY: []}
    for case in cases:
        for scatter, found in peaks.items():
            profile = refine.depth_profile(projectors[-1], case['image'].astype(float),
                                           case['intrinsics'], case['pose'], offsets,
                                           centre_ct=patient.bone_centroid,
                                           scatter_to_primary=scatter)
            found.append(offsets[int(np.argmax(profile))])
    without, default = np.mean(peaks[0.0]), np.mean(peaks[refine.SCATTER_TO_PRIMARY])
    assert without > 1.0  # too deep: the anatomy drawn too small
    assert abs(default) < 0.5 * without
