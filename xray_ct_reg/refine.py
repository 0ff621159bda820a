"""Optional intensity-based refinement of a pose against a DRR of the CT.

Maximises the normalised cross-correlation (NCC) between the X-ray and a DRR rendered with
``drr.DRRProjector.render_torch`` over a 6-dof perturbation of the pose, coarse to fine at low
resolution (Adam, torch autograd). The perturbation rotates about a centre point (the bone
centroid when given) so that rotation and translation are decoupled:
``p' = exp([dr]) (p - c) + c + dt`` in the imager frame, with ``dr`` scaled by ``RADIUS_MM`` so
one unit of either parameter moves the bone by about a millimetre.

Polarity: the DRR is a line integral (bright bone). X-rays come in either polarity, so the sign
of the X-ray is chosen by its correlation with the DRR at the starting pose. The refined pose
replaces the start only when the NCC at the finest level improved.
"""
import time

import numpy as np
import torch

from xray_ct_reg import geometry, model

# Lever arm (mm) that turns rotation parameters into millimetre-like units.
RADIUS_MM = 100.0
# Adam step (mm-like units) per level, coarse to fine.
LEARNING_RATE = 1.0


def ncc(a, b):
    """Normalised cross-correlation of two same-shaped tensors (-1..1)."""
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


def _level_target(image, intrinsics, size):
    """The X-ray resampled so its longer side is ``size``: (zero-mean unit-std tensor, K)."""
    scale = size / max(intrinsics.width, intrinsics.height)
    width = max(8, int(round(intrinsics.width * scale)))
    height = max(8, int(round(intrinsics.height * scale)))
    small, small_intrinsics = model.resize_for_network(image, intrinsics, (width, height))
    target = torch.from_numpy(small.astype(np.float64))
    target = (target - target.mean()) / (target.std() + 1e-12)
    return target, small_intrinsics


def refine_pose(projector, image, intrinsics, pose, time_budget_s=3.0, levels=(32, 64),
                iterations=(30, 20), centre_ct=None):
    """Refine ``pose`` (T_imager_ct) by NCC between ``image`` and DRRs, coarse to fine.

    ``levels`` are the longer image sides (px) of the levels, ``iterations`` the most Adam steps
    per level; the whole refinement stops after ``time_budget_s``. ``centre_ct`` (CT mm) is the
    rotation centre (default: the point 620 mm along the central ray). Returns (pose, info) with
    info = {ncc_before, ncc_after (of the returned pose), iterations, time_s, polarity,
    improved} (NCC at the finest level; polarity +1 when the X-ray is bright-bone like the DRR).
    """
    start = time.perf_counter()
    pose0 = torch.as_tensor(np.asarray(pose, dtype=float), dtype=torch.float64)
    if centre_ct is None:
        centre_imager = torch.tensor([0.0, 0.0, geometry.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM],
                                     dtype=torch.float64)
    else:
        centre_imager = torch.as_tensor(geometry.transform_points(pose, centre_ct)[0])
    targets = [_level_target(image, intrinsics, size) for size in levels]
    finest, finest_intrinsics = targets[-1]
    with torch.no_grad():
        initial = ncc(projector.render_torch(pose0, finest_intrinsics).double(), finest)
    polarity = 1.0 if float(initial) >= 0 else -1.0
    ncc_before = float(initial) * polarity
    delta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    steps = 0
    for (target, level_intrinsics), count in zip(targets, iterations, strict=True):
        optimiser = torch.optim.Adam([delta], lr=LEARNING_RATE)
        for _ in range(count):
            if time.perf_counter() - start > time_budget_s:
                break
            optimiser.zero_grad()
            rendered = projector.render_torch(_perturbed_pose(pose0, delta, centre_imager),
                                              level_intrinsics).double()
            loss = -polarity * ncc(rendered, target)
            loss.backward()
            optimiser.step()
            steps += 1
    with torch.no_grad():
        candidate = _perturbed_pose(pose0, delta, centre_imager)
        ncc_after = float(polarity * ncc(
            projector.render_torch(candidate, finest_intrinsics).double(), finest))
    improved = ncc_after > ncc_before
    refined = candidate.numpy() if improved else np.asarray(pose, dtype=float)
    info = {'ncc_before': ncc_before, 'ncc_after': ncc_after if improved else ncc_before,
            'iterations': steps, 'time_s': time.perf_counter() - start, 'polarity': polarity,
            'improved': improved}
    return refined, info
