"""Tests of the geometric conventions in xray_ct_reg.geometry."""
import numpy as np
import pytest

from xray_ct_reg import geometry as g

RNG = np.random.default_rng(7)


def random_pose(rng):
    """A random rigid pose with a translation of a C-arm's order of magnitude."""
    return g.pose_from_rotvec(rng.normal(size=3), rng.normal(scale=200.0, size=3))


@pytest.mark.parametrize('seed', range(5))
def test_rotvec_and_quaternion_round_trips(seed):
    pose = random_pose(np.random.default_rng(seed))
    rotvec, translation = g.pose_to_rotvec(pose)
    assert np.allclose(g.pose_from_rotvec(rotvec, translation), pose, atol=1e-12)
    quaternion, translation = g.pose_to_quaternion(pose)
    assert quaternion[3] >= 0 and np.isclose(np.linalg.norm(quaternion), 1.0)
    assert np.allclose(g.pose_from_quaternion(quaternion, translation), pose, atol=1e-12)


def test_inverse_and_composition():
    pose_a, pose_b = random_pose(RNG), random_pose(RNG)
    assert np.allclose(g.compose(pose_a, g.invert_pose(pose_a)), np.eye(4), atol=1e-12)
    points = RNG.normal(scale=100, size=(10, 3))
    chained = g.transform_points(pose_a, g.transform_points(pose_b, points))
    assert np.allclose(g.transform_points(g.compose(pose_a, pose_b), points), chained)
    assert g.is_rigid(pose_a)
    assert not g.is_rigid(np.diag([1.0, 1.0, -1.0, 1.0]))


def test_rotation_about_a_point_keeps_it_and_turns_the_rest():
    centre, rotvec = np.array([10.0, -20.0, 300.0]), np.radians([0.0, 0.0, 30.0])
    turn = g.rotation_about(rotvec, centre)
    np.testing.assert_allclose(g.transform_points(turn, centre[None])[0], centre, atol=1e-9)
    moved = g.transform_points(turn, (centre + [10.0, 0.0, 0.0])[None])[0]
    np.testing.assert_allclose(moved - centre, [10.0 * np.cos(np.pi / 6),
                                                10.0 * np.sin(np.pi / 6), 0.0], atol=1e-9)
    assert g.rotation_error_deg(turn, np.eye(4)) == pytest.approx(30.0)


def test_point_projected_then_backprojected_lies_on_its_ray():
    intrinsics = g.default_intrinsics(128)
    pose = g.carm_pose(np.array([5.0, 10.0, -40.0]), lao_deg=30, cranial_deg=-15, inplane_deg=10)
    points = np.array([5.0, 10.0, -40.0]) + RNG.uniform(-80, 80, size=(50, 3))
    pixels, depth = g.project_points(pose, intrinsics.K, points)
    assert np.all(depth > 0)
    source, directions = g.backproject_rays(pose, intrinsics.K, pixels)
    to_points = points - source
    along = np.sum(to_points * directions, axis=1, keepdims=True)
    assert np.allclose(source + along * directions, points, atol=1e-8)


def test_cios_fusion_defaults_and_pixel_spacing():
    intrinsics = g.Intrinsics.from_carm()
    assert intrinsics.width == intrinsics.height == 1536
    assert np.isclose(intrinsics.K[0, 0], 1020.0 / 0.194)
    assert np.isclose(intrinsics.pixel_spacing_mm, 0.194)
    assert np.isclose(intrinsics.K[0, 2], 767.5)
    # resizing the whole detector to 128 px gives 12x larger pixels
    assert np.isclose(intrinsics.resize(128, 128).pixel_spacing_mm, 0.194 * 12)


def test_crop_and_resize_keep_projections_consistent():
    full = g.default_intrinsics()
    pose = g.carm_pose(np.zeros(3), lao_deg=-20)
    points = RNG.uniform(-60, 60, size=(30, 3))
    pixels, _ = g.project_points(pose, full.K, points)
    crop = full.crop(400, 300, 512, 640)
    assert (crop.width, crop.height) == (512, 640)
    assert np.allclose(g.project_points(pose, crop.K, points)[0], pixels - [400, 300])
    small = crop.resize(128, 160)
    expected = (pixels - [400, 300] + 0.5) * [128 / 512, 160 / 640] - 0.5
    assert np.allclose(g.project_points(pose, small.K, points)[0], expected)
    # the whole detector's corner pixel centres map onto the resized corner pixel centres
    corners = np.array([[-0.5, -0.5], [1535.5, 1535.5]])
    scaled = (corners + 0.5) * (128 / 1536) - 0.5
    assert np.allclose(scaled, [[-0.5, -0.5], [127.5, 127.5]])


def test_camera_info_and_invalid_intrinsics():
    k = [1000.0, 0, 255.5, 0, 1000.0, 255.5, 0, 0, 1]
    intrinsics = g.Intrinsics.from_camera_info(k, 512, 512, sdd_mm=1000.0)
    assert np.isclose(intrinsics.pixel_spacing_mm, 1.0)
    with pytest.raises(ValueError):
        g.Intrinsics.from_camera_info([0.0] * 9, 512, 512)
    with pytest.raises(ValueError):
        g.Intrinsics.from_camera_info([np.nan] * 9, 512, 512)
    with pytest.raises(ValueError):
        g.Intrinsics(np.eye(3), 0, 10)


def test_carm_pose_puts_the_isocentre_on_the_central_ray():
    isocentre = np.array([12.0, -30.0, 55.0])
    intrinsics = g.default_intrinsics(256)
    for lao, cranial, inplane in [(0, 0, 0), (45, 0, 0), (0, -30, 15), (-45, 30, -15)]:
        pose = g.carm_pose(isocentre, lao, cranial, inplane)
        pixels, depth = g.project_points(pose, intrinsics.K, isocentre[None])
        assert np.allclose(pixels, [[127.5, 127.5]])
        assert np.isclose(depth[0], g.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM)
        assert g.is_rigid(pose)
    # AP view: the beam runs posterior -> anterior (-y in LPS), rows run head -> feet
    ap = g.carm_pose(isocentre)
    assert np.allclose(ap[2, :3], [0, -1, 0]) and np.allclose(ap[1, :3], [0, 0, -1])
    # a 30 degree LAO turn rotates the beam by 30 degrees
    assert np.isclose(g.rotation_error_deg(g.carm_pose(isocentre, lao_deg=30), ap), 30.0)


def test_metrics_known_values():
    pose = g.carm_pose(np.zeros(3))
    targets = RNG.uniform(-50, 50, size=(8, 3))
    assert g.mtre(pose, pose, targets) == 0.0
    shifted = pose.copy()
    shifted[:3, 3] += [3.0, 4.0, 0.0]
    assert np.isclose(g.mtre(shifted, pose, targets), 5.0)
    assert np.isclose(g.translation_error_mm(shifted, pose), 5.0)
    assert np.isclose(g.rotation_error_deg(shifted, pose), 0.0)
    intrinsics = g.default_intrinsics()
    # a shift parallel to the detector at depth z projects scaled by sdd / z on the detector
    depth = g.transform_points(pose, targets)[:, 2]
    expected = np.mean(5.0 * g.CIOS_FUSION_SDD_MM / depth)
    assert np.isclose(g.projected_distance_mm(shifted, pose, targets, intrinsics), expected)
    assert g.is_gross_failure(10.5) and not g.is_gross_failure(9.9)


def test_summaries():
    summary = g.summarize_mtre([1.0, 2.0, 3.0, 4.0, 20.0])
    assert summary['n'] == 5 and summary['p50'] == 3.0
    assert np.isclose(summary['gross_failure_rate'], 0.2)
    assert np.isclose(summary['mean'], 6.0)
    assert np.isnan(g.summarize([])['p50'])


def test_covariance_consistency_follows_chi_square_for_a_calibrated_covariance():
    """Errors drawn from the covariance itself: median 5.35 (6 dof); a 4x too small one: 21."""
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(7)
    truth = g.pose_from_rotvec([0.2, -0.4, 0.1], [10.0, -20.0, 700.0])
    mixing = rng.normal(size=(6, 6)) * np.array([0.5, 0.5, 2.0, 0.003, 0.003, 0.002])[:, None]
    covariance = mixing @ mixing.T
    values, optimistic = [], []
    for error in rng.multivariate_normal(np.zeros(6), covariance, size=4000):
        estimate = g.make_pose(Rotation.from_rotvec(error[3:]).as_matrix() @ truth[:3, :3],
                               truth[:3, 3] + error[:3])
        values.append(g.covariance_consistency(estimate, truth, covariance))
        optimistic.append(g.covariance_consistency(estimate, truth, covariance / 4.0))
    assert np.median(values) == pytest.approx(5.35, rel=0.06)
    assert np.mean(np.array(values) < 12.59) == pytest.approx(0.95, abs=0.015)
    assert np.median(optimistic) == pytest.approx(4 * 5.35, rel=0.06)
