"""The superimposition the surgeon sees: the CT's bone outline and targets drawn on the X-ray."""
import cv2
import numpy as np

from xray_ct_reg import geometry, model

# Sub-pixel precision of the drawn polygons (cv2 fixed-point shift).
_SHIFT = 4


def to_display(image):
    """Any X-ray (uint8/uint16/float, any polarity) -> BGR uint8 by robust percentiles."""
    try:
        grey = model.normalise_intensity(image)
    except ValueError:  # constant image: show it black
        grey = np.zeros(np.asarray(image).shape[:2], dtype=np.float32)
    return cv2.cvtColor(np.round(grey * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def bone_mask(pose, intrinsics, mesh):
    """(H, W) uint8 mask (255 on bone) of the mesh triangles projected with ``pose``.

    Each triangle is filled on its own (cv2.fillConvexPoly; filling them as one polygon list
    would apply the even-odd rule to overlaps). Only triangles with a positive signed image area
    are drawn: for a closed mesh they alone cover its whole silhouette.
    """
    vertices = np.asarray(mesh.vertices)
    triangles = np.asarray(mesh.triangles)
    pixels, depth = geometry.project_points(pose, intrinsics.K, vertices)
    corners = pixels[triangles[np.all(depth[triangles] > 0, axis=1)]]  # (T, 3, 2)
    edge_a, edge_b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    facing = edge_a[:, 0] * edge_b[:, 1] - edge_a[:, 1] * edge_b[:, 0] > 0
    low, high = corners.min(axis=1), corners.max(axis=1)
    size = np.array([intrinsics.width, intrinsics.height])
    overlaps = np.all((high >= -1) & (low <= size), axis=1)
    bounded = np.all(np.abs(corners) < 8 * size.max(), axis=(1, 2))  # fixed-point range
    mask = np.zeros((intrinsics.height, intrinsics.width), dtype=np.uint8)
    for polygon in np.round(corners[facing & overlaps & bounded] * (1 << _SHIFT)).astype(np.int32):
        cv2.fillConvexPoly(mask, polygon, 255, cv2.LINE_8, _SHIFT)
    return mask


def draw_overlay(image, pose, intrinsics, patient, text=None):
    """BGR uint8 picture of ``image`` with the patient's bone outline and targets under ``pose``.

    ``pose`` is T_imager_ct (None draws the image and text only), ``intrinsics`` those of
    ``image`` (any size), ``patient`` a ``ct.Patient`` (mesh, targets). The outline is green,
    targets are small red crosses; ``text`` (e.g. the verdict) is written at the top left.
    """
    picture = to_display(image)
    height, width = picture.shape[:2]
    scale = max(width, height) / 512.0
    thickness = max(1, int(round(scale)))
    if pose is not None:
        mask = bone_mask(pose, intrinsics, patient.mesh)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (0, 255, 0), thickness, lineType=cv2.LINE_AA)
        pixels, depth = geometry.project_points(pose, intrinsics.K, patient.targets)
        for (u, v), z in zip(pixels, depth, strict=True):
            if z <= 0 or not (0 <= u < width and 0 <= v < height):
                continue
            cv2.drawMarker(picture, (int(round(u)), int(round(v))), (0, 0, 255),
                           cv2.MARKER_CROSS, max(5, int(10 * scale)), thickness)
    if text:
        font_scale = 0.5 * scale
        origin = (int(6 * scale), int(18 * scale))
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    thickness + 2, cv2.LINE_AA)
        cv2.putText(picture, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return picture
