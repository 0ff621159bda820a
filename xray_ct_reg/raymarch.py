"""Ray geometry shared by the ray-marching renderers (``drr`` and ``online_sim``); torch only."""
import torch


def pixel_rays(poses, k_inverse, pixels):
    """Sources (B, 3) and unit directions (B, R, 3), CT mm, of the rays through ``pixels``.

    ``poses`` (B, 4, 4) T_imager_ct, ``k_inverse`` (B, 3, 3) inverse intrinsics and ``pixels``
    (R, 2) pixel (u, v) coordinates, tensors of one dtype. A ray leaves the source -R^T t along
    R^T K^-1 [u, v, 1] (``geometry.backproject_rays`` is the numpy form for a few pixels).
    """
    rotation, translation = poses[:, :3, :3], poses[:, :3, 3]
    homogeneous = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
    directions = homogeneous @ k_inverse.transpose(1, 2) @ rotation
    directions = directions / directions.norm(dim=-1, keepdim=True)
    sources = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]
    return sources, directions


def sample_weights(length, count, step_mm):
    """Weights (..., count) of ``count`` samples one ``step_mm`` apart along rays of ``length``.

    Sample i sits in the middle of step i and stands for the length of the ray in that step:
    ``step_mm``, less for the last partial step, 0 past the ray's end (``length`` (...,) mm).
    """
    index = torch.arange(count, dtype=length.dtype, device=length.device)
    return (length[..., None] / step_mm - index).clamp(0.0, 1.0) * step_mm


def clip_rays_to_box(source_index, directions_index, lower, upper):
    """Distances (mm) where rays enter and leave the box [lower, upper] of index space.

    ``source_index`` (..., 3) and ``directions_index`` (..., 3) are a ray's origin and its step
    per mm in continuous voxel indices (x, y, z); ``lower``/``upper`` broadcast against them.
    Returns ``(t_near, t_far)`` (...,), t_near clamped at the source; a ray that misses has
    t_far < t_near.
    """
    safe = torch.where(directions_index.abs() < 1e-12,
                       torch.full_like(directions_index, 1e-12), directions_index)
    t0 = (lower - source_index) / safe
    t1 = (upper - source_index) / safe
    return (torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0),
            torch.maximum(t0, t1).amin(dim=-1))
