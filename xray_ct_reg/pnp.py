"""2D-3D pose estimation: robust PnP solvers by name, a robust polish, covariance.

``PNP_METHODS`` maps a name to a robust solver (``RegistrationConfig.pnp_method`` picks one):

* ``usac_magsac`` (default): OpenCV USAC with MAGSAC++ scoring; robust to the large outlier
  fractions of a scene coordinate network. No local optimisation inside USAC: the
  polish that follows (``refine_robust``) does that job (with sigma-consensus, medians over 60
  own views per group and 5 seeds were within 0.8 mm of these, at 1.4x the time, measured
  before the polish was robust);
* ``ransac_sqpnp``: classic RANSAC with the SQPnP minimal solver;
* ``ransac_epnp``: classic RANSAC with EPnP (the paper's ``cv2.solvePnPRansac`` default).

Every solver is seeded, so the same correspondences give the same pose. The pose is
``T_imager_ct`` (mm); pixel thresholds are in pixels of the camera ``K`` at hand
(:func:`scaled_px` converts a threshold written for the reference detector).
"""
import cv2
import numpy as np

from xray_ct_reg import geometry

# Gauss-Newton steps of refine_robust. Reweighting converges linearly: on 30 own full views the
# pose after 8 steps was within 1.2 mm of its limit, after 20 within 0.01 mm (14 ms, 4000 points).
ROBUST_ITERATIONS = 20


def scaled_px(reference_px, K, reference_focal_px):
    """A pixel threshold written for a detector of focal ``reference_focal_px``, in px of ``K``."""
    return float(reference_px) * float(np.asarray(K)[0, 0]) / float(reference_focal_px)


def _usac_magsac(points_ct, pixels, K, threshold_px, iterations, confidence, seed):
    """OpenCV USAC: MAGSAC++ score, no local optimisation, uniform sampler."""
    params = cv2.UsacParams()
    params.threshold = threshold_px
    params.maxIterations = int(iterations)
    params.confidence = float(confidence)
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_NULL
    params.randomGeneratorState = seed
    ok, _, rvec, tvec, inliers = cv2.solvePnPRansac(points_ct, pixels, K, None, params=params)
    return ok, rvec, tvec, inliers


def _classic_ransac(minimal_solver):
    """Classic OpenCV RANSAC around ``minimal_solver`` (a cv2.SOLVEPNP_* flag)."""
    def solve(points_ct, pixels, K, threshold_px, iterations, confidence, seed):
        cv2.setRNGSeed(seed)
        return cv2.solvePnPRansac(points_ct, pixels, K, None, iterationsCount=int(iterations),
                                  reprojectionError=threshold_px, confidence=float(confidence),
                                  flags=minimal_solver)
    return solve


# name -> solver(points_ct, pixels, K, threshold_px, iterations, confidence, seed)
#         returning OpenCV's (ok, rvec, tvec, inlier indices)
PNP_METHODS = {
    'usac_magsac': _usac_magsac,
    'ransac_sqpnp': _classic_ransac(cv2.SOLVEPNP_SQPNP),
    'ransac_epnp': _classic_ransac(cv2.SOLVEPNP_EPNP),
}


def solve_pnp(points_ct, pixels, K, config, rng):
    """Robust pose from 2D-3D correspondences with ``config.pnp_method``.

    ``points_ct`` (N, 3) mm, ``pixels`` (N, 2) at the resolution of ``K``; ``config`` a
    ``register.RegistrationConfig`` (method, threshold at the reference detector, iterations,
    confidence); ``rng`` (numpy Generator) seeds the sampler. Returns (pose T_imager_ct,
    inlier mask (N,) bool), or None when no pose is found.
    """
    points_ct = np.ascontiguousarray(points_ct, dtype=np.float64).reshape(-1, 3)
    pixels = np.ascontiguousarray(pixels, dtype=np.float64).reshape(-1, 2)
    if len(points_ct) < 6 or len(points_ct) != len(pixels):
        return None
    solver = PNP_METHODS[config.pnp_method]
    threshold = scaled_px(config.ransac_threshold_px, K, config.reference_focal_px)
    try:
        ok, rvec, tvec, inliers = solver(
            points_ct, pixels, np.asarray(K, dtype=np.float64).copy(), threshold,
            config.ransac_iterations, config.ransac_confidence, int(rng.integers(1, 2**31 - 1)))
    except cv2.error:
        return None
    if not ok or inliers is None or len(inliers) == 0:
        return None
    pose = geometry.pose_from_rotvec(rvec.ravel(), tvec.ravel())
    if not geometry.is_rigid(pose, tolerance=1e-5):
        return None
    mask = np.zeros(len(points_ct), dtype=bool)
    mask[np.asarray(inliers).ravel()] = True
    return pose, mask


def reprojection_errors(points_ct, pixels, K, pose):
    """Per-correspondence reprojection error (px at the resolution of ``K``); inf behind source."""
    projected, depth = geometry.project_points(pose, K, points_ct)
    errors = np.linalg.norm(projected - np.asarray(pixels, dtype=float).reshape(-1, 2), axis=1)
    return np.where(depth > 0, errors, np.inf)


def _projection_jacobian(points_ct, K, pose):
    """(2N, 6) Jacobian of the projected pixels w.r.t. (dt, drot), pose = [exp(drot) R, t + dt]."""
    rotated = points_ct @ pose[:3, :3].T
    x, y, z = (rotated + pose[:3, 3]).T
    rx, ry, rz = rotated.T
    du_dx, dv_dy = K[0, 0] / z, K[1, 1] / z  # d(u, v) / d(camera point), non-zero entries
    du_dz, dv_dz = -du_dx * x / z, -dv_dy * y / z
    zeros = np.zeros_like(z)
    # d(camera point) / d(drot) = -[rotated]_x, and a^T (-[r]_x) = (r x a)^T
    d_u = [du_dx, zeros, du_dz, ry * du_dz, rz * du_dx - rx * du_dz, -ry * du_dx]
    d_v = [zeros, dv_dy, dv_dz, ry * dv_dz - rz * dv_dy, -rx * dv_dz, rx * dv_dy]
    return np.stack([np.stack(d_u, axis=1), np.stack(d_v, axis=1)], axis=1).reshape(-1, 6)


def pose_covariance(points_ct, pixels, K, pose):
    """6x6 pose covariance (x y z rx ry rz; mm, rad) = s^2 (J^T J)^-1 from the residuals.

    s^2 = sum of squared pixel residuals / (2N - 6). Symmetric positive semi-definite (small
    negative eigenvalues from round-off are clipped).
    """
    points_ct = np.asarray(points_ct, dtype=float).reshape(-1, 3)
    pixels = np.asarray(pixels, dtype=float).reshape(-1, 2)
    projected, _ = geometry.project_points(pose, K, points_ct)
    residuals = (projected - pixels).ravel()
    dof = max(residuals.size - 6, 1)
    variance = float(residuals @ residuals) / dof
    jacobian = _projection_jacobian(points_ct, np.asarray(K, dtype=float), pose)
    covariance = variance * np.linalg.pinv(jacobian.T @ jacobian)
    covariance = 0.5 * (covariance + covariance.T)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return (eigenvectors * np.clip(eigenvalues, 0.0, None)) @ eigenvectors.T


def refine_robust(points_ct, pixels, K, pose, scale_px, iterations=ROBUST_ITERATIONS):
    """Polish ``pose`` on every correspondence, each weighted by a Cauchy loss of its error.

    Iteratively reweighted Gauss-Newton: a correspondence with reprojection error e (px of
    ``K``) weighs 1 / (1 + (e / ``scale_px``)^2), so outliers fade instead of being cut at a
    threshold; points behind the source do not count. Unlike a least-squares polish of RANSAC's
    inlier set, the result hardly depends on which set the sampler's seed picked (60 own full
    views: 10 mm median spread between seeds -> 0). At most ``iterations`` steps; stops earlier
    once a step moves less than 1e-9 (mm, rad). Returns the polished pose (the start if no step
    is possible).
    """
    points_ct = np.asarray(points_ct, dtype=float).reshape(-1, 3)
    pixels = np.asarray(pixels, dtype=float).reshape(-1, 2)
    K = np.asarray(K, dtype=float)
    for _ in range(iterations):
        projected, depth = geometry.project_points(pose, K, points_ct)
        front = depth > 0
        if np.count_nonzero(front) < 6:
            break
        residuals = projected[front] - pixels[front]
        weights = np.repeat(1.0 / (1.0 + (np.linalg.norm(residuals, axis=1) / scale_px) ** 2), 2)
        jacobian = _projection_jacobian(points_ct[front], K, pose)
        normal = jacobian.T @ (jacobian * weights[:, None])
        step = -np.linalg.lstsq(normal, jacobian.T @ (weights * residuals.ravel()), rcond=None)[0]
        if not np.all(np.isfinite(step)):
            break
        pose = geometry.make_pose(geometry.pose_from_rotvec(step[3:], np.zeros(3))[:3, :3]
                                  @ pose[:3, :3], pose[:3, 3] + step[:3])
        if np.abs(step).max() < 1e-9:
            break
    return pose
