"""Intensity-based refinement of a pose against a DRR of the CT.

Maximises the normalised cross-correlation (NCC) between the X-ray and a DRR rendered with
``drr.DRRProjector.render_torch`` over a 6-dof perturbation of the pose, coarse to fine at low
resolution (Adam, torch autograd). The perturbation rotates about a centre point (the bone
centroid when given) so that rotation and translation are decoupled:
``p' = exp([dr]) (p - c) + c + dt`` in the imager frame, with ``dr`` scaled by ``RADIUS_MM`` so
one unit of either parameter moves the bone by about a millimetre.

The schedule of steps is fixed (no wall-clock stopping), so a result never depends on the
machine's load; a refinement that cannot finish in its time budget reports ``finished`` False
and the registrar rejects the frame.

Only exposed pixels count (``exposed_mask``): collimator shutters and detector saturation give
flat regions at an end of the grey range that carry no anatomy and would pull the NCC down.

Polarity: the DRR is a line integral (bright bone). X-rays come in either polarity, so both
signs climb briefly at the coarsest level and the better one goes on (the sign of the NCC at a
start far from the truth is unreliable). The refined pose replaces the start only when the NCC
at the finest level improved. The final NCC and the depth check are what the registrar's
intensity gates (``gates.intensity_gates``) judge.
"""
from dataclasses import dataclass, replace
import time

import cv2
import numpy as np
import torch

from xray_ct_reg import geometry, model

NAN = float('nan')
# Lever arm (mm) that turns rotation parameters into millimetre-like units.
RADIUS_MM = 100.0
# Adam step (mm-like units) per level, coarse to fine.
LEARNING_RATES = (2.0, 0.5)
# Along the beam is the weakest direction of a single view. After the levels, the pose is
# searched at these offsets (mm) along the beam and polished with POLISH_STEPS at the finest
# level; the result is then compared with itself shifted DEPTH_PROBE_MM towards and away from
# the source (the gate's convergence check).
DEPTH_SEARCH_MM = (-24.0, -16.0, -8.0, 0.0, 8.0, 16.0, 24.0)
POLISH_STEPS = 10
DEPTH_PROBE_MM = 10.0
# Adam steps both image polarities take at the coarsest level before the better one goes on.
POLARITY_TRIAL_STEPS = 15
# exposed_mask: window (px), largest local std of a flat region and how close to either end of
# the (robust) grey range its level must be, as fractions of that range.
FLAT_WINDOW_PX = 5
FLAT_MAX_STD = 0.02
FLAT_EXTREME = 0.15


@dataclass
class RefineInfo:
    """What a refinement did; ``gates.intensity_gates`` judges it.

    NCC values are at the finest level over its exposed pixels (NaN when not computed).
    """

    exposed_fraction: float           # fraction of the finest level that shows anatomy
    ncc_before: float = NAN           # NCC of the start pose (with the chosen polarity)
    ncc_after: float = NAN            # NCC of the returned pose
    depth_margin: float = NAN         # ncc_after minus the best NCC DEPTH_PROBE_MM along the beam
    polarity: float = 0.0             # +1: the X-ray is bright-bone like the DRR, -1 inverted
    improved: bool = False            # the returned pose is the refined one (else the start)
    finished: bool = True             # the fixed schedule ran to its end within the budget
    iterations: int = 0               # Adam steps taken
    time_s: float = 0.0               # wall-clock time of the refinement


def exposed_mask(image):
    """Boolean mask of the pixels that show anatomy (False: collimated or saturated).

    A pixel is excluded when its neighbourhood is flat (local std below ``FLAT_MAX_STD`` of the
    0.5-99.5 percentile range) at a level near either end of that range; the excluded area is
    grown by two pixels to cover the blurred shutter edge.
    """
    x = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(x, [0.5, 99.5])
    x = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0)
    window = (FLAT_WINDOW_PX, FLAT_WINDOW_PX)
    mean = cv2.blur(x, window)
    std = np.sqrt(np.maximum(cv2.blur(x * x, window) - mean * mean, 0.0))
    flat = (std < FLAT_MAX_STD) & ((mean < FLAT_EXTREME) | (mean > 1.0 - FLAT_EXTREME))
    flat = cv2.dilate(flat.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return ~flat


def ncc(a, b, mask=None):
    """Normalised cross-correlation (-1..1) of two same-shaped tensors over ``mask`` (bool)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + 1e-12)


def _differences(image):
    """Horizontal and vertical differences of an image; of a bool mask, where both ends count."""
    if image.dtype == torch.bool:
        return image[:, 1:] & image[:, :-1], image[1:, :] & image[:-1, :]
    return image[:, 1:] - image[:, :-1], image[1:, :] - image[:-1, :]


def gradient_ncc(a, b, mask=None):
    """Gradient correlation: mean NCC of the horizontal and of the vertical differences.

    Insensitive to the low-frequency part of an X-ray's appearance (scatter, soft tissue,
    heel effect, a processing LUT's offset) that NCC of the intensities has to match.
    """
    masks = _differences(mask) if mask is not None else (None, None)
    return 0.5 * sum(ncc(da, db, m) for da, db, m in
                     zip(_differences(a), _differences(b), masks, strict=True))


# name -> similarity(rendered DRR, X-ray, exposed mask), 1 = identical up to gain and offset
SIMILARITIES = {'ncc': ncc, 'gradient_ncc': gradient_ncc}


def _perturbed_pose(pose, delta, centre_imager):
    """T_imager_ct after the perturbation ``delta`` = (dt mm, dr * RADIUS_MM) about the centre."""
    rx, ry, rz = delta[3:] / RADIUS_MM
    skew = torch.stack([torch.stack([torch.zeros_like(rx), -rz, ry]),
                        torch.stack([rz, torch.zeros_like(rx), -rx]),
                        torch.stack([-ry, rx, torch.zeros_like(rx)])])
    rotation = torch.linalg.matrix_exp(skew)
    new_rotation = rotation @ pose[:3, :3]
    new_translation = rotation @ (pose[:3, 3] - centre_imager) + centre_imager + delta[:3]
    top = torch.cat([new_rotation, new_translation[:, None]], dim=1)
    return torch.cat([top, pose.new_tensor([[0.0, 0.0, 0.0, 1.0]])], dim=0)


def _level_size(intrinsics, size):
    """(width, height) of a level whose longer side is ``size`` px (aspect kept)."""
    scale = size / max(intrinsics.width, intrinsics.height)
    return (max(8, int(round(intrinsics.width * scale))),
            max(8, int(round(intrinsics.height * scale))))


def _level_target(image, mask, intrinsics, size):
    """The X-ray and its exposed mask at a level whose longer side is ``size`` px.

    Returns (target tensor standardised over the mask, mask tensor, K of the level). A level
    pixel counts as exposed only when every input pixel under it is.
    """
    level_size = _level_size(intrinsics, size)
    small, small_intrinsics = model.resize_for_network(image, intrinsics, level_size)
    small_mask, _ = model.resize_for_network(mask.astype(np.float32), intrinsics, level_size)
    exposed = torch.from_numpy(small_mask > 0.999)
    target = torch.from_numpy(small.astype(np.float64))
    values = target[exposed] if exposed.any() else target
    target = (target - values.mean()) / (values.std() + 1e-12)
    return target, exposed, small_intrinsics


def _similarity(projector, pose, level, polarity, measure=ncc):
    """Masked ``measure`` (times ``polarity``) of the DRR at ``pose`` with a level's target."""
    target, exposed, level_intrinsics = level
    with torch.no_grad():
        return float(polarity * measure(projector.render_torch(pose, level_intrinsics).double(),
                                        target, exposed))


class BudgetExceeded(RuntimeError):
    """The refinement's fixed schedule did not finish within its time budget."""


def _climb(projector, pose, centre_imager, level, polarity, steps, rate, deadline, measure,
           delta=None):
    """Adam ascent of ``measure`` over a perturbation of ``pose``; returns the perturbation.

    Always takes exactly ``steps`` steps (a fixed schedule: the same input gives the same pose
    under any load); raises BudgetExceeded when the deadline passes first.
    """
    target, exposed, level_intrinsics = level
    if delta is None:
        delta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=rate)
    for _ in range(steps):
        if time.perf_counter() > deadline:
            raise BudgetExceeded
        optimiser.zero_grad()
        rendered = projector.render_torch(_perturbed_pose(pose, delta, centre_imager),
                                          level_intrinsics).double()
        (-polarity * measure(rendered, target, exposed)).backward()
        optimiser.step()
    return delta


def _along_beam(pose, centre_imager, offset_mm):
    """``pose`` moved ``offset_mm`` along the ray from the source through the centre."""
    beam = centre_imager / centre_imager.norm()
    moved = pose.clone()
    moved[:3, 3] = moved[:3, 3] + offset_mm * beam
    return moved


def refine_pose(projector, image, intrinsics, pose, time_budget_s=float('inf'),
                levels=(32, 64), iterations=(60, 30), centre_ct=None, similarity='ncc'):
    """Refine ``pose`` (T_imager_ct) by masked NCC between ``image`` and DRRs, coarse to fine.

    ``levels`` are the longer image sides (px) of the levels, ``iterations`` the Adam steps per
    level. ``centre_ct`` (CT mm) is the rotation centre (default: the point 620 mm along the
    central ray). ``similarity`` names the measure maximised and reported (SIMILARITIES; the
    ``ncc_*`` fields of the info hold it). Steps: both polarities climb for
    POLARITY_TRIAL_STEPS at the coarsest level and the better one goes on; after the levels,
    a line search along the beam (DEPTH_SEARCH_MM, the weak direction of one view) and
    POLISH_STEPS at the finest level.
    Returns (pose, ``RefineInfo``).

    The schedule is fixed, so the result does not depend on the machine's speed or load. When
    it cannot finish within ``time_budget_s`` it stops there and returns the start pose with
    ``finished`` False: a frame to reject, never a truncated optimisation.
    """
    started = time.perf_counter()
    deadline = started + time_budget_s
    pose0 = torch.as_tensor(np.asarray(pose, dtype=float), dtype=torch.float64)
    if centre_ct is None:
        centre_imager = torch.tensor([0.0, 0.0, geometry.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM],
                                     dtype=torch.float64)
    else:
        centre_imager = torch.as_tensor(geometry.transform_points(pose, centre_ct)[0])
    # The exposed mask is found at the finest level, so its window means the same at any input.
    finest_image, finest_input = model.resize_for_network(
        image, intrinsics, _level_size(intrinsics, levels[-1]))
    mask = exposed_mask(finest_image)
    targets = [_level_target(finest_image, mask, finest_input, size) for size in levels]
    finest = targets[-1]
    info = RefineInfo(exposed_fraction=float(finest[1].double().mean()))
    refined = pose0
    if finest[1].sum() >= 16:  # else: nothing to compare, the start pose is returned
        try:
            refined, scores = _schedule(projector, pose0, centre_imager, targets, iterations,
                                        deadline, SIMILARITIES[similarity])
            info = replace(info, **scores)
        except BudgetExceeded:
            info.finished = False
    info.time_s = time.perf_counter() - started
    return refined.numpy(), info


def _schedule(projector, pose0, centre_imager, targets, iterations, deadline, measure):
    """The fixed refinement schedule; returns (refined pose tensor, scores for the info)."""
    finest = targets[-1]

    def score(pose, level=finest, sign=None):
        return _similarity(projector, pose, level, polarity if sign is None else sign, measure)

    rates = LEARNING_RATES[-len(targets):]
    # polarity: both climb a little at the coarsest level; the better one goes on
    trials = []
    for sign in (1.0, -1.0):
        delta = _climb(projector, pose0, centre_imager, targets[0], sign,
                       POLARITY_TRIAL_STEPS, rates[0], deadline, measure)
        trials.append((score(_perturbed_pose(pose0, delta.detach(), centre_imager), targets[0],
                             sign), sign, delta))
    _, polarity, delta = max(trials, key=lambda trial: trial[0])
    ncc_before = score(pose0)
    for index, (level, count, rate) in enumerate(zip(targets, iterations, rates, strict=True)):
        remaining = count - (POLARITY_TRIAL_STEPS if index == 0 else 0)
        delta = _climb(projector, pose0, centre_imager, level, polarity, remaining, rate,
                       deadline, measure, delta)
    candidate = _perturbed_pose(pose0, delta.detach(), centre_imager)
    # depth: line search along the beam, then a polish at the finest level
    beam_centre = candidate[:3, :3] @ (
        torch.linalg.solve(pose0[:3, :3], centre_imager - pose0[:3, 3])) + candidate[:3, 3]
    scores = [(score(_along_beam(candidate, beam_centre, offset)), offset)
              for offset in DEPTH_SEARCH_MM]
    ncc_after, best_offset = max(scores)
    if best_offset:
        candidate = _along_beam(candidate, beam_centre, best_offset)
        polish = _climb(projector, candidate, beam_centre, finest, polarity, POLISH_STEPS,
                        rates[-1], deadline, measure)
        candidate = _perturbed_pose(candidate, polish.detach(), beam_centre)
        ncc_after = score(candidate)
    improved = ncc_after > ncc_before
    refined = candidate if improved else pose0
    final = ncc_after if improved else ncc_before
    probes = [score(_along_beam(refined, beam_centre, offset))
              for offset in (-DEPTH_PROBE_MM, DEPTH_PROBE_MM)]
    steps = POLARITY_TRIAL_STEPS + sum(iterations) + (POLISH_STEPS if best_offset else 0)
    return refined, dict(ncc_before=ncc_before, ncc_after=final, iterations=steps,
                         depth_margin=final - max(probes), polarity=polarity, improved=improved)
