"""Intensity-based refinement of a pose against a DRR of the CT.

Maximises a similarity (``SIMILARITIES``: normalised gradient fields by default, gradient
correlation, or NCC of the intensities) between the X-ray and a DRR rendered with
``drr.DRRProjector.render_by_slices`` over a 6-dof perturbation of the pose, coarse to fine, by
Levenberg-Marquardt. Each similarity is a mean of dot products of unit feature vectors
(``FEATURES``), so maximising one is least squares on the feature residual
(``|f(DRR) - f(X-ray)|^2 = 2 - 2 * similarity``); its Jacobian over the 6 parameters comes from
finite differences (no autograd: forward ones at the coarse level, central ones at the 64 px
levels, which also stretch a good step along the cost's narrow ridges: ``LEVEL_FOLLOW_RIDGES``)
and is then carried along by Broyden updates for a few iterations. The perturbation rotates
about a centre point in the middle of the anatomy in view (the bone centroid, or for a crop of
the detector that does not show it, a point at its depth on the ray through the exposed pixels)
so that rotation and translation are decoupled there: ``p' = exp([dr]) (p - c) + c + dt`` in
the imager frame, with ``dr`` scaled by ``RADIUS_MM`` so one unit of either parameter moves the
bone by about a millimetre. Each level renders from a volume of its voxel size (coarser at the
coarser level, resampled once per CT). The levels (``LEVEL_SIZES_PX``): 32 px blurred for a
wide basin, 64 px lightly blurred for a smooth cost to converge on, then a short unblurred
polish at 64 px, the level whose similarity the gates read. A second, short search at that
finest level starts from the start pose itself; the better of the two goes on (the blurred levels
can lead away from a close start on unfamiliar appearance: ``FINE_FROM_START_ITERATIONS``).

The schedule is fixed (iteration counts, not wall-clock stopping), so a result never depends on
the machine's load; a refinement that cannot finish in its time budget reports ``finished`` False
and the registrar rejects the frame.

Only exposed pixels count (``exposed_mask``): collimator shutters and detector saturation give
flat regions at an end of the grey range that carry no anatomy. The coarse level's blur is taken
over exposed pixels only, so a shutter edge does not bleed in.

The DRR compared is the line integral plus a model of scatter (``drr.with_scatter``,
``SCATTER_TO_PRIMARY``): scatter lowers an X-ray's contrast behind dense anatomy smoothly, and
without it the similarity's optimum sits deeper than the truth on scattered views.

Polarity: the DRR is a line integral (bright bone). X-rays come in either polarity, so both
signs take a few iterations at the coarsest level and the better one goes on. After the levels a
line search along the beam through the centre (the weak direction of one view) and a polish;
then probes a few mm and degrees away in every direction, depth along that beam, measure how
sharp the optimum is (``RefineInfo.across_drop`` and ``depth_drop``):
relative evidence that transfers across appearance, where the similarity's level does not.
The depth probes are judged with the features weighted by each pixel's distance from the focus
of expansion (``_expansion_weight``): moving along the beam scales the image about it, so the
middle of the image, which does not move, would otherwise dilute the drop (on the held-out
family's blurred, scattered appearance the plain drop 10 mm away was a third of our own views').
Probes see only the neighbourhood, so short restarts along the beam on either side check that
no optimum as good lies a little farther (``RefineInfo.rival_margin``).
"""
from dataclasses import dataclass, replace
import math
import time

import cv2
import numpy as np
import torch

from xray_ct_reg import drr, geometry, model
from xray_ct_reg.appearance import gaussian_blur

NAN = float('nan')
# Lever arm (mm) that turns rotation parameters into millimetre-like units.
RADIUS_MM = 100.0
# Levenberg-Marquardt: finite-difference step per parameter (mm-like units), start damping,
# the largest step (mm-like units) and the damping tries per iteration.
JACOBIAN_STEP = 0.5
LM_DAMPING = 1e-3
LM_MAX_STEP = 20.0
LM_TRIES = 3
# Iterations a Jacobian serves (kept current by Broyden updates) before it is recomputed.
JACOBIAN_REFRESH = 3
# At a level that follows ridges (``LEVEL_FOLLOW_RIDGES``), the most times a step that lowered
# the cost is doubled while the cost keeps falling.
LM_EXTRAPOLATIONS = 4
# Along the beam is the weakest direction of a single view. After the levels, the pose is
# searched at these offsets (mm) along the beam and polished with POLISH_ITERATIONS at the finest
# level.
DEPTH_SEARCH_MM = (-24.0, -12.0, 0.0, 12.0, 24.0)
POLISH_ITERATIONS = 2
# Consistency across starts: after the schedule, short refinements restart this far (mm) along
# the beam on either side and run RESTART_ITERATIONS at the finest level. One that ends more
# than RIVAL_DISTANCE (mm-like units) away is a rival optimum (``RefineInfo.rival_margin``):
# the gates ask the pose to beat it by ``min_weak_sharpness``, as they ask of the probes along
# the flattest direction; the sharpness probes only see the neighbourhood.
RESTART_DEPTHS_MM = (-12.0, 12.0)
RESTART_ITERATIONS = 4
RIVAL_DISTANCE = 5.0
# A second search straight from the start: this many LM iterations at the finest level only.
# The better of it and the coarse-to-fine path goes on to the depth search (not from a close
# start). On held-out appearance the blurred coarse levels can lead away from a start a few mm
# off (docs/REFINEMENT_EXPERIMENTS.md): measured on held-out full views from their SCR starts,
# 87 of 120 accepted (seeds 77031 4242 31337) and 79 (1111 2222 3333), none > 10 mm; 8
# iterations gave 86 and 76, and one sample's local view accepted 11.4 mm off that 12 reject.
# Without the search, 82 and 70 (under the flattest-direction floor before, 0.005). LM stops
# once no step lowers the cost, so the 4 iterations over 8 cost no measurable time.
FINE_FROM_START_ITERATIONS = 12
# Where the depth judge still rises ``DEPTH_PROBE_MM`` along the beam from the refined pose
# (``RefineInfo.depth_margin`` <= 0: not converged in depth), the pose moves there and is
# polished (``POLISH_ITERATIONS``) and judged again, at most this many times, while that raises
# the similarity. Not from a close start. Measured from the SCR starts: held-out full views
# 87 -> 88 of 120 and 79 -> 80, set D's 104 -> 105 of 160, a new sample's 95 -> 102 of 240 (one
# of them a local view 12.2 mm off, which ``min_relative_weak_sharpness`` rejects); four other
# samples unchanged. It acts only on frames it can help (depth_margin <= 0 is a rejection).
DEPTH_CONTINUATIONS = 2
# LM iterations both image polarities take at the coarsest level before the better one goes on.
POLARITY_TRIAL_ITERATIONS = 2
# Iterations per level when tracking from a recent pose (``Registrar.register(prior_pose=)``);
# the unblurred last level only scores the result for the gates (measured from a prior 0.6 deg
# / 1.2 mm off 20 own full views: as accurate as (1, 1, 1), 0.47 against 0.52 mm, and
# about 35 ms faster per frame).
TRACKING_ITERATIONS = (1, 2, 0)
# Probes of the optimum's sharpness: (axis, offset) in mm-like units. Axes 0-2 translate
# across the beam and along it (depth, through the rotation centre: the image's middle, not the
# optical axis, which for a crop of the detector lies outside it), 3-5 rotate about imager x, y,
# z. Depth is probed farther, being the weak direction.
DEPTH_PROBE_MM = 10.0
# The depth part of the sharpness is judged farther still. A move along the beam shifts the
# image only by (distance from the focus of expansion) / depth of it: 10 mm moves features
# 100 mm from the focus about 1.4 mm at 700 mm, a third of what the 4 mm probes across the beam
# move them, so at 10 mm the 0.02 drop asked of every probe held true depths to a stricter
# standard than the other axes (at the truth, 36 of 120 held-out full views failed the
# sharpness, on depth: finding 2 of docs/REFINEMENT_EXPERIMENTS.md). The depth offset stays
# bounded by the 10 mm probes: the similarity must peak between them (``depth_margin`` > 0),
# which for a peak symmetric about the true depth puts the pose within 5 mm of it. Measured on
# held-out full views (bench/heldout_family.py): 46 -> 62 of 120 accepted (seeds 77031 4242
# 31337; 12 mm: 55, 20 mm: 62) and 43 -> 48 of 120 (seeds 1111 2222 3333), none > 10 mm; own
# views 46 -> 49 of 60. Its drop (``RefineInfo.depth_drop``) has a floor of its own,
# ``min_depth_sharpness``, below the one across the beam: on the calibration sets every wrong
# optimum that passed the other gates scored within ``min_sharpness`` of a probe across the beam
# or turned; the depth floor bounds the depth error (a check-set local view 10.7 mm off drops
# 0.020 along the beam; docs/REFINEMENT_EXPERIMENTS.md).
DEPTH_SHARPNESS_PROBE_MM = 16.0
SHARPNESS_PROBES = tuple((axis, sign * size) for axis, size in
                         ((0, 4.0), (1, 4.0), (2, DEPTH_PROBE_MM), (3, 5.0), (4, 5.0), (5, 5.0))
                         for sign in (-1.0, 1.0))
# The axis probes miss a ridge that couples them (depth with a tilt: a view of a smooth outline
# can be as good 35 mm deeper and a little turned). The probes' residuals give the curvature's
# Gauss-Newton matrix J^T J (central differences, no extra DRR); two more probes this far
# (mm-like units) along its weakest eigenvector measure the drop there
# (``RefineInfo.weak_margin``).
WEAK_PROBE = 10.0
# The covariance sigma^2 (J^T J)^-1 counts every feature residual as independent, but
# neighbouring ones are correlated (gradients, interpolation, smooth anatomy), so it is too
# narrow by about this factor in variance: own views (bench/accuracy.py, seed 20231001, 40
# accepted) had a median squared Mahalanobis distance of 28.2 where a calibrated covariance gives
# 5.35 (chi-square, 6 dof). Checked on another seed (evaluate --seed 5150): see the README.
CORRELATED_RESIDUALS_FACTOR = 5.3
# The curvature sees the image's noise, not what the DRR does not model (scatter, a LUT, a
# table): on a real X-ray that biases the optimum, mostly along the beam, the weak direction of
# one view. The published covariance adds this standard deviation (mm) along the beam. Measured
# over the accepted poses of the scratch harness's held-out samples C-H, the share of true
# errors inside the 6-dof 95 % bound was 69-90 % without it, 88-96 % with 1.5 mm and 89-97 %
# with 2 mm; checked on A, B and three fresh samples (80-90 % -> 92-99 %) and on own views
# (90 -> 96 %). docs/REFINEMENT_EXPERIMENTS.md, twelfth session.
DEPTH_MODEL_SIGMA_MM = 1.5
# exposed_mask: window (px), largest local std of a flat region and how close to either end of
# the (robust) grey range its level must be, as fractions of that range.
FLAT_WINDOW_PX = 5
FLAT_MAX_STD = 0.02
FLAT_EXTREME = 0.15


@dataclass
class RefineInfo:
    """What a refinement did; ``gates.intensity_gates`` judges it.

    Similarity values (fields ``ncc_*``: of the chosen ``similarity``, one of ``FEATURES``)
    are at the finest level over its exposed pixels (NaN when not computed).
    """

    exposed_fraction: float           # fraction of the finest level that shows anatomy
    ncc_before: float = NAN           # similarity at the start pose (with the chosen polarity)
    ncc_after: float = NAN            # similarity at the returned pose
    depth_margin: float = NAN         # how much the similarity drops DEPTH_PROBE_MM along the
                                      # beam, judged with features weighted towards where depth
                                      # shows (``_expansion_weight``): > 0 where it peaks
    depth_drop: float = NAN           # the same drop DEPTH_SHARPNESS_PROBE_MM along the beam
    across_drop: float = NAN          # ncc_after minus the best SHARPNESS_PROBES probe across
                                      # the beam or turned
    weak_margin: float = NAN          # ncc_after minus the best probe WEAK_PROBE along the
                                      # similarity's flattest direction (J^T J's weakest)
    rival_margin: float = math.inf    # ncc_after minus the best restart that ended elsewhere
                                      # (inf: none did, or not checked: a close start)
    polarity: float = 0.0             # +1: the X-ray is bright-bone like the DRR, -1 inverted
    improved: bool = False            # the returned pose is the refined one (else the start)
    finished: bool = True             # the fixed schedule ran to its end within the budget
    covariance: np.ndarray | None = None  # (6, 6) x y z rx ry rz (mm, rad), imager frame
    iterations: int = 0               # LM iterations taken
    renders: int = 0                  # DRRs rendered
    time_s: float = 0.0               # wall-clock time of the refinement


def exposed_mask(image):
    """Boolean mask of the pixels that show anatomy (False: collimated or saturated).

    A pixel is excluded when its neighbourhood (``FLAT_WINDOW_PX``) is flat (local std below
    ``FLAT_MAX_STD`` of the 0.5-99.5 percentile range) at a level near either end of that range;
    so is every whole row or column at the image border that is flat at such a level (a shutter
    strip thinner than the window). The excluded area is grown by three pixels to cover the
    blurred shutter edge, and exposed islands smaller than 1 % of the image (slivers between
    shutters) are dropped.
    """
    x = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(x, [0.5, 99.5])
    x = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0)

    def flat_at_extreme(mean, std):
        return (std < FLAT_MAX_STD) & ((mean < FLAT_EXTREME) | (mean > 1.0 - FLAT_EXTREME))

    window = (FLAT_WINDOW_PX, FLAT_WINDOW_PX)
    mean = cv2.blur(x, window)
    std = np.sqrt(np.maximum(cv2.blur(x * x, window) - mean * mean, 0.0))
    flat = flat_at_extreme(mean, std)
    for lines in (x, x.T):  # rows, then columns, peeled from both borders while flat
        flat_lines = flat_at_extreme(lines.mean(axis=1), lines.std(axis=1))
        target = flat if lines is x else flat.T
        for order in (range(len(lines)), reversed(range(len(lines)))):
            for index in order:
                if not flat_lines[index]:
                    break
                target[index] = True
    flat = cv2.dilate(flat.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~flat).astype(np.uint8), 4)
    small = [label for label in range(1, count)
             if stats[label, cv2.CC_STAT_AREA] < 0.01 * x.size]
    return ~flat & ~np.isin(labels, small)


def _unit(vector, weight=None):
    """``vector`` minus its mean, times ``weight`` (per element; None: 1), at unit length."""
    centred = vector - vector.mean()
    if weight is not None:
        centred = centred * weight
    return centred / torch.sqrt((centred * centred).sum() + 1e-12)


def _differences(image):
    """Horizontal and vertical differences of an image; of a bool mask, where both ends count."""
    if image.dtype == torch.bool:
        return image[:, 1:] & image[:, :-1], image[1:, :] & image[:-1, :]
    return image[:, 1:] - image[:, :-1], image[1:, :] - image[:-1, :]


def intensity_features(image, mask, weight=None):
    """NCC's feature: the masked intensities as one unit vector.

    ``weight`` (every feature function): None, or per-pixel amplitudes on the image's grid.
    """
    return [_unit(image[mask], None if weight is None else weight[mask])]


def gradient_features(image, mask, weight=None):
    """Gradient correlation's features: horizontal and vertical differences, unit vectors.

    Insensitive to the low-frequency part of an X-ray's appearance (scatter, soft tissue,
    heel effect, a processing LUT's offset) that NCC of the intensities has to match.
    """
    weights = (None, None) if weight is None else (weight[:, :-1], weight[:-1, :])
    return [_unit(difference[valid], None if part is None else part[valid])
            for difference, valid, part in
            zip(_differences(image), _differences(mask), weights, strict=True)]


def normalised_gradient_features(image, mask, weight=None):
    """Normalised gradient fields: each pixel's gradient over sqrt(|gradient|^2 + eps^2).

    ``eps`` is the image's median gradient magnitude over the exposed pixels, so every edge
    counts about the same whatever its contrast: a collimator edge or a metal wire cannot
    outweigh the bones, flat (saturated) areas count nothing, and a monotone processing LUT
    changes little but the magnitudes. One unit vector of both components.
    """
    dx = image[:-1, 1:] - image[:-1, :-1]
    dy = image[1:, :-1] - image[:-1, :-1]
    valid = mask[:-1, :-1] & mask[:-1, 1:] & mask[1:, :-1]
    dx, dy = dx[valid], dy[valid]
    magnitude2 = dx * dx + dy * dy
    scale = torch.rsqrt(magnitude2 + magnitude2.median() + 1e-12)
    return [_unit(torch.cat([dx * scale, dy * scale]),
                  None if weight is None else weight[:-1, :-1][valid].repeat(2))]


# name -> features(image, exposed mask, weight=None): unit vectors whose mean dot product is the
# similarity (1 = identical up to gain and offset)
FEATURES = {'ncc': intensity_features, 'gradient_ncc': gradient_features,
            'ngf': normalised_gradient_features}
SIMILARITIES = tuple(FEATURES)
# The default schedule, coarse to fine: longer image side (px) and LM iterations per level.
# LM stops a level early once no step lowers its cost, so iterations past convergence cost one
# Jacobian. With (10, 4, 2) the search stopped short on the held-out family: at 27 of its 32
# accepted poses the truth scored higher. (10, 8, 10), measured on 120 pooled held-out full views
# (bench/heldout_family.py --seed 77031 4242 31337 --groups full) and checked on 120 others
# (--seed 1111 2222 3333): 32 -> 46 and 31 -> 43 accepted, none > 10 mm, own views unchanged,
# about 60 ms more per frame. (10, 12, 10) accepted a known wrong optimum (23 mm); see
# docs/REFINEMENT_EXPERIMENTS.md.
LEVEL_SIZES_PX = (32, 64, 64)
LEVEL_ITERATIONS = (10, 8, 10)
# Voxel size (mm) of the volume each level renders from (levels alike share one projector).
LEVEL_VOXELS_MM = (4.0, 2.0, 2.0)
# Slices per slab of each level's renderer (``drr.DRRProjector``'s ``slab_slices``): 2 halves
# the warps per DRR; measured on bench/accuracy.py the refined poses stay as accurate.
LEVEL_SLAB_SLICES = (2, 2, 2)
# Gaussian blur (px) of both images before the features, per level: a wider basin at the
# coarse level (gradients of an unblurred 32 px image capture little more than a pixel); a
# smooth cost at 64 px, where unblurred gradients jump with the slab sampling of sub-pixel
# moves; and none in the last polish, whose similarity the gates were calibrated on (blur
# flattens the optimum the sharpness gate measures). Measured from starts 5-15 mm / 2-5 deg off
# 20 full views: own views median 1.0 -> 0.3 mm, held-out family 10.0 -> 5.1 mm, against the
# former two levels (1.5, 0.0 px).
LEVEL_BLUR_PX = (1.5, 0.7, 0.0)
# Per level: whether LM follows the narrow ridges of the cost (a tilt traded for depth, in one
# view) with a Jacobian by central differences and steps stretched along (``LM_EXTRAPOLATIONS``).
# Forward differences are biased by the cost's curvature across the ridge, which outweighs its
# small slope along it: held-out local view 31337/10 stalled 19.9 mm off with the truth uphill
# all the way. And where the residual is large, Gauss-Newton overrates the curvature along the
# ridge: on held-out full view 31337/8 the cost kept falling out to 16 times its step. The
# coarse level's job is the basin, not the optimum: given these steps it walked to poses over
# 100 mm off on held-out views, two of them accepted (docs/REFINEMENT_EXPERIMENTS.md).
LEVEL_FOLLOW_RIDGES = (False, True, True)
# The scatter the DRR models (``drr.with_scatter``): its mean over the primary's, and its spread
# (Gaussian sigma, mm on the detector). A real X-ray's scatter lowers the contrast behind dense
# anatomy and adds smooth gradients that normalised gradient fields count like anatomy where
# the bones' own are weak; a DRR without it put the optimum deeper than the truth on the
# held-out appearance family (scatter-to-primary 0.3-1.2, spread 15-40 mm): started at the
# truth, median +0.9 to +1.8 mm per collimator kind, against +0.2 to +0.6 mm modelling 0.7 at
# 25 mm. 0.35 keeps the project's own views, which have no scatter, at a median 0.5 mm where
# 0.7 took them to 0.6 mm (docs/REFINEMENT_EXPERIMENTS.md, eleventh session).
SCATTER_TO_PRIMARY = 0.35
SCATTER_KERNEL_MM = 25.0


def similarity(name, a, b, mask=None):
    """Similarity ``name`` (FEATURES) of two same-shaped tensors over ``mask`` (bool)."""
    mask = torch.ones_like(a, dtype=torch.bool) if mask is None else mask
    features_a, features_b = FEATURES[name](a, mask), FEATURES[name](b, mask)
    return sum((fa * fb).sum() for fa, fb in zip(features_a, features_b, strict=True)) / len(
        features_a)


def level_projectors(ct, voxels_mm=LEVEL_VOXELS_MM, slab_slices=LEVEL_SLAB_SLICES):
    """A DRR projector per refinement level, from a volume of its voxel size (shared by alike)."""
    keys = list(zip(voxels_mm, slab_slices, strict=True))
    built = {}
    for voxel, slab in keys:
        if (voxel, slab) not in built:
            built[(voxel, slab)] = drr.DRRProjector(ct, voxel_mm=voxel, slab_slices=slab)
    return [built[key] for key in keys]


def _perturbed_pose(pose, delta, centre_imager):
    """T_imager_ct after the perturbation ``delta`` = (dt mm, dr * RADIUS_MM) about the centre."""
    rx, ry, rz = (delta[3:] / RADIUS_MM).tolist()  # plain floats: far fewer tensor ops
    skew = pose.new_tensor([[0.0, -rz, ry], [rz, 0.0, -rx], [-ry, rx, 0.0]])
    angle = math.sqrt(rx * rx + ry * ry + rz * rz)
    rotation = torch.eye(3, dtype=skew.dtype) + (  # Rodrigues: exp of the skew matrix
        skew if angle < 1e-12 else
        np.sin(angle) / angle * skew + (1.0 - np.cos(angle)) / angle ** 2 * (skew @ skew))
    perturbed = torch.eye(4, dtype=pose.dtype)
    perturbed[:3, :3] = rotation @ pose[:3, :3]
    perturbed[:3, 3] = rotation @ (pose[:3, 3] - centre_imager) + centre_imager + delta[:3]
    return perturbed


def _level_size(intrinsics, size):
    """(width, height) of a level whose longer side is ``size`` px (aspect kept)."""
    scale = size / max(intrinsics.width, intrinsics.height)
    return (max(8, int(round(intrinsics.width * scale))),
            max(8, int(round(intrinsics.height * scale))))


class BudgetExceeded(RuntimeError):
    """The refinement's fixed schedule did not finish within its time budget."""


@dataclass
class _Level:
    """One resolution of the refinement: its projector, intrinsics, mask and target features."""

    projector: object
    intrinsics: geometry.Intrinsics
    exposed: torch.Tensor
    blur_px: float
    follow_ridges: bool = False                 # LM steps here as LEVEL_FOLLOW_RIDGES says
    target_features: list = None
    xray: torch.Tensor | None = None            # the X-ray at this level (before any blur)
    feature_weight: torch.Tensor | None = None  # per-pixel feature amplitudes (None: 1)
    scatter_to_primary: float = SCATTER_TO_PRIMARY  # the scatter its DRRs model

    def __post_init__(self):
        self._weight = self.exposed.double()
        if self.blur_px > 0:  # the normalised convolution's denominator, the same every render
            self._blurred_weight = self._blur(self._weight).clamp_min(1e-6)

    def _blur(self, image):
        return gaussian_blur(image[None], self.blur_px, mode='replicate')[0]

    def features(self, image, measure):
        """The level's features of ``image``, first blurred by ``blur_px`` over exposed pixels.

        The blur is a normalised convolution (blur of the masked image over blur of the mask),
        so a collimator edge outside the mask does not bleed into the exposed pixels.
        """
        if self.blur_px > 0:
            image = self._blur(image * self._weight) / self._blurred_weight
        return FEATURES[measure](image, self.exposed, self.feature_weight)

    def weighted(self, feature_weight, measure):
        """This level with per-pixel feature amplitudes ``feature_weight``, X-ray included."""
        level = replace(self, feature_weight=feature_weight, target_features=None)
        level.target_features = level.features(self.xray, measure)
        return level


def _make_level(projector, image, mask, intrinsics, size, measure, blur_px,
                follow_ridges=False, scatter_to_primary=SCATTER_TO_PRIMARY):
    """The X-ray at a level whose longer side is ``size`` px, as a :class:`_Level`.

    A level pixel counts as exposed only when every input pixel under it is.
    """
    level_size = _level_size(intrinsics, size)
    small, small_intrinsics = model.resize_for_network(image, intrinsics, level_size)
    small_mask, _ = model.resize_for_network(mask.astype(np.float32), intrinsics, level_size)
    level = _Level(projector, small_intrinsics, torch.from_numpy(small_mask > 0.999), blur_px,
                   follow_ridges, xray=torch.from_numpy(small.astype(np.float64)),
                   scatter_to_primary=scatter_to_primary)
    level.target_features = level.features(level.xray, measure)
    return level


class _Objective:
    """Feature residuals of a level's DRR at perturbations of a pose; counts renders."""

    def __init__(self, level, pose, centre_imager, polarity, measure, clock, renders=None):
        """An objective about ``pose``; ``renders`` (None: no cache) maps delta -> DRR.

        Objectives of the same pose, centre and level geometry that judge other features share
        one ``renders`` dict, so each of their DRRs is rendered once.
        """
        self.level, self.pose, self.centre = level, pose, centre_imager
        self.polarity, self.measure, self.clock = polarity, measure, clock
        self.renders = renders

    def _render(self, delta):
        key = tuple(delta.tolist())
        if self.renders is not None and key in self.renders:
            return self.renders[key]
        self.clock.tick()
        level = self.level
        line_integral = level.projector.render_by_slices(
            _perturbed_pose(self.pose, delta, self.centre).numpy(), level.intrinsics)
        rendered = torch.from_numpy(drr.with_scatter(
            line_integral, level.scatter_to_primary,
            SCATTER_KERNEL_MM / level.intrinsics.pixel_spacing_mm)).double()
        if self.renders is not None:
            self.renders[key] = rendered
        return rendered

    def residual(self, delta):
        """Residual vector: |r|^2 = 2 - 2 * similarity (polarity applied to the DRR)."""
        features = self.level.features(self.polarity * self._render(delta), self.measure)
        scale = 1.0 / np.sqrt(len(features))
        return torch.cat([(f - t) * scale for f, t in
                          zip(features, self.level.target_features, strict=True)])

    def similarity(self, delta):
        """The similarity at ``delta`` (1 - |r|^2 / 2)."""
        residual = self.residual(delta)
        return float(1.0 - 0.5 * (residual @ residual))


class _Clock:
    """Counts renders and raises BudgetExceeded after the deadline."""

    def __init__(self, deadline):
        self.deadline, self.renders, self.iterations = deadline, 0, 0

    def tick(self):
        if time.perf_counter() > self.deadline:
            raise BudgetExceeded
        self.renders += 1


def _jacobian(objective, delta, residual):
    """Jacobian of the residual over the 6 parameters at ``delta`` (``residual`` there).

    By central differences (12 renders) at a level that follows ridges, else by forward
    differences (6 renders).
    """
    columns = []
    for axis in range(6):
        step = torch.zeros_like(delta)
        step[axis] = JACOBIAN_STEP
        if objective.level.follow_ridges:
            columns.append((objective.residual(delta + step) - objective.residual(delta - step))
                           / (2.0 * JACOBIAN_STEP))
        else:
            columns.append((objective.residual(delta + step) - residual) / JACOBIAN_STEP)
    return torch.stack(columns, dim=1)


def _levenberg_marquardt(objective, delta, iterations):
    """``iterations`` LM iterations from ``delta``; returns (delta, cost = |r|^2).

    The Jacobian comes from finite differences (``_jacobian``) and is then kept up to date by
    Broyden's rank-one update after each accepted step, for at most ``JACOBIAN_REFRESH``
    iterations or until a stale one fails to lower the cost. Damping on the diagonal of J^T J,
    at most ``LM_TRIES`` damped solves per iteration, steps capped at ``LM_MAX_STEP``. At a
    level that follows ridges, a step that lowered the cost is doubled while that lowers it
    further (at most ``LM_EXTRAPOLATIONS`` times, within the cap). It stops early
    only when no try lowers the cost with a fresh Jacobian (the same input always takes the
    same path).
    """
    residual = objective.residual(delta)
    cost = float(residual @ residual)
    damping = LM_DAMPING
    jacobian, age = None, 0
    for _ in range(iterations):
        objective.clock.iterations += 1
        if jacobian is None or age >= JACOBIAN_REFRESH:
            jacobian, age = _jacobian(objective, delta, residual), 0
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ residual
        for _ in range(LM_TRIES):
            damped = normal + damping * torch.diag(torch.diagonal(normal)) + 1e-9 * torch.eye(
                6, dtype=normal.dtype)
            step = -torch.linalg.solve(damped, gradient)
            step = step * min(1.0, LM_MAX_STEP / float(step.norm() + 1e-12))
            trial = objective.residual(delta + step)
            trial_cost = float(trial @ trial)
            if trial_cost < cost:
                if objective.level.follow_ridges:
                    step, trial, trial_cost = _stretched(objective, delta, step, trial,
                                                         trial_cost)
                jacobian = jacobian + torch.outer(trial - residual - jacobian @ step,
                                                  step) / float(step @ step)
                delta, residual, cost = delta + step, trial, trial_cost
                damping = max(damping / 3.0, 1e-7)
                age += 1
                break
            damping *= 5.0
        else:
            if age == 0:
                break
            jacobian = None  # a stale Jacobian failed: a fresh one next iteration
    return delta, cost


def _stretched(objective, delta, step, residual, cost):
    """(step, residual, cost) after doubling ``step`` from ``delta`` while the cost falls."""
    for _ in range(LM_EXTRAPOLATIONS):
        longer = 2.0 * step
        if float(longer.norm()) > LM_MAX_STEP:
            break
        further = objective.residual(delta + longer)
        further_cost = float(further @ further)
        if further_cost >= cost:
            break
        step, residual, cost = longer, further, further_cost
    return step, residual, cost


def _along_beam(pose, centre_imager, offset_mm):
    """``pose`` moved ``offset_mm`` along the ray from the source through the centre."""
    beam = centre_imager / centre_imager.norm()
    moved = pose.clone()
    moved[:3, 3] = moved[:3, 3] + offset_mm * beam
    return moved


def _view_centre(pose, centre_ct, mask, intrinsics):
    """Rotation centre (imager mm) of the refinement: the middle of the anatomy in view.

    ``centre_ct`` under ``pose`` when it projects into the image ``mask`` covers, else (a crop
    of the detector) the point at its depth (z) on the ray through the exposed pixels' centroid
    (the image centre when none is exposed); 620 mm from the source on the optical axis without
    ``centre_ct``.
    """
    if centre_ct is None:
        centre = np.array([0.0, 0.0, geometry.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM])
    else:
        centre = geometry.transform_points(pose, np.reshape(centre_ct, (1, 3)))[0]
    column, row = np.round(intrinsics.K[:2] @ (centre / centre[2])).astype(int)
    if 0 <= row < mask.shape[0] and 0 <= column < mask.shape[1]:
        return centre
    rows, columns = np.nonzero(mask)
    pixel = ([columns.mean(), rows.mean()] if len(rows) else
             [(intrinsics.width - 1) / 2.0, (intrinsics.height - 1) / 2.0])
    return np.linalg.solve(intrinsics.K, [pixel[0], pixel[1], 1.0]) * centre[2]


def _expansion_weight(level, centre_imager):
    """Per-pixel feature amplitudes for judging depth: distance from the focus of expansion.

    Moving the pose along the beam through ``centre_imager`` scales the image about that
    point's projection, so each pixel moves in proportion to its distance from it. Amplitudes
    in proportion to that distance (energies to its square, a matched filter) let the pixels
    that move speak, where the plain similarity lets the unmoving middle dilute a depth error.
    """
    focus = level.intrinsics.K @ centre_imager.numpy()
    height, width = level.exposed.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                          torch.arange(width, dtype=torch.float64), indexing='ij')
    distance = torch.hypot(u - focus[0] / focus[2], v - focus[1] / focus[2])
    return distance / distance.max()


def _beam_frame(centre_imager):
    """(3, 3) orthonormal columns: across the beam through ``centre_imager``, twice, and along it.

    The first is closest to imager x; the last points away from the source.
    """
    beam = centre_imager / centre_imager.norm()
    across = torch.tensor([1.0, 0.0, 0.0], dtype=beam.dtype)
    across = across - (across @ beam) * beam
    across = across / across.norm()
    return torch.stack([across, torch.linalg.cross(beam, across), beam], dim=1)


def refine_pose(projector, image, intrinsics, pose, time_budget_s=float('inf'),
                levels=LEVEL_SIZES_PX, iterations=LEVEL_ITERATIONS, centre_ct=None,
                similarity='ngf', near_start=False, blur_px=None,
                scatter_to_primary=SCATTER_TO_PRIMARY):
    """Refine ``pose`` (T_imager_ct) by the similarity of ``image`` and DRRs, coarse to fine.

    ``projector`` is a ``drr.DRRProjector`` or one per level (``level_projectors``);
    ``levels`` are the longer image sides (px) of the levels, ``iterations`` the LM iterations
    per level, ``blur_px`` the Gaussian blur (px) of both images per level (default: the last
    values of ``LEVEL_BLUR_PX``; beyond its length, its first value and an unblurred finest
    level); ``LEVEL_FOLLOW_RIDGES`` is read the same way. The rotation centre is ``centre_ct``
    (CT mm) when it projects into the image, else on the ray through the middle of the exposed
    pixels at its depth (``_view_centre``).
    ``similarity`` names the measure maximised and reported (FEATURES; the
    ``ncc_*`` fields of the info hold it). ``near_start`` (tracking from a recent pose): the
    polarity is the similarity's sign at the start and there is neither the second search from
    the start at the finest level nor the depth line search and continuation.
    ``scatter_to_primary``: the scatter the DRRs model (``drr.with_scatter``; 0: none).
    Returns (pose, ``RefineInfo``).

    The schedule is fixed, so the result does not depend on the machine's speed or load. When
    it cannot finish within ``time_budget_s`` it stops there and returns the start pose with
    ``finished`` False: a frame to reject, never a truncated optimisation.
    """
    started = time.perf_counter()
    with model.one_torch_thread():
        refined, info, clock = _refine(projector, image, intrinsics, pose, started + time_budget_s,
                                       levels, iterations, centre_ct, similarity, near_start,
                                       blur_px, scatter_to_primary)
    info.iterations, info.renders = clock.iterations, clock.renders
    info.time_s = time.perf_counter() - started
    return refined.numpy(), info


def _refine(projector, image, intrinsics, pose, deadline, levels, iterations, centre_ct,
            similarity, near_start, blurs, scatter_to_primary):
    """``refine_pose``'s work: (refined pose tensor, ``RefineInfo``, its ``_Clock``)."""
    clock = _Clock(deadline)
    projectors = list(projector) if isinstance(projector, (list, tuple)) else [projector] * len(
        levels)
    pose0 = torch.as_tensor(np.asarray(pose, dtype=float), dtype=torch.float64)
    finest_image, finest_input, mask = _finest_input(image, intrinsics, levels[-1])
    centre_imager = torch.as_tensor(_view_centre(pose, centre_ct, mask, finest_input))
    if blurs is None:
        blurs = _per_level(LEVEL_BLUR_PX, len(levels))
    targets = [_make_level(level_projector, finest_image, mask, finest_input, size, similarity,
                           blur, follow, scatter_to_primary)
               for level_projector, size, blur, follow in zip(
                   projectors, levels, blurs, _per_level(LEVEL_FOLLOW_RIDGES, len(levels)),
                   strict=True)]
    info = RefineInfo(exposed_fraction=float(targets[-1].exposed.double().mean()))
    refined = pose0
    if targets[-1].exposed.sum() >= 16:  # else: nothing to compare, the start pose is returned
        try:
            refined, scores = _schedule(targets, pose0, centre_imager, iterations, similarity,
                                        clock, near_start)
            info = replace(info, **scores)
        except BudgetExceeded:
            info.finished = False
    return refined, info, clock


def _per_level(table, count):
    """A per-level setting for ``count`` levels, from one per level of the default schedule.

    ``table``'s last ``count`` values; beyond its length, its first value for all but the
    finest level, which takes its last.
    """
    if count <= len(table):
        return tuple(table[len(table) - count:])
    return (table[0],) * (count - 1) + (table[-1],)


def _finest_input(image, intrinsics, size):
    """The X-ray at the finest level (longer side ``size`` px), its intrinsics, exposed mask.

    The exposed mask is found at the finest level, so its window means the same at any input.
    """
    finest_image, finest_intrinsics = model.resize_for_network(
        image, intrinsics, _level_size(intrinsics, size))
    return finest_image, finest_intrinsics, exposed_mask(finest_image)


def _polarity_at(level, pose, centre_imager, measure, clock):
    """The polarity at a pose taken as close: the sign of the similarity there."""
    start = _Objective(level, pose, centre_imager, 1.0, measure, clock)
    return 1.0 if start.similarity(torch.zeros(6, dtype=torch.float64)) >= 0.0 else -1.0


def _schedule(levels, pose0, centre_imager, iterations, measure, clock, near_start):
    """The fixed refinement schedule; returns (refined pose tensor, scores for the info)."""
    finest = levels[-1]
    zero = torch.zeros(6, dtype=torch.float64)
    delta, trial_iterations = zero, 0
    if near_start:  # the similarity's sign at a close start is the polarity
        polarity = _polarity_at(levels[0], pose0, centre_imager, measure, clock)
    else:  # polarity: both try at the coarsest level, the better goes on
        trials, trial_iterations = [], POLARITY_TRIAL_ITERATIONS
        for sign in (1.0, -1.0):
            objective = _Objective(levels[0], pose0, centre_imager, sign, measure, clock)
            delta, cost = _levenberg_marquardt(objective, zero, trial_iterations)
            trials.append((cost, -sign, sign, delta))
        _, _, polarity, delta = min(trials, key=lambda trial: trial[:2])

    def score(pose, centre=centre_imager, offset=zero):
        return _Objective(finest, pose, centre, polarity, measure, clock).similarity(offset)

    ncc_before = score(pose0)
    for index, (level, count) in enumerate(zip(levels, iterations, strict=True)):
        remaining = count - (trial_iterations if index == 0 else 0)
        objective = _Objective(level, pose0, centre_imager, polarity, measure, clock)
        delta, cost = _levenberg_marquardt(objective, delta, max(remaining, 0))
    if not near_start:  # the finest level alone, from the start; the lower cost goes on
        delta, cost = min((delta, cost), _levenberg_marquardt(
            _Objective(finest, pose0, centre_imager, polarity, measure, clock), zero,
            FINE_FROM_START_ITERATIONS), key=lambda result: result[1])
    candidate = _perturbed_pose(pose0, delta, centre_imager)
    # depth: line search along the beam (not from a close start), then a polish; the last
    # level is the finest, so its final cost is the similarity at offset 0
    beam_centre = candidate[:3, :3] @ (
        torch.linalg.solve(pose0[:3, :3], centre_imager - pose0[:3, 3])) + candidate[:3, 3]
    ncc_after, best_offset = max(
        (score(_along_beam(candidate, beam_centre, offset)) if offset else 1.0 - 0.5 * cost,
         offset) for offset in ((0.0,) if near_start else DEPTH_SEARCH_MM))

    def moved_and_polished(pose, offset):  # (pose moved along the beam and polished, its score)
        moved = _along_beam(pose, beam_centre, offset)
        objective = _Objective(finest, moved, beam_centre, polarity, measure, clock)
        polish, cost = _levenberg_marquardt(objective, zero, POLISH_ITERATIONS)
        return _perturbed_pose(moved, polish, beam_centre), 1.0 - 0.5 * cost

    if best_offset:
        candidate, ncc_after = moved_and_polished(candidate, best_offset)
    improved = ncc_after > ncc_before
    refined = candidate if improved else pose0
    final = ncc_after if improved else ncc_before
    scores, rise_mm = _judge(finest, refined, final, beam_centre, polarity, measure, clock)
    for _ in range(0 if near_start else DEPTH_CONTINUATIONS):
        if not rise_mm:
            break
        moved, moved_score = moved_and_polished(refined, rise_mm)
        if moved_score <= final:
            break
        refined, final = moved, moved_score
        scores, rise_mm = _judge(finest, refined, final, beam_centre, polarity, measure, clock)
    # restarts along the beam, once, from where the pose ended
    rivals = [] if near_start else _restarts(
        _Objective(finest, refined, beam_centre, polarity, measure, clock, {}),
        _beam_frame(beam_centre)[:, 2])
    return refined, dict(ncc_before=ncc_before, polarity=polarity,
                         improved=bool(final > ncc_before),
                         rival_margin=final - max(rivals, default=-math.inf), **scores)


def _judge(finest, refined, final, beam_centre, polarity, measure, clock):
    """The gates' local evidence at ``refined`` (``final``: its similarity at the finest level).

    Returns (scores for the info, offset): the offset (mm along the beam, ``DEPTH_PROBE_MM``
    either way) where the depth judge scores higher than at the pose, 0.0 where it peaks there.
    """
    zero = torch.zeros(6, dtype=torch.float64)
    frame = _beam_frame(beam_centre)
    basis = torch.block_diag(frame, torch.eye(3, dtype=frame.dtype))  # probed axes, as columns
    judge_renders = {}  # the judges below see the same DRRs through different features
    judge = _Objective(finest, refined, beam_centre, polarity, measure, clock, judge_renders)
    probe_residuals = {(axis, offset): judge.residual(offset * basis[:, axis])
                       for axis, offset in SHARPNESS_PROBES}
    probes = {key: float(1.0 - 0.5 * (residual @ residual))
              for key, residual in probe_residuals.items()}
    across = max(value for (axis, _), value in probes.items() if axis != 2)
    depth_judge = _Objective(finest.weighted(_expansion_weight(finest, beam_centre), measure),
                             refined, beam_centre, polarity, measure, clock, judge_renders)
    at_pose = depth_judge.similarity(zero)

    def along_beam(distance):  # the depth judge ``distance`` either way: [(score, offset)]
        return [(depth_judge.similarity(sign * distance * basis[:, 2]), sign * distance)
                for sign in (-1.0, 1.0)]

    best_probe, best_offset = max(along_beam(DEPTH_PROBE_MM))
    depth_margin = at_pose - best_probe
    depth_drop = at_pose - max(along_beam(DEPTH_SHARPNESS_PROBE_MM))[0]
    jacobian = _probe_jacobian(probe_residuals)
    weakest = basis @ torch.linalg.eigh(jacobian.T @ jacobian)[1][:, 0]
    weak = max(judge.similarity(sign * WEAK_PROBE * weakest) for sign in (-1.0, 1.0))
    scores = dict(ncc_after=final, depth_margin=depth_margin, depth_drop=depth_drop,
                  across_drop=final - across, weak_margin=final - weak,
                  covariance=_covariance(jacobian, final, basis,
                                         (refined[:3, 3] - beam_centre).numpy()))
    return scores, (best_offset if depth_margin <= 0.0 else 0.0)


def depth_profile(projector, image, intrinsics, pose, offsets_mm, centre_ct=None,
                  similarity='ngf', size=64, expansion_weighted=False,
                  scatter_to_primary=SCATTER_TO_PRIMARY):
    """The finest level's similarity with ``pose`` moved ``offsets_mm`` (mm) along the beam.

    ``projector``: the finest level's ``drr.DRRProjector``; ``size``: that level's longer side
    (px); ``centre_ct``: the rotation centre, as in ``refine_pose`` (the beam runs from the
    source through it); ``expansion_weighted``: the features weighted as the gates' depth probes
    weigh them (``_expansion_weight``); ``scatter_to_primary``: as in ``refine_pose``. The
    polarity is the similarity's sign at ``pose``.
    Returns an array of the similarities, one per offset: how sharply, and where, it peaks in
    depth (the gates' depth probe is ``DEPTH_PROBE_MM``; ``bench/depth_bias.py``).
    """
    level_image, level_intrinsics, mask = _finest_input(image, intrinsics, size)
    level = _make_level(projector, level_image, mask, level_intrinsics, size, similarity, 0.0,
                        scatter_to_primary=scatter_to_primary)
    pose = torch.as_tensor(np.asarray(pose, dtype=float), dtype=torch.float64)
    centre = torch.as_tensor(_view_centre(pose.numpy(), centre_ct, mask, level_intrinsics))
    if expansion_weighted:
        level = level.weighted(_expansion_weight(level, centre), similarity)
    zero = torch.zeros(6, dtype=torch.float64)
    clock = _Clock(math.inf)
    with model.one_torch_thread():
        polarity = _polarity_at(level, pose, centre, similarity, clock)
        return np.array([_Objective(level, _along_beam(pose, centre, offset), centre, polarity,
                                    similarity, clock).similarity(zero)
                         for offset in offsets_mm])


def _probe_jacobian(probe_residuals):
    """(n, 6) Jacobian of the feature residual over the probed axes, by central differences.

    ``probe_residuals`` maps each of ``SHARPNESS_PROBES`` to its feature residual. The
    eigenvector of J^T J with the smallest eigenvalue is the flattest direction of the cost.
    """
    columns = []
    for axis in range(6):
        (low, minus), (high, plus) = sorted(
            (offset, residual) for (a, offset), residual in probe_residuals.items() if a == axis)
        columns.append((plus - minus) / (high - low))
    return torch.stack(columns, dim=1)


def _restarts(objective, beam):
    """Similarities where restarts ``RESTART_DEPTHS_MM`` along ``beam`` end, if elsewhere.

    ``objective`` is centred on the refined pose; a restart runs ``RESTART_ITERATIONS`` LM
    iterations and counts when it ends more than ``RIVAL_DISTANCE`` from that pose.
    """
    found = []
    for offset in RESTART_DEPTHS_MM:
        start = torch.cat([offset * beam, beam.new_zeros(3)])
        end, cost = _levenberg_marquardt(objective, start, RESTART_ITERATIONS)
        if float(end.norm()) > RIVAL_DISTANCE:
            found.append(1.0 - 0.5 * cost)
    return found


def _covariance(jacobian, similarity, basis, lever_mm):
    """Pose covariance (imager x y z, rx ry rz: mm, rad) from the similarity's curvature.

    Gauss-Newton on the feature residual (cost ``2 - 2 * similarity`` over its elements, the
    rows of ``jacobian``, which comes from the probes: ``_probe_jacobian``): the covariance over
    the probed axes is sigma^2 (J^T J)^-1, with sigma^2 the final cost per degree of freedom
    times ``CORRELATED_RESIDUALS_FACTOR`` (neighbouring residuals are not independent), so a
    ridge that couples depth with a tilt shows as correlated uncertainty; the beam's axis also
    gets ``DEPTH_MODEL_SIGMA_MM`` for what the DRR does not model. ``basis`` turns the
    probed axes into the perturbation (``_beam_frame`` columns, then the rotations); rotations
    are converted from the mm-like parameters to radians. A direction without curvature gets a
    variance of 1e6. The perturbation turns about the refinement's centre, the published pose's
    translation is its origin's (as PnP's and ROS's): ``lever_mm`` (imager mm) is the pose's
    translation minus the centre (``_about_origin``).
    """
    noise = (CORRELATED_RESIDUALS_FACTOR * max(2.0 - 2.0 * similarity, 1e-12)
             / max(len(jacobian) - 6, 1))
    curvatures, directions = np.linalg.eigh((jacobian.T @ jacobian).numpy())
    variances = np.minimum(noise / np.maximum(curvatures, 1e-300), 1e6)
    in_axes = (directions * variances) @ directions.T
    in_axes[2, 2] += DEPTH_MODEL_SIGMA_MM ** 2  # axis 2: along the beam (mm)
    covariance = basis.numpy() @ in_axes @ basis.numpy().T
    scale = np.array([1.0, 1.0, 1.0] + [1.0 / RADIUS_MM] * 3)
    to_origin = _about_origin(lever_mm)
    return to_origin @ (covariance * np.outer(scale, scale)) @ to_origin.T


def _about_origin(lever_mm):
    """(6, 6) map from a perturbation about a centre (d mm, r rad) to the pose's (dt, r).

    Turning by r about the centre moves the pose's origin, ``lever_mm`` from it, by r x lever
    besides d (``_perturbed_pose``, to first order).
    """
    to_origin = np.eye(6)
    to_origin[:3, 3:] = np.cross(np.asarray(lever_mm, dtype=float), np.eye(3))
    return to_origin
