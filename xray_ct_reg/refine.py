"""Intensity-based refinement of a pose against a DRR of the CT.

Maximises the normalised cross-correlation (NCC) between the X-ray and a DRR rendered with
``drr.DRRProjector.render_torch`` over a 6-dof perturbation of the pose, coarse to fine at low
resolution (Adam, torch autograd). The perturbation rotates about a centre point (the bone
centroid when given) so that rotation and translation are decoupled:
``p' = exp([dr]) (p - c) + c + dt`` in the imager frame, with ``dr`` scaled by ``RADIUS_MM`` so
one unit of either parameter moves the bone by about a millimetre.

Only exposed pixels count (``exposed_mask``): collimator shutters and detector saturation give
flat regions at an end of the grey range that carry no anatomy and would pull the NCC down.

Polarity: the DRR is a line integral (bright bone). X-rays come in either polarity, so the sign
of the X-ray is chosen by its correlation with the DRR at the starting pose. The refined pose
replaces the start only when the NCC at the finest level improved. The final NCC is what the
registrar's intensity gate (``RegistrationConfig.min_ncc``) judges.
"""
import time

import cv2
import numpy as np
import torch

from xray_ct_reg import geometry, model

# Lever arm (mm) that turns rotation parameters into millimetre-like units.
RADIUS_MM = 100.0
# Adam step (mm-like units) per level, coarse to fine.
LEARNING_RATES = (2.0, 0.5)
# Depth probe (mm): the refined pose is compared with itself shifted this far towards and away
# from the source; along the beam is the weakest direction of a single view.
DEPTH_PROBE_MM = 10.0
# exposed_mask: window (px), largest local std of a flat region and how close to either end of
# the (robust) grey range its level must be, as fractions of that range.
FLAT_WINDOW_PX = 5
FLAT_MAX_STD = 0.02
FLAT_EXTREME = 0.15


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


def refine_pose(projector, image, intrinsics, pose, time_budget_s=8.0, levels=(32, 64),
                iterations=(60, 30), centre_ct=None):
    """Refine ``pose`` (T_imager_ct) by masked NCC between ``image`` and DRRs, coarse to fine.

    ``levels`` are the longer image sides (px) of the levels, ``iterations`` the most Adam steps
    per level; the whole refinement stops after ``time_budget_s``. ``centre_ct`` (CT mm) is the
    rotation centre (default: the point 620 mm along the central ray). Returns (pose, info) with
    info = {ncc_before, ncc_after (of the returned pose), depth_margin, iterations, time_s,
    polarity, improved, exposed_fraction} (NCC at the finest level over its exposed pixels;
    polarity +1 when the X-ray is bright-bone like the DRR; depth_margin = ncc_after minus the
    NCC of the pose shifted DEPTH_PROBE_MM either way along the beam, <= 0 when the NCC still
    rises along the beam, i.e. depth has not converged).
    """
    start = time.perf_counter()
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
    finest, finest_mask, finest_intrinsics = targets[-1]
    info = {'exposed_fraction': float(finest_mask.double().mean()), 'iterations': 0}
    if finest_mask.sum() < 16:
        info.update(ncc_before=float('nan'), ncc_after=float('nan'),
                    depth_margin=float('nan'), polarity=0.0,
                    improved=False, time_s=time.perf_counter() - start)
        return np.asarray(pose, dtype=float), info
    with torch.no_grad():
        initial = ncc(projector.render_torch(pose0, finest_intrinsics).double(), finest,
                      finest_mask)
    polarity = 1.0 if float(initial) >= 0 else -1.0
    ncc_before = float(initial) * polarity
    delta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    for (target, exposed, level_intrinsics), count, rate in zip(
            targets, iterations, LEARNING_RATES[-len(levels):], strict=True):
        optimiser = torch.optim.Adam([delta], lr=rate)
        for _ in range(count):
            if time.perf_counter() - start > time_budget_s:
                break
            optimiser.zero_grad()
            rendered = projector.render_torch(_perturbed_pose(pose0, delta, centre_imager),
                                              level_intrinsics).double()
            loss = -polarity * ncc(rendered, target, exposed)
            loss.backward()
            optimiser.step()
            info['iterations'] += 1
    with torch.no_grad():
        candidate = _perturbed_pose(pose0, delta, centre_imager)
        ncc_after = float(polarity * ncc(projector.render_torch(candidate, finest_intrinsics)
                                         .double(), finest, finest_mask))
    improved = ncc_after > ncc_before
    refined = candidate.numpy() if improved else np.asarray(pose, dtype=float)
    with torch.no_grad():
        # the ray from the source through the rotation centre, at the refined pose
        beam = (centre_imager if centre_ct is None else torch.as_tensor(
            geometry.transform_points(refined, centre_ct)[0]))
        beam = beam / beam.norm()
        probes = []
        for sign in (-1.0, 1.0):
            shifted = torch.as_tensor(refined).clone()
            shifted[:3, 3] += sign * DEPTH_PROBE_MM * beam
            probes.append(float(polarity * ncc(projector.render_torch(shifted, finest_intrinsics)
                                               .double(), finest, finest_mask)))
    final = ncc_after if improved else ncc_before
    info.update(ncc_before=ncc_before, ncc_after=final, depth_margin=final - max(probes),
                polarity=polarity, improved=improved, time_s=time.perf_counter() - start)
    return refined, info
