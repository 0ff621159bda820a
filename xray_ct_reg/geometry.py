"""The one place where xray_ct_reg's geometric conventions live.

Conventions (see DESIGN.md):

* Millimetres everywhere in the core. Metres appear only at the ROS boundary.
* CT coordinates are the CT's physical (LPS) space as SimpleITK reads it.
* The imager frame follows REP 103 optical conventions: origin at the X-ray source, +z towards
  the detector centre, +x along detector columns (increasing u), +y along detector rows
  (increasing v).
* Intrinsics are a pinhole K (pixels) with fx = fy = source-to-detector distance / pixel
  spacing. Pixel centres sit at integer (u, v), as in OpenCV. A crop or resize changes K, never
  the pose.
* A pose is the 4x4 rigid transform ``T_imager_ct`` that maps CT points into the imager frame.
* Metrics follow the paper: mTRE (mean target registration error, mm), projected distance on the
  detector (mm), gross failure when mTRE > 10 mm, percentiles 25/50/95.
"""
from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial.transform import Rotation

GROSS_FAILURE_MM = 10.0

# Siemens Cios Fusion, the geometry used by the paper's code.
CIOS_FUSION_SDD_MM = 1020.0
CIOS_FUSION_PIXELS = 1536
CIOS_FUSION_PIXEL_SPACING_MM = 0.194
# Source to rotation centre (isocentre) of the C-arm, used by the pose sampler.
CIOS_FUSION_SOURCE_TO_ISOCENTER_MM = 620.0

# Rotation of an antero-posterior (AP) view of a supine patient: rows are the imager axes
# written in CT (LPS) coordinates. x (columns) -> patient right, y (rows) -> inferior,
# z (source -> detector) -> anterior. The source is under the table, the detector above.
R_IMAGER_CT_AP = np.array([[-1.0, 0.0, 0.0],
                           [0.0, 0.0, -1.0],
                           [0.0, -1.0, 0.0]])


# ----------------------------------------------------------------------------- rigid poses
def make_pose(rotation, translation):
    """Build a 4x4 pose from a 3x3 rotation matrix and a translation (mm)."""
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(rotation, dtype=float)
    pose[:3, 3] = np.asarray(translation, dtype=float).reshape(3)
    return pose


def invert_pose(pose):
    """Inverse of a rigid 4x4 pose (exact, no general matrix inverse)."""
    rotation = pose[:3, :3]
    return make_pose(rotation.T, -rotation.T @ pose[:3, 3])


def compose(*poses):
    """Compose poses left to right: compose(A, B) maps x to A @ B @ x."""
    result = np.eye(4)
    for pose in poses:
        result = result @ pose
    return result


def pose_from_rotvec(rotvec, translation):
    """Pose from an axis-angle vector (radians, OpenCV rvec) and a translation."""
    rotation = Rotation.from_rotvec(np.asarray(rotvec, dtype=float).reshape(3)).as_matrix()
    return make_pose(rotation, translation)


def rotation_about(rotvec, centre):
    """The pose that turns by ``rotvec`` (axis-angle, radians) about the point ``centre``."""
    centre = np.asarray(centre, dtype=float).reshape(3)
    return compose(make_pose(np.eye(3), centre), pose_from_rotvec(rotvec, np.zeros(3)),
                   make_pose(np.eye(3), -centre))


def pose_to_rotvec(pose):
    """Split a pose into (rotvec [rad], translation), the OpenCV rvec/tvec pair."""
    return Rotation.from_matrix(pose[:3, :3]).as_rotvec(), pose[:3, 3].copy()


def pose_from_quaternion(quaternion_xyzw, translation):
    """Pose from a unit quaternion in ROS order (x, y, z, w) and a translation."""
    rotation = Rotation.from_quat(np.asarray(quaternion_xyzw, dtype=float)).as_matrix()
    return make_pose(rotation, translation)


def pose_to_quaternion(pose):
    """Split a pose into (quaternion x y z w with w >= 0, translation)."""
    quaternion = Rotation.from_matrix(pose[:3, :3]).as_quat()
    if quaternion[3] < 0:
        quaternion = -quaternion
    return quaternion, pose[:3, 3].copy()


def transform_points(pose, points):
    """Apply a 4x4 pose to (N, 3) points."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points @ pose[:3, :3].T + pose[:3, 3]


def is_rigid(pose, tolerance=1e-6):
    """True when ``pose`` is a finite 4x4 proper rigid transform."""
    pose = np.asarray(pose, dtype=float)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        return False
    rotation = pose[:3, :3]
    return bool(np.allclose(rotation @ rotation.T, np.eye(3), atol=tolerance)
                and abs(np.linalg.det(rotation) - 1.0) < tolerance
                and np.allclose(pose[3], [0, 0, 0, 1], atol=tolerance))


# ----------------------------------------------------------------------------- intrinsics
@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of a C-arm image.

    ``K`` is the 3x3 camera matrix in pixels, ``width`` x ``height`` the image size and
    ``sdd_mm`` the source-to-detector distance, which turns pixels into detector millimetres
    (pixel spacing = sdd / fx).
    """

    K: np.ndarray
    width: int
    height: int
    sdd_mm: float = CIOS_FUSION_SDD_MM

    def __post_init__(self):
        """Validate: finite K with positive focal lengths, positive image size."""
        K = np.asarray(self.K, dtype=float).reshape(3, 3)
        object.__setattr__(self, 'K', K)
        if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1.0:
            raise ValueError(f'invalid intrinsics K (need finite fx, fy > 0, K[2,2] = 1): {K}')
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f'invalid image size {self.width}x{self.height}')
        if not self.sdd_mm > 0:
            raise ValueError(f'invalid source-to-detector distance {self.sdd_mm}')

    @classmethod
    def from_carm(cls, sdd_mm=CIOS_FUSION_SDD_MM, pixel_spacing_mm=CIOS_FUSION_PIXEL_SPACING_MM,
                  width=CIOS_FUSION_PIXELS, height=CIOS_FUSION_PIXELS, principal_point=None):
        """Intrinsics from C-arm geometry; principal point defaults to the detector centre.

        ``pixel_spacing_mm``: one spacing, or (horizontal, vertical) for non-square pixels.
        """
        spacing_x, spacing_y = np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,))
        if not (spacing_x > 0 and spacing_y > 0):
            raise ValueError(f'invalid pixel spacing {pixel_spacing_mm} mm (must be > 0)')
        cx, cy = principal_point if principal_point is not None else (
            (width - 1) / 2.0, (height - 1) / 2.0)
        K = np.array([[sdd_mm / spacing_x, 0.0, cx], [0.0, sdd_mm / spacing_y, cy],
                      [0.0, 0.0, 1.0]])
        return cls(K, int(width), int(height), float(sdd_mm))

    @classmethod
    def from_camera_info(cls, k, width, height, sdd_mm=CIOS_FUSION_SDD_MM):
        """Intrinsics from a sensor_msgs/CameraInfo ``k`` (9 values, row-major)."""
        return cls(np.asarray(k, dtype=float).reshape(3, 3), int(width), int(height),
                   float(sdd_mm))

    @property
    def pixel_spacing_mm(self):
        """Detector pixel spacing (mm) implied by fx and the source-to-detector distance."""
        return self.sdd_mm / self.K[0, 0]

    def crop(self, x0, y0, width, height):
        """Intrinsics of the sub-image whose top-left pixel is (x0, y0)."""
        K = self.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return replace(self, K=K, width=int(width), height=int(height))

    def resize(self, width, height):
        """Intrinsics of the image resampled to ``width`` x ``height`` (pixel-centre exact)."""
        scale_x = width / self.width
        scale_y = height / self.height
        K = self.K.copy()
        K[0, 0] *= scale_x
        K[1, 1] *= scale_y
        K[0, 2] = (K[0, 2] + 0.5) * scale_x - 0.5
        K[1, 2] = (K[1, 2] + 0.5) * scale_y - 0.5
        return replace(self, K=K, width=int(width), height=int(height))

    def equals(self, other, tolerance=1e-9):
        """True when both intrinsics describe the same image geometry."""
        return (self.width == other.width and self.height == other.height
                and np.allclose(self.K, other.K, atol=tolerance)
                and abs(self.sdd_mm - other.sdd_mm) < tolerance)


def default_intrinsics(size=None):
    """Siemens Cios Fusion intrinsics, optionally resampled to ``size`` x ``size`` pixels."""
    intrinsics = Intrinsics.from_carm()
    return intrinsics if size is None else intrinsics.resize(size, size)


# ----------------------------------------------------------------------------- projection
def project_points(pose, K, points_ct):
    """Project (N, 3) CT points to (N, 2) pixels; also return depths along +z (mm)."""
    points_imager = transform_points(pose, points_ct)
    depth = points_imager[:, 2]
    homogeneous = points_imager @ np.asarray(K, dtype=float).T
    with np.errstate(divide='ignore', invalid='ignore'):
        pixels = homogeneous[:, :2] / homogeneous[:, 2:3]
    return pixels, depth


def pixel_centers(width, height):
    """(height, width, 2) array of (u, v) pixel-centre coordinates."""
    u, v = np.meshgrid(np.arange(width, dtype=float), np.arange(height, dtype=float))
    return np.stack([u, v], axis=-1)


def backproject_rays(pose, K, pixels):
    """Rays through (N, 2) pixels, in CT coordinates: (source position (3,), unit dirs (N, 3))."""
    pixels = np.asarray(pixels, dtype=float).reshape(-1, 2)
    homogeneous = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1)
    directions_imager = homogeneous @ np.linalg.inv(np.asarray(K, dtype=float)).T
    rotation = pose[:3, :3]
    directions_ct = directions_imager @ rotation  # R^T d for each row
    directions_ct /= np.linalg.norm(directions_ct, axis=1, keepdims=True)
    source_ct = -rotation.T @ pose[:3, 3]
    return source_ct, directions_ct


# ----------------------------------------------------------------------------- C-arm poses
def carm_pose(isocenter_ct, lao_deg=0.0, cranial_deg=0.0, inplane_deg=0.0,
              offset_mm=(0.0, 0.0, 0.0), source_to_isocenter_mm=CIOS_FUSION_SOURCE_TO_ISOCENTER_MM):
    """T_imager_ct of a C-arm looking at ``isocenter_ct`` from an AP view, then rotated.

    ``lao_deg`` turns about the patient's long axis (LAO > 0, RAO < 0), ``cranial_deg`` about
    the left-right axis (cranial > 0, caudal < 0), ``inplane_deg`` about the beam. The
    isocentre lands on the central ray at ``source_to_isocenter_mm`` from the source, shifted by
    ``offset_mm`` (imager x, y, z).
    """
    carm_rotation = Rotation.from_euler(
        'zxy', [inplane_deg, cranial_deg, lao_deg], degrees=True).as_matrix()
    rotation = carm_rotation @ R_IMAGER_CT_AP
    translation = (np.array([0.0, 0.0, source_to_isocenter_mm]) + np.asarray(offset_mm, float)
                   - rotation @ np.asarray(isocenter_ct, dtype=float))
    return make_pose(rotation, translation)


# ----------------------------------------------------------------------------- metrics
def mtre(pose_estimate, pose_true, targets_ct):
    """Mean target registration error (mm): mean 3D distance of the targets under both poses."""
    difference = transform_points(pose_estimate, targets_ct) - transform_points(pose_true,
                                                                                 targets_ct)
    return float(np.linalg.norm(difference, axis=1).mean())


def projected_distance_mm(pose_estimate, pose_true, targets_ct, intrinsics):
    """Mean projected distance (mPD) of the targets on the detector, in detector mm."""
    estimate, _ = project_points(pose_estimate, intrinsics.K, targets_ct)
    truth, _ = project_points(pose_true, intrinsics.K, targets_ct)
    return float(np.linalg.norm(estimate - truth, axis=1).mean() * intrinsics.pixel_spacing_mm)


def rotation_error_rotvec(pose_estimate, pose_true):
    """Rotation vector (rad) of R_estimate R_true^T: the estimate's rotation error."""
    relative = pose_estimate[:3, :3] @ pose_true[:3, :3].T
    return Rotation.from_matrix(relative).as_rotvec()


def rotation_error_deg(pose_estimate, pose_true):
    """Angle (degrees) of the rotation between two poses."""
    return float(np.degrees(np.linalg.norm(rotation_error_rotvec(pose_estimate, pose_true))))


def translation_error_mm(pose_estimate, pose_true):
    """Distance (mm) between the two poses' translations (imager frame)."""
    return float(np.linalg.norm(pose_estimate[:3, 3] - pose_true[:3, 3]))


def covariance_consistency(pose_estimate, pose_true, covariance):
    """Squared Mahalanobis distance of the pose error under a 6x6 covariance (x y z rx ry rz).

    The error is the translation difference (mm) and the rotation vector (rad) of
    R_estimate R_true^T, the convention of ``Result.covariance``. For a calibrated covariance it
    follows a chi-square law with 6 degrees of freedom: median 5.35, 95 % below 12.59.
    """
    error = np.concatenate([pose_estimate[:3, 3] - pose_true[:3, 3],
                            rotation_error_rotvec(pose_estimate, pose_true)])
    return float(error @ np.linalg.pinv(np.asarray(covariance, dtype=float)) @ error)


def is_gross_failure(mtre_mm):
    """The paper's gross failure criterion: mTRE above 10 mm."""
    return bool(mtre_mm > GROSS_FAILURE_MM)


def summarize(values):
    """Percentile summary of an error list: n, p25, p50, p95, mean, std (NaN when empty)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {'n': 0, 'p25': float('nan'), 'p50': float('nan'), 'p95': float('nan'),
                'mean': float('nan'), 'std': float('nan')}
    p25, p50, p95 = np.percentile(values, [25, 50, 95])
    return {'n': int(values.size), 'p25': float(p25), 'p50': float(p50), 'p95': float(p95),
            'mean': float(values.mean()), 'std': float(values.std())}


def summarize_mtre(mtre_values):
    """Summary of mTRE values plus the gross failure rate (fraction with mTRE > 10 mm)."""
    summary = summarize(mtre_values)
    values = np.asarray(mtre_values, dtype=float)
    summary['gross_failure_rate'] = (float(np.mean(values > GROSS_FAILURE_MM))
                                     if values.size else float('nan'))
    return summary


# ----------------------------------------------------------------------------- self-check CLI
def add_selfcheck_arguments(parser):
    """Arguments of ``xray-ct-reg selfcheck``."""
    parser.add_argument('--size', type=int, default=256, help='image size for the check (px)')


def run_selfcheck(args):
    """Check the conventions numerically and print what was checked; exit 1 on a mismatch."""
    intrinsics = default_intrinsics(args.size)
    isocenter = np.array([10.0, -20.0, 30.0])
    pose = carm_pose(isocenter, lao_deg=20.0, cranial_deg=-10.0, inplane_deg=5.0)
    checks = []
    pixels, depth = project_points(pose, intrinsics.K, isocenter[None])
    centre = np.array([(args.size - 1) / 2.0] * 2)
    checks.append(('isocentre projects to the image centre',
                   np.allclose(pixels[0], centre) and abs(depth[0] - 620.0) < 1e-9))
    source, directions = backproject_rays(pose, intrinsics.K, pixels)
    on_ray = source + directions[0] * np.linalg.norm(isocenter - source)
    checks.append(('back-projected ray passes through the point', np.allclose(on_ray, isocenter)))
    quaternion, translation = pose_to_quaternion(pose)
    checks.append(('quaternion round trip',
                   np.allclose(pose_from_quaternion(quaternion, translation), pose)))
    half = intrinsics.resize(args.size // 2, args.size // 2)
    crop = intrinsics.crop(7, 11, args.size // 2, args.size // 2)
    points = isocenter + np.array([[30.0, -40.0, 25.0]])
    full_pixels, _ = project_points(pose, intrinsics.K, points)
    checks.append(('crop shifts pixels by the crop offset',
                   np.allclose(project_points(pose, crop.K, points)[0], full_pixels - [7, 11])))
    checks.append(('resize scales pixel centres',
                   np.allclose(project_points(pose, half.K, points)[0], (full_pixels + 0.5) / 2
                               - 0.5)))
    checks.append(('mTRE of identical poses is 0', mtre(pose, pose, points) == 0.0))
    failed = 0
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        failed += not ok
    print(f'geometry self-check: {len(checks) - failed}/{len(checks)} passed '
          f'(Cios Fusion SDD {CIOS_FUSION_SDD_MM} mm, {args.size} px, '
          f'{intrinsics.pixel_spacing_mm:.3f} mm/px)')
    return 1 if failed else 0
