"""X-ray -> CT pose: network -> least uncertain points -> RANSAC-PnP -> polish -> gates.

The scene coordinate network predicts, for every pixel at its own resolution, where the pixel's
ray enters and leaves the bone (CT mm) with an uncertainty. The points with the smallest
predicted sigma give 2D-3D correspondences (pixel centre at the network resolution, CT point);
RANSAC-PnP (OpenCV USAC with MAGSAC++ scoring) finds the pose, a Cauchy-weighted Gauss-Newton
on all the points polishes it (``pnp.refine_robust``), the inliers give a covariance, and
quality gates decide whether the pose may be used.

Two modes (``RegistrationConfig.intensity_refine``):

- SCR only: the correspondence gates (``quality_gates``: inlier count, ratio, spread,
  reprojection error) and the pose gates judge the PnP pose.
- With intensity refinement: the PnP pose is only a starting point; it must pass the pose gates
  (a physically possible view), ``refine.refine_pose`` aligns a DRR with the X-ray, and the
  refined pose is judged by the pose gates and the image similarity (``intensity_gates``).

The pose is ``T_imager_ct`` in mm (see ``geometry``); resizing the image changes the
intrinsics, never the pose. A bad pose never raises: the Result says ``accepted=False`` and why.
"""
import argparse
from dataclasses import asdict, dataclass, field, replace
import json
from pathlib import Path
import sys
import time

import cv2
import numpy as np

from xray_ct_reg import geometry, image_io, pnp, refine, settings, stream
from xray_ct_reg import model as scr_model
from xray_ct_reg.gates import inlier_spread, intensity_gates, pose_gates, quality_gates
from xray_ct_reg.settings import setting

# The paper's RANSAC threshold: 20 px on the 1536^2 Cios Fusion detector (0.194 mm pixels).
REFERENCE_FOCAL_PX = geometry.CIOS_FUSION_SDD_MM / geometry.CIOS_FUSION_PIXEL_SPACING_MM


POLARITIES = ('auto', 'bright_bone', 'dark_bone')


@dataclass
class RegistrationConfig:
    """Registration and quality gates (pixel values at the 1536^2 reference detector).

    Every threshold of the registration, with its default, declared once with ``settings.setting``
    (description, limits): the node's parameters, the YAML comments and ``--params-file`` all
    come from here. Pixel thresholds are given at the reference full-resolution detector (focal
    length ``reference_focal_px``, i.e. 1536^2 Cios Fusion) and scaled by fx / reference_focal_px
    for the image at hand, so they mean the same ray angle at any resolution.
    """

    polarity: str = setting(
        'auto', 'image polarity: dark_bone images are inverted first; auto and bright_bone pass '
        'unchanged (the network was trained on both)', choices=POLARITIES, live=True)
    max_correspondences: int = setting(
        4000, 'this many of the entry and exit points with the smallest predicted sigma go to '
        'RANSAC (a rank, not a sigma level: the level shifts with the appearance)',
        limits=(12, 1000000), live=True)
    max_sigma_mm: float = setting(
        0.0, "optional cap: leave out points whose predicted sigma (mm) is above this; 0: none",
        limits=(0.0, 1000.0), live=True)
    seed: int = setting(0, 'seed of the RANSAC sampler (deterministic)',
                        limits=(0, 2**31 - 1), live=True)
    min_correspondences: int = setting(
        12, 'fewer correspondences than this: reject without trying PnP', limits=(6, 100000),
        live=True)
    pnp_method: str = setting(
        'usac_magsac', 'robust PnP solver (pnp.PNP_METHODS)', choices=tuple(pnp.PNP_METHODS),
        live=True)
    ransac_threshold_px: float = setting(
        20.0, "RANSAC inlier threshold (px at the reference detector; the paper's 20 px)",
        limits=(0.1, 500.0), live=True)
    robust_scale_px: float = setting(
        50.0, 'scale of the Cauchy loss of the robust polish after RANSAC (px at the reference '
        'detector; about 2 px of the 64 px network input): errors well above it barely count',
        limits=(0.1, 5000.0), live=True)
    ransac_iterations: int = setting(
        3000, "maximum RANSAC iterations (the paper's 1000; with under 20 % inliers, 3000 make "
        "the pose depend less on the sampler's seed)", limits=(1, 1000000), live=True)
    ransac_confidence: float = setting(
        0.999, 'RANSAC stops early once this confidence of an all-inlier sample is reached',
        limits=(0.5, 1.0), live=True)
    reference_focal_px: float = setting(
        REFERENCE_FOCAL_PX, 'focal length (px) of the detector the pixel thresholds are written '
        'for (1536^2 Cios Fusion)', limits=(1.0, 1e6), live=True)
    min_inliers: int = setting(100, 'gate, SCR only: minimum number of RANSAC inliers',
                               limits=(6, 1000000), live=True)
    min_inlier_ratio: float = setting(
        0.25, 'gate, SCR only: minimum fraction of the correspondences that are inliers',
        limits=(0.0, 1.0), live=True)
    min_inlier_spread: float = setting(
        0.06, 'gate, SCR only: std of the inlier pixels along u and along v, as a fraction of '
        'the image size, must reach this (a pose fitted to a small cluster is ill-conditioned)',
        limits=(0.0, 1.0), live=True)
    max_reprojection_error_px: float = setting(
        8.0, 'gate, SCR only: maximum median inlier reprojection error (px at the reference '
        'detector)', limits=(0.01, 500.0), live=True)
    min_source_distance_mm: float = setting(
        250.0, 'gate: the bone centroid must be at least this far from the X-ray source (mm)',
        limits=(0.0, 5000.0), live=True)
    max_source_distance_mm: float = setting(
        1000.0, 'gate: ... and at most this far (the detector is about 1020 mm away)',
        limits=(0.0, 5000.0), live=True)
    image_margin: float = setting(
        0.25, 'gate: the bone centroid must project inside the image grown by this fraction per '
        'side', limits=(0.0, 10.0), live=True)
    max_angle_from_ap_deg: float = setting(
        75.0, 'gate: maximum angle (deg) between the viewing direction and an AP view of a '
        'supine patient; in-plane roll of the image is not counted', limits=(0.0, 180.0),
        live=True)
    intensity_refine: bool = setting(
        False, 'refine the PnP pose by intensity against a DRR and judge the refined pose by '
        'the intensity gates (min_ncc, min_sharpness, ...) instead of the correspondence gates '
        '(needs the CT)')
    similarity: str = setting(
        'ngf', 'image similarity the intensity refinement maximises and the intensity '
        'gates judge (refine.SIMILARITIES)', choices=tuple(refine.SIMILARITIES), live=True)
    drr_scatter_to_primary: float = setting(
        refine.SCATTER_TO_PRIMARY, 'scatter the intensity refinement adds to its DRRs, as a '
        'fraction of the primary (spread refine.SCATTER_KERNEL_MM on the detector): an X-ray\'s '
        'scatter lowers its contrast behind dense anatomy, and a DRR without it puts the optimum '
        'too deep; 0: none (images without scatter, e.g. DRRs)', limits=(0.0, 5.0), live=True)
    refine_time_budget_s: float = setting(
        60.0, 'time budget of the intensity refinement (s): its fixed schedule takes 0.4-0.8 s on '
        '2 CPU cores; one that cannot finish in time is rejected, never cut short',
        limits=(0.0, 600.0), live=True)
    min_ncc: float = setting(
        0.5, 'gate with intensity_refine: minimum similarity of the X-ray and the DRR at the '
        'refined pose (a floor: its level does not transfer across appearance)',
        limits=(-1.0, 1.0), live=True)
    min_sharpness: float = setting(
        0.035, 'gate with intensity_refine: the refined pose must score this much above every '
        'probe a few mm and degrees away across the beam or turned (refine.SHARPNESS_PROBES), '
        'where the wrong optima of the calibration sets fell short; calibrated on the own and '
        'the held-out appearance families (bench/accuracy.py, bench/heldout_family.py; '
        'docs/REFINEMENT_EXPERIMENTS.md)', limits=(0.0, 1.0), live=True)
    min_depth_sharpness: float = setting(
        0.025, 'gate with intensity_refine: the refined pose must score this much above the '
        'poses refine.DEPTH_SHARPNESS_PROBE_MM towards and away from the source (features '
        'weighted towards where depth shows); it bounds the depth error, the weak direction of '
        'one view; calibrated on the held-out appearance family (bench/heldout_family.py; '
        'docs/REFINEMENT_EXPERIMENTS.md)', limits=(0.0, 1.0), live=True)
    min_weak_sharpness: float = setting(
        0.006, 'gate with intensity_refine: the refined pose must score this much above two '
        'probes refine.WEAK_PROBE away along the direction the similarity is flattest in (from '
        'its curvature; depth with a tilt, mostly), where a wrong pose can look sharp on every '
        'axis, and above where the restarts along the beam end when elsewhere; calibrated on '
        'own views (bench/accuracy.py, bench/depth_bias.py) and raised above a held-out local '
        'view 11.6 mm off that scored 0.0050 above its probes (docs/REFINEMENT_EXPERIMENTS.md)',
        limits=(0.0, 1.0), live=True)
    min_relative_weak_sharpness: float = setting(
        0.022, 'gate with intensity_refine: the drops min_weak_sharpness asks for must also '
        'reach this fraction of the mismatch left at the refined pose (1 - similarity): the worse '
        'the DRR explains the X-ray, the more a flat optimum\'s score reflects appearance rather '
        'than pose; set above a held-out local view 11.8 mm off, in depth, at 0.0205 '
        '(docs/REFINEMENT_EXPERIMENTS.md); 0: off', limits=(0.0, 1.0), live=True)
    min_similarity_evidence: float = setting(
        0.33, 'gate with intensity_refine: minimum of the similarity at the refined pose times '
        'the square root of the exposed fraction: what unrelated images score, and so a wrong '
        'optimum, spreads as one over the square root of the pixels compared, so a small field '
        'needs a higher similarity; calibrated on the held-out appearance family '
        '(bench/heldout_family.py) with the DRR\'s scatter at its default: set above a held-out '
        'extreme view 23.8 mm off at 0.329, below all but two of the accepted poses of eleven '
        'samples (0.322 and 0.327; docs/REFINEMENT_EXPERIMENTS.md); 0: off',
        limits=(0.0, 1.0), live=True)
    min_exposed_fraction: float = setting(
        0.2, 'gate with intensity_refine: minimum fraction of the image that shows anatomy (not '
        'collimated or saturated)', limits=(0.0, 1.0), live=True)

    def __post_init__(self):
        """Refuse settings that are valid alone but not together (ValueError)."""
        for low, high in (('min_source_distance_mm', 'max_source_distance_mm'),
                          ('min_correspondences', 'max_correspondences')):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f'{low} ({getattr(self, low)}) must not exceed {high} '
                                 f'({getattr(self, high)})')


@dataclass
class Result:
    """Outcome of one registration (see docs/INTERFACES.md).

    ``pose`` is T_imager_ct (4x4, mm), or None when no estimate was possible.
    ``reprojection_error_px`` is the median inlier reprojection error in pixels of the input
    image. ``covariance`` is 6x6 in the order x y z rx ry rz (mm, rad): translation of the pose,
    then a small rotation about the imager axes applied on the left. SCR only, it comes from the
    correspondence residuals and treats pixels as independent, so it is optimistic; use it for
    relative confidence, not as a calibrated error bound. With intensity refinement (tracked or
    not) it is the refinement's, sigma^2 (J^T J)^-1 from the similarity's probes (correlations
    between depth and tilt included), whenever the refinement scored a pose, with sigma^2
    widened for neighbouring residuals being correlated (``refine.CORRELATED_RESIDUALS_FACTOR``),
    plus ``refine.DEPTH_MODEL_SIGMA_MM`` along the beam for the bias that appearance the DRR
    does not model puts on depth: on the held-out appearance family 88-99 % of the accepted
    poses' true errors lie inside the 6-dof 95 % bound, on own views 96 %
    (docs/REFINEMENT_EXPERIMENTS.md, twelfth session). ``inlier_spread``
    is the gate's measure of how the inlier pixels cover the image; ``num_candidates`` the
    number of correspondences handed to RANSAC (``inlier_ratio`` is relative to it). With
    intensity refinement, ``scr_pose`` is the PnP start and ``refinement`` the
    ``refine.RefineInfo``.
    """

    pose: np.ndarray | None
    accepted: bool
    reason: str = ''
    inlier_count: int = 0
    inlier_ratio: float = 0.0
    reprojection_error_px: float = float('nan')
    covariance: np.ndarray | None = None
    timings_ms: dict = field(default_factory=dict)
    num_candidates: int = 0
    inlier_spread: float = 0.0
    scr_pose: np.ndarray | None = None
    refinement: refine.RefineInfo | None = None
    tracked: bool = False

    def to_dict(self):
        """JSON-able dict (arrays as nested lists, NaN as None)."""
        data = asdict(self)
        for key in ('pose', 'covariance', 'scr_pose'):
            data[key] = None if data[key] is None else np.asarray(data[key]).tolist()
        return to_jsonable(data)


def to_jsonable(value):
    """Recursively turn numpy scalars/arrays into plain Python values; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------- registrar
def validate_image(image, intrinsics):
    """Check an X-ray for registration; return it as a 2D numpy array or raise ValueError.

    The image must be a non-empty, non-constant 2D numeric array of finite values whose size
    (width x height) equals the intrinsics'. The CLI, replay and the node all check input here.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f'expected a 2D grey X-ray image, got shape {array.shape}')
    if array.size == 0:
        raise ValueError('the X-ray image is empty')
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f'expected a numeric X-ray image, got dtype {array.dtype}')
    if not np.all(np.isfinite(array)):
        raise ValueError('the X-ray image contains NaN or infinite pixels')
    if array.min() == array.max():
        raise ValueError('the X-ray image is blank (every pixel has the same value)')
    if not isinstance(intrinsics, geometry.Intrinsics):
        raise ValueError(f'intrinsics must be a geometry.Intrinsics, got {type(intrinsics)}')
    if (array.shape[1], array.shape[0]) != (intrinsics.width, intrinsics.height):
        raise ValueError(f'image is {array.shape[1]}x{array.shape[0]} px but the intrinsics are '
                         f'for {intrinsics.width}x{intrinsics.height} px')
    return array


def network_size(metadata, model):
    """(width, height) the network was trained at (checkpoint metadata ``image_size``)."""
    size = metadata.get('image_size')
    if size is None:
        raise ValueError('checkpoint metadata lacks the training image size')
    width, height = (size, size) if np.isscalar(size) else size
    if width % model.stride or height % model.stride:
        raise ValueError(f'network size {width}x{height} is not a multiple of {model.stride}')
    return int(width), int(height)


class Registrar:
    """Registers X-ray images to the CT a scene coordinate network was trained for.

    ``patient`` (a ``ct.Patient``) is needed only for intensity refinement (ValueError when
    ``config.intensity_refine`` is set without it); it must be the checkpoint's CT (same
    ct_sha256).
    """

    def __init__(self, model, metadata, patient=None, config=None):
        """Wrap a loaded network and its checkpoint metadata."""
        self.model = model.eval()
        self.metadata = dict(metadata)
        self.config = config or RegistrationConfig()
        expected = self.metadata.get('ct_sha256')
        if patient is not None and expected is not None and patient.ct_sha256 != expected:
            raise ValueError(f'the network was trained for CT {expected[:12]}..., not for '
                             f'{patient.ct_path} ({patient.ct_sha256[:12]}...); train a model '
                             f'for this CT or load the matching CT')
        self.patient = patient
        self.network_size = network_size(self.metadata, self.model)
        self.bone_centroid = self.model.bone_centroid.detach().cpu().numpy().astype(float)
        self.projector = None  # DRR projectors of the CT per refinement level
        if self.config.intensity_refine:
            if patient is None:
                raise ValueError('intensity refinement needs the CT the model was trained for')
            self.projector = refine.level_projectors(patient.ct)

    @classmethod
    def from_checkpoint(cls, path, patient=None, config=None):
        """Load a checkpoint (refusing one trained for another CT than ``patient``'s)."""
        expected = patient.ct_sha256 if patient is not None else None
        network, metadata = scr_model.load_checkpoint(path, expected_ct_sha256=expected)
        return cls(network, metadata, patient=patient, config=config)

    def correspondences(self, prediction, config, shown=None):
        """The least uncertain 2D-3D pairs of a network prediction (batch of one).

        ``shown``: (H, W) bool at the network resolution, the pixels that show the X-ray (not
        the padding of a non-square one); None: all. Returns (points_ct (N, 3) mm, pixels
        (N, 2) at the network resolution): of the entry and exit points (below
        ``config.max_sigma_mm`` when set), the ``config.max_correspondences`` with the smallest
        predicted sigma, least uncertain first.
        """
        width, height = self.network_size
        centres = geometry.pixel_centers(width, height).reshape(-1, 2)
        points, pixels, log_sigmas = [], [], []
        for surface in ('entry', 'exit'):
            points.append(prediction[f'{surface}_mm'][0].detach().cpu().numpy().reshape(-1, 3))
            log_sigmas.append(
                prediction[f'{surface}_log_sigma'][0].detach().cpu().numpy().reshape(-1))
            pixels.append(centres)
        points, pixels = np.concatenate(points).astype(float), np.concatenate(pixels)
        log_sigma = np.concatenate(log_sigmas)
        usable = np.all(np.isfinite(points), axis=1) & np.isfinite(log_sigma)
        if shown is not None:
            usable &= np.tile(shown.reshape(-1), 2)
        if config.max_sigma_mm > 0:
            usable &= log_sigma < np.log(config.max_sigma_mm)
        candidates = np.flatnonzero(usable)
        order = candidates[np.argsort(log_sigma[candidates], kind='stable')]
        keep = order[:config.max_correspondences]
        return points[keep], pixels[keep]

    def register(self, image, intrinsics, prior_pose=None):
        """Register one X-ray; returns a ``Result`` (never raises for a bad pose).

        With ``prior_pose`` (a recent accepted pose of the same imager, e.g. the last frame of a
        fluoroscopy sequence) and intensity refinement, the short tracking schedule
        (``refine.TRACKING_ITERATIONS``) starts from it; when the intensity gates accept, that is
        the result (``tracked`` True), else the frame goes the whole way (network, PnP,
        refinement). Raises ValueError only for invalid input (see ``validate_image``).
        ``self.config`` is read once, so a config swapped in by another thread applies from the
        next image on.
        """
        config = self.config
        start = time.perf_counter()
        timings = {}
        image = validate_image(image, intrinsics)
        if config.polarity == 'dark_bone':  # the network's reference is bright bone
            image = image.max() - image
        rng = np.random.default_rng(config.seed)

        def rejected(reason, **fields):
            timings['total'] = 1e3 * (time.perf_counter() - start)
            return Result(pose=fields.pop('pose', None), accepted=False, reason=reason,
                          timings_ms=timings, **fields)

        if prior_pose is not None and self.projector is not None:
            tick = time.perf_counter()
            pose, info, accepted, _ = refine_and_judge(
                self.projector, image, intrinsics, prior_pose, self.bone_centroid, config,
                refine.TRACKING_ITERATIONS)
            timings['tracking'] = 1e3 * (time.perf_counter() - tick)
            if accepted:
                timings['total'] = 1e3 * (time.perf_counter() - start)
                return Result(pose=pose, accepted=True, refinement=info, tracked=True,
                              covariance=info.covariance, timings_ms=timings,
                              scr_pose=np.asarray(prior_pose, dtype=float))

        tick = time.perf_counter()
        # the network was trained on square views: a non-square X-ray is padded, not stretched
        square, square_intrinsics, (x0, y0) = scr_model.pad_to_square(image, intrinsics)
        small, small_intrinsics = scr_model.resize_for_network(square, square_intrinsics,
                                                               self.network_size)
        try:
            tensor = scr_model.prepare_input(small)
        except ValueError as error:  # validated already: only "no contrast" remains
            return rejected(str(error))
        scale = self.network_size[0] / square.shape[1]
        shown_size = (intrinsics.width * scale, intrinsics.height * scale)  # network px
        shown = None
        if (x0, y0) != (0, 0):
            u, v = geometry.pixel_centers(*self.network_size).transpose(2, 0, 1)
            shown = ((u + 0.5 >= x0 * scale) & (u + 0.5 <= x0 * scale + shown_size[0])
                     & (v + 0.5 >= y0 * scale) & (v + 0.5 <= y0 * scale + shown_size[1]))
        timings['preprocess'] = 1e3 * (time.perf_counter() - tick)

        tick = time.perf_counter()
        with scr_model.one_torch_thread():  # the same bits whatever the machine's cores
            prediction = self.model.predict(tensor)
        timings['network'] = 1e3 * (time.perf_counter() - tick)

        tick = time.perf_counter()
        points, pixels = self.correspondences(prediction, config, shown)
        if len(points) < config.min_correspondences:
            timings['pnp'] = 1e3 * (time.perf_counter() - tick)
            return rejected(f'too few usable correspondences: {len(points)} < '
                            f'{config.min_correspondences}', num_candidates=len(points))
        solution = pnp.solve_pnp(points, pixels, small_intrinsics.K, config, rng)
        timings['pnp'] = 1e3 * (time.perf_counter() - tick)
        if solution is None:
            return rejected('PnP found no pose', num_candidates=len(points))
        pose, inliers = solution

        tick = time.perf_counter()
        pose = pnp.refine_robust(points, pixels, small_intrinsics.K, pose, pnp.scaled_px(
            config.robust_scale_px, small_intrinsics.K, config.reference_focal_px))
        errors = pnp.reprojection_errors(points, pixels, small_intrinsics.K, pose)
        inliers = errors <= pnp.scaled_px(config.ransac_threshold_px, small_intrinsics.K,
                                          config.reference_focal_px)
        covariance = pnp.pose_covariance(points[inliers], pixels[inliers], small_intrinsics.K,
                                         pose)
        to_input_px = intrinsics.K[0, 0] / small_intrinsics.K[0, 0]
        error_px = (float(np.median(errors[inliers])) * to_input_px if inliers.any()
                    else float('inf'))
        timings['polish'] = 1e3 * (time.perf_counter() - tick)
        spread = inlier_spread(pixels[inliers], *shown_size)
        fields = dict(pose=pose, inlier_count=int(inliers.sum()),
                      inlier_ratio=float(inliers.mean()), reprojection_error_px=error_px,
                      covariance=covariance, num_candidates=len(points), inlier_spread=spread)
        if config.intensity_refine:
            # The PnP pose only starts the intensity refinement, but it must be a possible view.
            accepted, reason = pose_gates(pose, intrinsics, self.bone_centroid, config)
            if not accepted:
                return rejected(f'PnP start: {reason}', **fields)
            tick = time.perf_counter()
            fields['scr_pose'] = pose
            fields['pose'], fields['refinement'], accepted, reason = refine_and_judge(
                self.projector, image, intrinsics, pose, self.bone_centroid, config)
            timings['intensity_refine'] = 1e3 * (time.perf_counter() - tick)
            if fields['refinement'].covariance is not None:  # the refined pose's own
                fields['covariance'] = fields['refinement'].covariance
        else:
            accepted, reason = quality_gates(pose, fields['inlier_count'],
                                             fields['inlier_ratio'], error_px, intrinsics,
                                             self.bone_centroid, config, spread=spread)
        if not accepted:
            return rejected(reason, **fields)
        timings['total'] = 1e3 * (time.perf_counter() - start)
        return Result(accepted=True, timings_ms=timings, **fields)


def refine_and_judge(projectors, image, intrinsics, start_pose, bone_centroid, config,
                     iterations=None):
    """Intensity refinement from ``start_pose`` as ``config`` sets it, judged by its gates.

    ``projectors``: ``refine.level_projectors`` of the CT; ``bone_centroid`` (CT mm) is the
    rotation centre and the pose gates' reference. With ``iterations`` (tracking) the start is
    taken as close (``refine_pose``'s ``near_start``). Returns (pose, ``refine.RefineInfo``,
    accepted, reason).
    """
    schedule = {} if iterations is None else {'iterations': iterations, 'near_start': True}
    pose, info = refine.refine_pose(projectors, image, intrinsics, start_pose,
                                    time_budget_s=config.refine_time_budget_s,
                                    centre_ct=bone_centroid, similarity=config.similarity,
                                    scatter_to_primary=config.drr_scatter_to_primary, **schedule)
    accepted, reason = intensity_gates(pose, info, intrinsics, bone_centroid, config)
    return pose, info, accepted, reason


# ----------------------------------------------------------------------------- CLI
def cli_intrinsics(args, image, tags=None):
    """The intrinsics a CLI run uses and where they came from: (Intrinsics, text).

    --intrinsics; else the detector's SDD and pixel spacing, each from its flag (--sdd,
    --pixel-spacing), else from the file's DICOM tags (``tags``, an ``image_io.DetectorTags``),
    else the Cios Fusion's: its whole square detector resized to the image, so a non-square
    image without a pixel spacing is refused (ValueError). The principal point is the image
    centre.
    """
    height, width = image.shape[:2]
    if args.intrinsics:
        return (image_io.read_intrinsics(args.intrinsics, width, height),
                f'K from {args.intrinsics}')
    tags = tags or image_io.DetectorTags()
    sdd_mm, sdd_source = next((value, source) for value, source in (
        (args.sdd, '--sdd'), (tags.sdd_mm, 'DICOM DistanceSourceToDetector'),
        (geometry.CIOS_FUSION_SDD_MM, 'Cios Fusion default')) if value is not None)
    if args.pixel_spacing is not None:
        intrinsics = geometry.Intrinsics.from_carm(sdd_mm, args.pixel_spacing, width, height)
        spacing_source = '--pixel-spacing'
    elif tags.pixel_spacing_mm is not None:
        intrinsics = geometry.Intrinsics.from_carm(sdd_mm, tags.pixel_spacing_mm, width, height)
        spacing_source = 'DICOM ImagerPixelSpacing'
    elif width != height:
        raise ValueError(f'a {width}x{height} image is not the square default detector: give '
                         '--intrinsics or --pixel-spacing')
    else:
        intrinsics = geometry.Intrinsics.from_carm(sdd_mm).resize(width, height)
        spacing_source = 'Cios Fusion detector resized to the image, default'
    return intrinsics, (f'SDD {sdd_mm:g} mm ({sdd_source}), pixel spacing '
                        f'{intrinsics.pixel_spacing_mm:.4g} mm ({spacing_source})')


def cli_config(args):
    """(RegistrationConfig, CT path or None, NodeConfig) of a CLI run: ``--params-file``, flags.

    The parameter file is the node's (``config/registration.yaml``), so the CLI registers
    exactly as the node would; ``--refine`` and ``--ct`` override it. The ``stream.NodeConfig``
    gives the node's tracking rule to the CLI paths that track a sequence. ValueError for a bad
    file or one that sets a parameter the node does not have.
    """
    values = settings.read_node_values(args.params_file)
    config = settings.build(RegistrationConfig, values)
    if args.refine:
        config = replace(config, intensity_refine=True)
    return (config, (args.ct or values.get('ct_path') or None),
            settings.build(stream.NodeConfig, values))


def _frame_argument(text):
    """--frame: a frame's index or ``image_io.ALL_FRAMES``."""
    if text == image_io.ALL_FRAMES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frame index or '{image_io.ALL_FRAMES}', "
                                         f'got {text!r}') from None


def add_register_arguments(parser):
    """Arguments of ``xray-ct-reg register``."""
    parser.add_argument('image', help='X-ray image: PNG/TIFF (mono8/16), .npy, .nii(.gz), .mha, '
                                      'DICOM')
    parser.add_argument('--frame', type=_frame_argument, default=None,
                        help='the frame of a multi-frame DICOM (a fluoroscopy run) to register, '
                             f'or {image_io.ALL_FRAMES!r}: every frame in order, each tracked from '
                             'the last accepted pose while fresh (tracking_max_age_s by the '
                             "run's FrameTime; without it, from the frame before only)")
    parser.add_argument('--model', required=True, help='checkpoint (.pt) trained for the CT')
    parser.add_argument('--intrinsics', help='JSON with K (3x3), width, height, sdd_mm')
    parser.add_argument('--sdd', type=float, default=None,
                        help='source-to-detector distance (mm) when no --intrinsics; default: '
                             "a DICOM file's DistanceSourceToDetector, else "
                             f'{geometry.CIOS_FUSION_SDD_MM:g} (Cios Fusion)')
    parser.add_argument('--pixel-spacing', type=float, default=None,
                        help="detector pixel spacing (mm) of the image; default: a DICOM file's "
                             'ImagerPixelSpacing, else the Cios Fusion detector (1536 px x '
                             '0.194 mm) resampled to the image size')
    parser.add_argument('--ct', help="the model's CT (file, DICOM folder or 'example'); needed "
                                     'for --overlay and --refine')
    parser.add_argument('--overlay', help='write the overlay (bone outline on the X-ray) here')
    parser.add_argument('--refine', action='store_true', help='intensity refinement (needs --ct)')
    settings.add_params_file_argument(parser)
    parser.add_argument('--json', action='store_true', help='print the Result as JSON')


def format_result(result):
    """Human-readable lines for a Result."""
    verdict = 'ACCEPTED' if result.accepted else f'REJECTED: {result.reason}'
    lines = [verdict]
    if result.pose is not None:
        quaternion, translation = geometry.pose_to_quaternion(result.pose)
        lines.append('T_imager_ct translation (mm): ' + ' '.join(f'{v:.2f}' for v in translation))
        lines.append('rotation quaternion (x y z w): ' + ' '.join(f'{v:.5f}' for v in quaternion))
    lines.append(f'inliers {result.inlier_count}/{result.num_candidates} correspondences '
                 f'(ratio {result.inlier_ratio:.2f}), median reprojection error '
                 f'{result.reprojection_error_px:.2f} px')
    info = result.refinement
    if info is not None:  # what the intensity gates judged; NaN: too little shown, or no time
        scores = ('not scored' if np.isnan(info.ncc_after) else
                  f'similarity {info.ncc_after:.3f} (start {info.ncc_before:.3f}), drop to '
                  f'the probes across {info.across_drop:.3f} and along the beam '
                  f'{info.depth_drop:.3f}, depth margin {info.depth_margin:.3f}, '
                  f"{'bright' if info.polarity >= 0 else 'dark'}-bone polarity")
        lines.append(f'intensity refinement: {scores}, exposed {info.exposed_fraction:.2f} of '
                     'the image')
    if result.pose is not None and result.covariance is not None:
        sigma = np.sqrt(np.clip(np.diag(result.covariance), 0.0, None))
        source = ('refinement' if info is not None and info.covariance is not None else
                  'correspondences, optimistic')
        turn_deg = np.degrees(sigma[3:].max())
        lines.append(f'1-sigma uncertainty ({source}): imager x y z '
                     + ' '.join(f'{v:.2f}' for v in sigma[:3])
                     + f' mm (z: the optical axis), rotation up to {turn_deg:.2f} deg')
    lines.append('timings (ms): ' + ', '.join(f'{k} {v:.1f}' for k, v in result.timings_ms.items()))
    return lines


def _check_writable_image(path):
    """Raise ValueError unless OpenCV can write an image to ``path`` (folder and extension)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f'overlay folder does not exist: {path.parent}')
    if not cv2.haveImageWriter(str(path)):
        raise ValueError(f'overlay {path}: no image writer for this extension (use .png)')


def _overlay_path(path, index, frames):
    """Where a frame's overlay goes: ``path`` itself, or ``name_<index>.ext`` for a run."""
    path = Path(path)
    return str(path if frames == 1 else path.with_name(f'{path.stem}_{index:03d}{path.suffix}'))


def run_register(args):
    """Register an image file (or every frame of a DICOM run) and print the verdicts.

    Frames of a run are registered in order, each tracked from the last accepted pose while it
    is fresh by the run's frame times (``stream.tracking_start``, the node's rule and settings;
    a run without frame times tracks a frame from the one just before it only). Exit 0 when
    every frame is accepted, 2 when one is rejected, 1 when nothing could be registered (bad
    input, model, CT or overlay path).
    """
    from xray_ct_reg import ct
    try:
        config, ct_path, tracking = cli_config(args)
        if (args.overlay or config.intensity_refine) and not ct_path:
            raise ValueError('--overlay and intensity refinement need --ct (the CT the model was '
                             'trained for)')
        if args.overlay:
            _check_writable_image(args.overlay)
        images = image_io.read_images(args.image, args.frame)
        intrinsics, geometry_source = cli_intrinsics(args, images[0],
                                                     image_io.read_detector_tags(args.image))
        times_s = (image_io.read_frame_times(args.image, len(images))
                   if args.frame == image_io.ALL_FRAMES else None)
        if times_s is None:  # frames taken as tracking_max_age_s apart: only the one before
            times_s = [index * tracking.tracking_max_age_s for index in range(len(images))]
        patient = ct.load_patient(ct_path) if ct_path else None
        registrar = Registrar.from_checkpoint(args.model, patient=patient, config=config)
        results, last_accepted = [], None
        for image, time_s in zip(images, times_s, strict=True):
            stamp_ns = round(time_s * 1e9)
            results.append(registrar.register(image, intrinsics, prior_pose=stream.tracking_start(
                last_accepted, stamp_ns, tracking)))
            if results[-1].accepted:
                last_accepted = (stamp_ns, results[-1].pose)
    except (ValueError, OSError) as error:  # CTError and CheckpointError are ValueErrors
        print(f'error: {error}', file=sys.stderr)
        return 1
    run = args.frame == image_io.ALL_FRAMES
    if not args.json:
        print(f'geometry: {intrinsics.width}x{intrinsics.height} px, {geometry_source}')
    for index, (image, result) in enumerate(zip(images, results, strict=True)):
        if args.overlay:
            from xray_ct_reg import overlay
            verdict = 'accepted' if result.accepted else f'rejected: {result.reason}'
            picture = overlay.draw_overlay(image, result.pose, intrinsics, patient, text=verdict)
            path = _overlay_path(args.overlay, index, len(images))
            if not cv2.imwrite(path, picture):
                print(f'error: could not write the overlay {path}', file=sys.stderr)
                return 1
        if not args.json:
            if run:
                print(f"frame {index}{' (tracked)' if result.tracked else ''}:")
            print('\n'.join(('  ' if run else '') + line for line in format_result(result)))
    if args.json:
        dicts = [{'frame': index, **result.to_dict()} if run else result.to_dict()
                 for index, result in enumerate(results)]
        print(json.dumps(dicts if run else dicts[0], indent=2))
    return 0 if all(result.accepted for result in results) else 2
