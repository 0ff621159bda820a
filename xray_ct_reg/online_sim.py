"""Online simulation in torch: batches of C-arm views rendered on the training device.

From one patient file (``patient_file``) it draws poses (``views.PoseSampler``, local views by a
random detector crop) and ray marches every pixel-centre ray of a batch at once:

* through the material volumes (``grid_sample``, every ``drr_step_mm``): path lengths (mm at
  full density) of soft tissue, bone mineral and iodine, which ``appearance`` turns into an
  X-ray; optionally with the anatomy continued past the ends of the CT (its end slices
  repeated), since a real X-ray does not stop where the scan did;
* through the bone occupancy field (every ``surface_step_mm``): the first and last crossings of
  its 0.5 level, linearly interpolated between samples, are the pixel's entry and exit scene
  coordinates (the same surface the Open3D mesh of ``simulate`` triangulates; tested against it).

Nothing is written to disk: training sees fresh views at every step. Needs only torch and numpy.
"""
import numpy as np
import torch
import torch.nn.functional as F

from xray_ct_reg import geometry, views
from xray_ct_reg.raymarch import clip_rays_to_box, pixel_rays, sample_weights


class _DeviceGrid:
    """A patient-file grid as a (1, C, z, y, x) tensor with its affine, on a device."""

    def __init__(self, grid, device):
        values = np.asarray(grid.values, dtype=np.float32)
        values = values[None] if values.ndim == 3 else values
        self.volume = torch.from_numpy(values)[None].to(device)
        self.mm_to_index = torch.as_tensor(grid.mm_to_index, dtype=torch.float32, device=device)
        self.origin_mm = torch.as_tensor(grid.origin_mm, dtype=torch.float32, device=device)
        self.upper = torch.tensor(values.shape[:0:-1], dtype=torch.float32, device=device) - 1.0
        # mm per index step along z (how far an extension of k mm reaches in index units)
        self.z_spacing_mm = float(1.0 / np.linalg.norm(np.asarray(grid.mm_to_index)[2]))

    def to_index(self, sources, directions):
        """Rays in CT mm -> rays in continuous index space (same t, in mm)."""
        return ((sources - self.origin_mm) @ self.mm_to_index.T,
                directions @ self.mm_to_index.T)

    def sample(self, points_index, clamp_z=None):
        """Trilinear samples (C, N...) at index-space points (N..., 3); outside is 0.

        ``clamp_z`` (bool, broadcast to the points' leading shape) repeats the end slices in z.
        """
        if clamp_z is not None:
            clamped = points_index[..., 2].clamp(0.0, float(self.upper[2]))
            points_index = torch.cat([points_index[..., :2], torch.where(
                clamp_z, clamped, points_index[..., 2])[..., None]], dim=-1)
        normalised = points_index * (2.0 / self.upper) - 1.0
        shape = points_index.shape[:-1]
        values = F.grid_sample(self.volume, normalised.reshape(1, -1, 1, 1, 3), mode='bilinear',
                               padding_mode='zeros', align_corners=True)
        return values.reshape(self.volume.shape[1], *shape)


class OnlineSimulator:
    """Renders batches of views of one patient on ``device`` (see the module docstring)."""

    def __init__(self, volumes, size, device='cpu', drr_step_mm=2.0, surface_step_mm=1.0,
                 rays_per_chunk=2 ** 21):
        """Move the patient's volumes to ``device``; images are ``size`` x ``size`` px."""
        self.volumes = volumes
        self.size = int(size)
        self.device = torch.device(device)
        self.materials = _DeviceGrid(volumes.materials, self.device)
        self.field = _DeviceGrid(volumes.bone_field, self.device)
        self.drr_step_mm = float(drr_step_mm)
        self.surface_step_mm = float(surface_step_mm)
        self.rays_per_chunk = int(rays_per_chunk)
        self.pixels = torch.as_tensor(
            geometry.pixel_centers(self.size, self.size).reshape(-1, 2), dtype=torch.float64,
            device=self.device)

    # ------------------------------------------------------------------ views
    def draw_views(self, rng, count, sampler=None, local_fraction=0.4, extreme=False):
        """``count`` random views: poses (B, 4, 4), intrinsics K (B, 3, 3), local flags (B,).

        Poses come from ``views.PoseSampler`` around the patient's bone vertices; a
        ``local_fraction`` of views is a random crop of the detector resized to ``size`` px
        (``views.local_view_intrinsics``). numpy arrays, drawn from ``rng``.
        """
        sampler = sampler or views.PoseSampler()
        full = geometry.default_intrinsics(self.size)
        poses, intrinsics, local = [], [], []
        for _ in range(count):
            pose, _ = sampler.sample(rng, self.volumes.vertices, self.volumes.bone_centroid,
                                     extreme)
            is_local = bool(rng.random() < local_fraction)
            K = views.local_view_intrinsics(full, rng).K if is_local else full.K
            poses.append(pose)
            intrinsics.append(K)
            local.append(is_local)
        return np.stack(poses), np.stack(intrinsics), np.array(local)

    def rays(self, poses, intrinsics):
        """Sources (B, 3) and unit directions (B, R, 3) in CT mm of every pixel-centre ray."""
        poses = torch.as_tensor(poses, dtype=torch.float64, device=self.device)
        K = torch.as_tensor(intrinsics, dtype=torch.float64, device=self.device)
        sources, directions = pixel_rays(poses, torch.linalg.inv(K), self.pixels)
        return sources.float(), directions.float()

    # ------------------------------------------------------------------ marching
    def _chunks(self, count, samples):
        """Slices of views so that one chunk holds about ``rays_per_chunk`` ray samples."""
        per_view = self.size * self.size * max(samples, 1)
        step = max(1, self.rays_per_chunk // per_view)
        return [slice(first, min(first + step, count)) for first in range(0, count, step)]

    def path_lengths(self, sources, directions, extension_mm=None):
        """(B, 3, H, W) path lengths (mm at full density) of the material channels.

        ``extension_mm`` (B,) continues the anatomy that far past each end of the CT in z (its
        end slices repeated); 0 or None stops rays where the CT stops.
        """
        grid = self.materials
        count = len(sources)
        extension = (torch.zeros(count, device=self.device) if extension_mm is None else
                     torch.as_tensor(extension_mm, dtype=torch.float32, device=self.device))
        reach = extension / grid.z_spacing_mm
        lower = torch.stack([torch.zeros_like(reach), torch.zeros_like(reach), -reach], dim=-1)
        upper = grid.upper.expand(count, 3).clone()
        upper[:, 2] = upper[:, 2] + reach
        source_index, step_index = grid.to_index(sources[:, None], directions)
        t_near, t_far = clip_rays_to_box(source_index, step_index, lower[:, None],
                                         upper[:, None])
        length = (t_far - t_near).clamp(min=0.0)
        samples = max(int(torch.ceil(length.max() / self.drr_step_mm).item()), 1)
        index = torch.arange(samples, dtype=torch.float32, device=self.device)
        out = []
        for views_slice in self._chunks(count, samples):
            t = t_near[views_slice, :, None] + (index + 0.5) * self.drr_step_mm
            points = source_index[views_slice, :, None] + t[..., None] * step_index[
                views_slice, :, None]
            weights = sample_weights(length[views_slice], samples, self.drr_step_mm)
            clamp = (extension[views_slice] > 0)[:, None, None].expand(points.shape[:-1])
            values = grid.sample(points, clamp)                      # (C, b, R, S)
            out.append((values * weights).sum(dim=-1).permute(1, 0, 2))
        paths = torch.cat(out)
        return paths.reshape(count, -1, self.size, self.size)

    def scene_coordinates(self, sources, directions):
        """Entry and exit points (B, H, W, 3) CT mm (0 where missed) and hits (B, H, W) bool."""
        grid = self.field
        count = len(sources)
        source_index, step_index = grid.to_index(sources[:, None], directions)
        t_near, t_far = clip_rays_to_box(source_index, step_index, 0.0, grid.upper)
        length = (t_far - t_near).clamp(min=0.0)
        samples = max(int(torch.ceil(length.max() / self.surface_step_mm).item()) + 1, 2)
        index = torch.arange(samples, dtype=torch.float32, device=self.device)
        entries, exits, hits = [], [], []
        for views_slice in self._chunks(count, samples):
            t = t_near[views_slice, :, None] + index * self.surface_step_mm      # (b, R, S)
            inside = t <= t_far[views_slice, :, None]
            points = source_index[views_slice, :, None] + t[..., None] * step_index[
                views_slice, :, None]
            occupancy = grid.sample(points)[0] * inside
            above = occupancy >= 0.5
            hit = above.any(dim=-1)
            first = above.to(torch.uint8).argmax(dim=-1)
            last = samples - 1 - above.flip(-1).to(torch.uint8).argmax(dim=-1)
            t_entry = self._crossing(t, occupancy, first - 1, first)
            t_exit = self._crossing(t, occupancy, last + 1, last)
            d = directions[views_slice]
            s = sources[views_slice, None]
            entries.append(torch.where(hit[..., None], s + t_entry[..., None] * d, 0.0))
            exits.append(torch.where(hit[..., None], s + t_exit[..., None] * d, 0.0))
            hits.append(hit)
        shape = (count, self.size, self.size)
        return (torch.cat(entries).reshape(*shape, 3), torch.cat(exits).reshape(*shape, 3),
                torch.cat(hits).reshape(shape))

    def _crossing(self, t, occupancy, outside, inside):
        """Where (t, mm) occupancy crosses 0.5 between samples ``outside`` and ``inside``."""
        samples = t.shape[-1]
        outside = outside.clamp(0, samples - 1)
        take = lambda values, at: values.gather(-1, at[..., None])[..., 0]  # noqa: E731
        v_out, v_in = take(occupancy, outside), take(occupancy, inside)
        t_out, t_in = take(t, outside), take(t, inside)
        fraction = ((0.5 - v_out) / (v_in - v_out).clamp(min=1e-6)).clamp(0.0, 1.0)
        return torch.where(outside == inside, t_in, t_out + fraction * (t_in - t_out))

    def render(self, poses, intrinsics, extension_mm=None):
        """Everything about a batch of views, as tensors on the device.

        Returns a dict: ``paths`` (B, 3, H, W), ``entry``/``exit`` (B, H, W, 3) CT mm, ``hit``
        (B, H, W) bool, ``sources`` (B, 3), ``directions`` (B, R, 3), ``K`` (B, 3, 3).
        """
        sources, directions = self.rays(poses, intrinsics)
        entry, exit_, hit = self.scene_coordinates(sources, directions)
        return {'paths': self.path_lengths(sources, directions, extension_mm), 'entry': entry,
                'exit': exit_, 'hit': hit, 'sources': sources, 'directions': directions,
                'K': torch.as_tensor(intrinsics, dtype=torch.float32, device=self.device)}
