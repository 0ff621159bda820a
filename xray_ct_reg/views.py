"""C-arm view sampling: random poses around the bones and local (cropped detector) views.

Free of Open3D and SimpleITK, so the online simulator (``online_sim``) can draw the same views
as the shard simulator (``simulate``) on a machine that has only torch, numpy and scipy.
"""
from dataclasses import dataclass

import numpy as np

from xray_ct_reg import geometry


@dataclass
class PoseSampler:
    """Random C-arm poses around a patient's bones (ranges are +- half-widths).

    Angles in degrees (LAO/RAO, cranial/caudal, in-plane), offsets in mm along the imager axes
    (x, y across the detector, z = depth along the beam). The isocentre is a random bone mesh
    vertex pulled towards the bone centroid by a random fraction between ``isocenter_pull`` and
    1, so views centre on the bones near the centroid (the spine) more than on the periphery.
    """

    lao_deg: float = 45.0
    cranial_deg: float = 30.0
    inplane_deg: float = 15.0
    offset_xy_mm: float = 40.0
    offset_z_mm: float = 60.0
    isocenter_pull: float = 0.6
    source_to_isocenter_mm: float = geometry.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM

    def sample(self, rng, vertices, centroid, extreme=False):
        """Draw one pose: returns (T_imager_ct (4, 4), parameter dict).

        ``vertices``/``centroid`` are the bone mesh vertices and centroid (mm). With
        ``extreme`` every angle and offset sits at an edge of its range (random sign).
        """
        vertex = np.asarray(vertices)[rng.integers(len(vertices))]
        pull = rng.uniform(self.isocenter_pull, 1.0)
        isocenter = vertex + pull * (np.asarray(centroid) - vertex)
        draw = (lambda half: half * rng.choice([-1.0, 1.0])) if extreme else (
            lambda half: rng.uniform(-half, half))
        params = {'lao_deg': draw(self.lao_deg), 'cranial_deg': draw(self.cranial_deg),
                  'inplane_deg': draw(self.inplane_deg),
                  'offset_mm': [draw(self.offset_xy_mm), draw(self.offset_xy_mm),
                                draw(self.offset_z_mm)],
                  'isocenter': isocenter.tolist()}
        pose = geometry.carm_pose(isocenter, params['lao_deg'], params['cranial_deg'],
                                  params['inplane_deg'], params['offset_mm'],
                                  self.source_to_isocenter_mm)
        return pose, {k: (float(v) if np.isscalar(v) else v) for k, v in params.items()}


def local_view_intrinsics(intrinsics, rng, min_fraction=0.35):
    """Random square-ish crop (``min_fraction``..1 of the detector) resized back to full size."""
    fraction = rng.uniform(min_fraction, 1.0)
    width = max(2, int(round(fraction * intrinsics.width)))
    height = max(2, int(round(fraction * intrinsics.height)))
    x0 = int(rng.integers(0, intrinsics.width - width + 1))
    y0 = int(rng.integers(0, intrinsics.height - height + 1))
    return intrinsics.crop(x0, y0, width, height).resize(intrinsics.width, intrinsics.height)
