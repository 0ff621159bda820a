"""Quality gates: may a pose be published? Each returns (accepted, reason; '' when accepted).

* ``pose_gates``: a physically possible C-arm view of the bones (rigid, in front of the source
  at a plausible distance, bone centroid in the image, viewing direction near AP; in-plane
  roll is free);
* ``quality_gates`` (SCR only): the correspondences support the PnP pose (inlier count, ratio,
  spread over the image, reprojection error), then ``pose_gates``;
* ``intensity_gates`` (with refinement): the refinement finished its schedule, enough of the
  image is exposed, X-ray and DRR reach a floor of similarity (higher for a smaller exposed
  field), peak in depth, form a sharp optimum and no restart found one nearly as good, then
  ``pose_gates``.

``config`` is a ``register.RegistrationConfig``; pixel values are at its reference detector.
A pose failing any gate is never published.
"""
import math

import numpy as np

from xray_ct_reg import geometry, refine
from xray_ct_reg.pnp import scaled_px


def inlier_spread(pixels, width, height):
    """Smaller of the pixels' standard deviations along u and v, relative to the image size."""
    pixels = np.asarray(pixels, dtype=float).reshape(-1, 2)
    if len(pixels) < 2:
        return 0.0
    return float(min(pixels[:, 0].std() / width, pixels[:, 1].std() / height))


def view_angle_from_ap_deg(pose):
    """Angle (deg) between the pose's viewing direction (the beam, imager +z, in CT) and AP's.

    Only where the beam points counts: rolling the image in its plane leaves it unchanged.
    """
    beam_ct = np.asarray(pose, dtype=float)[2, :3]          # R^T e_z: imager z axis in CT
    beam_ap = geometry.R_IMAGER_CT_AP[2]
    cosine = float(np.clip(beam_ct @ beam_ap / np.linalg.norm(beam_ct), -1.0, 1.0))
    return float(np.degrees(np.arccos(cosine)))


def pose_gates(pose, intrinsics, bone_centroid, config):
    """Is ``pose`` a physically possible C-arm view of the bones? Returns (accepted, reason).

    Checks, in order: a rigid finite pose, the bone centroid (3,) CT mm in front of the source
    within the distance range, projecting inside the image (with margin), and the view angle
    away from AP.
    """
    if pose is None or not geometry.is_rigid(pose, tolerance=1e-5):
        return False, 'no valid pose'
    centroid = np.asarray(bone_centroid, dtype=float).reshape(1, 3)
    (u, v), = geometry.project_points(pose, intrinsics.K, centroid)[0]
    centroid_imager = geometry.transform_points(pose, centroid)[0]
    distance = float(np.linalg.norm(centroid_imager))
    if centroid_imager[2] <= 0:
        return False, 'bone centroid behind the X-ray source'
    if not config.min_source_distance_mm <= distance <= config.max_source_distance_mm:
        return False, (f'source-to-bone distance {distance:.0f} mm outside '
                       f'[{config.min_source_distance_mm:.0f}, '
                       f'{config.max_source_distance_mm:.0f}] mm')
    margin_u = config.image_margin * intrinsics.width
    margin_v = config.image_margin * intrinsics.height
    if not (-margin_u - 0.5 <= u <= intrinsics.width - 0.5 + margin_u
            and -margin_v - 0.5 <= v <= intrinsics.height - 0.5 + margin_v):
        return False, f'bone centroid projects outside the image at ({u:.0f}, {v:.0f}) px'
    angle = view_angle_from_ap_deg(pose)
    if angle > config.max_angle_from_ap_deg:
        return False, f'view {angle:.0f} deg away from AP > {config.max_angle_from_ap_deg:.0f}'
    return True, ''


def quality_gates(pose, inlier_count, inlier_ratio, reprojection_error_px, intrinsics,
                  bone_centroid, config, spread=1.0):
    """Decide whether an SCR (PnP) pose may be used. Returns (accepted, reason; '' if accepted).

    ``reprojection_error_px`` is in pixels of ``intrinsics``; ``bone_centroid`` (3,) CT mm.
    ``spread`` is ``inlier_spread`` of the inlier pixels. Checks, in order: a rigid finite
    pose, inlier count, inlier ratio, inlier spread, reprojection error, then ``pose_gates``.
    """
    if pose is None or not geometry.is_rigid(pose, tolerance=1e-5):
        return False, 'no valid pose'
    if inlier_count < config.min_inliers:
        return False, f'too few inliers: {inlier_count} < {config.min_inliers}'
    if not inlier_ratio >= config.min_inlier_ratio:
        return False, f'inlier ratio {inlier_ratio:.2f} < {config.min_inlier_ratio:.2f}'
    if not spread >= config.min_inlier_spread:
        return False, (f'inliers cluster in a small image region (spread {spread:.3f} < '
                       f'{config.min_inlier_spread:.3f})')
    max_error = scaled_px(config.max_reprojection_error_px, intrinsics.K,
                          config.reference_focal_px)
    if not reprojection_error_px <= max_error:
        return False, (f'reprojection error {reprojection_error_px:.2f} px > {max_error:.2f} px')
    return pose_gates(pose, intrinsics, bone_centroid, config)


def intensity_gates(pose, refine_info, intrinsics, bone_centroid, config):
    """Decide whether an intensity-refined pose may be used. Returns (accepted, reason).

    ``refine_info`` is the ``refine.RefineInfo`` of the refinement. Checks that it finished its
    fixed schedule within the time budget (a truncated one is never used), the exposed fraction
    of the image, a floor on the similarity at the refined pose and one that rises as the
    exposed field shrinks (``min_similarity_evidence``), that the similarity peaks there
    along the beam (the weak direction of one view: a pose still climbing in depth is
    unconverged), that the optimum is sharp: higher than every probe across the beam or turned
    by ``min_sharpness`` (relative evidence, which transfers across appearance where the
    similarity's level does not), than the farther probes along the beam by
    ``min_depth_sharpness`` and along its flattest direction by ``min_weak_sharpness`` (or
    ``min_relative_weak_sharpness`` of the mismatch 1 - similarity, when larger),
    and that every restart along the beam that ended elsewhere (``rival_margin``) scores lower
    by that margin too (a restart is a probe along the weak direction, carried on to its own
    optimum: one nearly as good leaves the pose undetermined), then ``pose_gates``.
    """
    if not refine_info.finished:
        return False, (f'intensity refinement did not finish within its time budget '
                       f'({config.refine_time_budget_s:g} s)')
    exposed = refine_info.exposed_fraction
    if not exposed >= config.min_exposed_fraction:
        return False, (f'too little anatomy visible for the intensity check ({exposed:.2f} of the '
                       f'image < {config.min_exposed_fraction:.2f})')
    if not refine_info.ncc_after >= config.min_ncc:
        return False, (f'X-ray and DRR disagree: {config.similarity} '
                       f'{refine_info.ncc_after:.3f} < {config.min_ncc:.3f}')
    evidence = refine_info.ncc_after * math.sqrt(exposed)
    if not evidence >= config.min_similarity_evidence:
        return False, (f'too little evidence for the field shown: {config.similarity} '
                       f'{refine_info.ncc_after:.3f} over {exposed:.2f} of the image (similarity x '
                       f'sqrt(exposed fraction) {evidence:.3f} < '
                       f'{config.min_similarity_evidence:.3f})')
    if not refine_info.depth_margin > 0.0:
        return False, ('depth along the beam not converged: the similarity still rises '
                       f'{refine.DEPTH_PROBE_MM:.0f} mm towards or away from the source')
    if not refine_info.across_drop >= config.min_sharpness:
        return False, (f'no sharp optimum: a probe across the beam or turned scores within '
                       f'{refine_info.across_drop:.3f} < {config.min_sharpness:.3f} of it')
    if not refine_info.depth_drop >= config.min_depth_sharpness:
        return False, (f'no sharp optimum along the beam: the pose '
                       f'{refine.DEPTH_SHARPNESS_PROBE_MM:.0f} mm towards or away from the source '
                       f'scores within {refine_info.depth_drop:.3f} < '
                       f'{config.min_depth_sharpness:.3f} of it')
    mismatch = 1.0 - refine_info.ncc_after
    weak_floor = max(config.min_weak_sharpness, config.min_relative_weak_sharpness * mismatch)
    floor_text = (f'{weak_floor:.4f} (the larger of {config.min_weak_sharpness:g} and '
                  f'{config.min_relative_weak_sharpness:g} x the mismatch {mismatch:.3f})')
    if not refine_info.weak_margin >= weak_floor:
        return False, (f'no sharp optimum along its flattest direction: a probe '
                       f'{refine.WEAK_PROBE:.0f} mm-like units along it scores within '
                       f'{refine_info.weak_margin:.4f} < {floor_text}')
    if not refine_info.rival_margin >= weak_floor:
        return False, (f'an optimum as good elsewhere: a restart '
                       f'{max(refine.RESTART_DEPTHS_MM):.0f} mm along the beam ended at a pose '
                       f'scoring within {refine_info.rival_margin:.4f} < {floor_text}')
    return pose_gates(pose, intrinsics, bone_centroid, config)
