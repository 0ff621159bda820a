"""Ray geometry shared by the ray-marching renderers (``drr`` and ``online_sim``); torch only."""
import torch


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
