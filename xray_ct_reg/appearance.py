"""Physics-based, domain-randomised X-ray appearance for training (torch, batched on a device).

Turns the material path lengths of ``online_sim`` into images that span what C-arms show. Per
image it draws (ranges in :class:`AppearanceRanges`):

* a tube spectrum: SpekPy's tungsten spectrum at the kVp (``tube_spectra.json``, interpolated),
  hardened by aluminium and sometimes copper filtration (xraydb attenuation);
* the patient's materials: soft tissue, bone mineral and iodinated contrast (scaled from none
  to more than the CT had), anatomy past the ends of the CT (``online_sim``), a carbon-fibre
  table under the patient (an analytic slab), and projected metal: steel K-wires, threaded
  screws and plates with holes, in titanium or steel;
* an energy-integrating detector behind Beer-Lambert attenuation per energy bin, the heel effect
  (an intensity ramp), scatter (a smooth fraction of the primary), quantum noise at fluoroscopy
  to spot-image dose, electronic noise and detector blur;
* collimation: none, rectangular (asymmetric), iris or both, with sharp or soft edges and a
  little leakage;
* C-arm processing: log (or linear) intensity, a window, dynamic-range compression, a gamma or
  sigmoid LUT, unsharp masking, 12-16 bit quantisation, either polarity.

The recipe differs from the held-out family of ``bench/heldout_family.py`` (Kramers spectra,
other scatter, implant and collimator models), which is kept for testing only.
"""
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F

from xray_ct_reg import geometry
from xray_ct_reg.model import normalise_intensity_batch
from xray_ct_reg.patient_file import MATERIAL_CHANNELS


def gaussian_blur(images, sigma_px, mode='reflect'):
    """Separable Gaussian blur of (B, H, W) images with one sigma (px).

    ``mode`` pads the border: 'reflect' (beyond one reflection of a tiny image, 'replicate')
    or 'replicate'.
    """
    radius = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    pad = min(radius, images.shape[-1] - 1) if mode == 'reflect' else radius
    out = F.pad(images[:, None], (pad,) * 4, mode=mode)
    if pad < radius:
        out = F.pad(out, (radius - pad,) * 4, mode='replicate')
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


@dataclass
class AppearanceRanges:
    """Ranges the appearance is drawn from (uniform unless said otherwise)."""

    kvp: tuple = (55.0, 125.0)
    aluminium_mm: tuple = (2.0, 6.0)
    copper_mm: tuple = (0.0, 0.3)            # with probability copper_probability
    copper_probability: float = 0.4
    iodine_scale: tuple = (0.0, 2.0)
    table_probability: float = 0.7
    table_gap_mm: tuple = (0.0, 40.0)
    table_thickness_mm: tuple = (10.0, 30.0)
    table_density: tuple = (0.1, 0.35)       # carbon-fibre-equivalent fraction of the slab
    metal_probability: float = 0.4
    max_metal_objects: int = 3
    heel: tuple = (-0.2, 0.2)
    scatter_to_primary: tuple = (0.05, 1.5)
    photons_per_mm2: tuple = (3.0e3, 3.0e5)   # at the detector, log-uniform (fluoro to spot)
    electronic_noise: tuple = (0.0, 0.003)
    detector_blur: tuple = (0.0, 1.0)        # mix of a 1 px Gaussian blur
    collimation_probability: float = 0.5
    leakage: tuple = (0.003, 0.05)
    edge_softness_px: tuple = (0.05, 2.5)
    log_probability: float = 0.85
    window_low_percent: tuple = (0.0, 5.0)
    window_high_percent: tuple = (95.0, 100.0)
    range_compression: tuple = (0.0, 0.7)
    unsharp: tuple = (0.0, 1.5)
    gamma: tuple = (0.6, 1.6)
    sigmoid_probability: float = 0.4
    bits: tuple = (12, 14, 16)


class RandomAppearance:
    """Draws X-ray images from rendered views (see the module docstring)."""

    def __init__(self, volumes, device, ranges=None):
        """Physics tables of a :class:`patient_file.PatientVolumes` moved to ``device``."""
        self.device = torch.device(device)
        self.ranges = ranges or AppearanceRanges()
        tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        self.energies = tensor(volumes.energies_kev)
        self.mu = {name: tensor(values) for name, values in volumes.mu_per_mm.items()}
        self.spectra_kvp = tensor(volumes.spectra_kvp)
        self.spectra = tensor(volumes.spectra)
        self.posterior_mm = float(volumes.posterior_mm)

    # ------------------------------------------------------------------ random helpers
    def _uniform(self, generator, bounds, count):
        low, high = bounds
        return low + (high - low) * torch.rand(count, generator=generator, device=self.device)

    def _chance(self, generator, probability, count):
        return torch.rand(count, generator=generator, device=self.device) < probability

    # ------------------------------------------------------------------ physics
    def spectrum_weights(self, generator, count):
        """(B, E) energy-integrating detector weights of random filtered tube spectra."""
        r = self.ranges
        kvp = self._uniform(generator, r.kvp, count)
        position = torch.clamp((kvp[:, None] - self.spectra_kvp[:-1]) /
                               (self.spectra_kvp[1:] - self.spectra_kvp[:-1]), 0.0, 1.0)
        # piecewise-linear interpolation between the tabulated kVp rows
        below = (kvp[:, None] >= self.spectra_kvp[:-1]).sum(dim=1).clamp(1, len(
            self.spectra_kvp) - 1) - 1
        weight = position.gather(1, below[:, None])
        fluence = (1 - weight) * self.spectra[below] + weight * self.spectra[below + 1]
        fluence = fluence * (self.energies[None] <= kvp[:, None])
        aluminium = self._uniform(generator, r.aluminium_mm, count)
        copper = self._uniform(generator, r.copper_mm, count) * self._chance(
            generator, r.copper_probability, count)
        fluence = fluence * torch.exp(-self.mu['aluminium'][None] * aluminium[:, None]
                                      - self.mu['copper'][None] * copper[:, None])
        weights = fluence * self.energies[None]
        return weights / weights.sum(dim=1, keepdim=True)

    def table_path(self, generator, sources, directions):
        """(B, R) carbon-fibre-equivalent path (mm) through a table slab behind the patient."""
        r = self.ranges
        count = len(sources)
        top = self.posterior_mm + self._uniform(generator, r.table_gap_mm, count)
        bottom = top + self._uniform(generator, r.table_thickness_mm, count)
        density = self._uniform(generator, r.table_density, count) * self._chance(
            generator, r.table_probability, count)
        dy = directions[..., 1]
        safe = torch.where(dy.abs() < 1e-6, torch.full_like(dy, 1e-6), dy)
        t_top = (top[:, None] - sources[:, 1:2]) / safe
        t_bottom = (bottom[:, None] - sources[:, 1:2]) / safe
        # a ray enters the slab at the nearer face and leaves at the farther, whichever way it
        # runs (from a source under the table, towards -y); the detector is a
        # source-to-detector distance away along the beam
        enter, leave = torch.minimum(t_top, t_bottom), torch.maximum(t_top, t_bottom)
        inside = (torch.minimum(leave, torch.full_like(leave, geometry.CIOS_FUSION_SDD_MM))
                  - enter.clamp(min=0.0))
        return inside.clamp(min=0.0) * density[:, None]

    def metal_paths(self, generator, K, size):
        """(B, 2, H, W) steel and titanium path lengths (mm) of projected implants.

        Up to ``max_metal_objects`` per image: K-wires (thin steel cylinders), screws
        (titanium or steel cylinders with a thread) and plates (slabs with holes), of real
        sizes scaled by the view's magnification at the isocentre.
        """
        r = self.ranges
        count = len(K)
        objects = r.max_metal_objects
        shape = (count, objects)
        active = (self._chance(generator, r.metal_probability, count)[:, None]
                  & (torch.rand(shape, generator=generator, device=self.device)
                     < torch.rand((count, 1), generator=generator, device=self.device)))
        kind = torch.randint(0, 3, shape, generator=generator, device=self.device)
        px_per_mm = (K[:, 0, 0] / geometry.CIOS_FUSION_SOURCE_TO_ISOCENTER_MM)[:, None]
        rand = lambda low, high: low + (high - low) * torch.rand(  # noqa: E731
            shape, generator=generator, device=self.device)
        radius_mm = torch.where(kind == 0, rand(0.6, 1.25), torch.where(kind == 1, rand(
            2.0, 3.5), rand(5.0, 7.0)))
        length_mm = torch.where(kind == 0, rand(60.0, 200.0), torch.where(kind == 1, rand(
            25.0, 55.0), rand(40.0, 120.0)))
        centre = torch.stack([rand(0.1, 0.9) * size, rand(0.1, 0.9) * size], dim=-1)
        angle = rand(0.0, math.pi)
        axis = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
        coords = torch.arange(size, dtype=torch.float32, device=self.device)
        v, u = torch.meshgrid(coords, coords, indexing='ij')
        offset = torch.stack([u, v], dim=-1)[None, None] - centre[:, :, None, None]
        along = (offset * axis[:, :, None, None]).sum(-1) / px_per_mm[..., None, None]
        across = (offset[..., 0] * -axis[:, :, None, None, 1]
                  + offset[..., 1] * axis[:, :, None, None, 0]) / px_per_mm[..., None, None]
        within = along.abs() <= length_mm[..., None, None] / 2
        radius = radius_mm[..., None, None]
        thread = 1.0 - 0.15 * (torch.sin(2 * math.pi * along / 1.5) > 0).float()
        cylinder_radius = torch.where((kind == 1)[..., None, None], radius * thread, radius)
        cylinder = 2.0 * torch.sqrt((cylinder_radius ** 2 - across ** 2).clamp(min=0.0))
        holes = torch.remainder(along, 10.0) - 5.0
        plate = torch.where((across.abs() <= radius) & (holes ** 2 + across ** 2 > 2.5 ** 2),
                            rand(2.0, 4.0)[..., None, None], torch.zeros_like(across))
        path = torch.where((kind == 2)[..., None, None], plate, cylinder) * within
        path = path * active[..., None, None]
        steel = (kind == 0) | (torch.rand(shape, generator=generator, device=self.device) < 0.5)
        return torch.stack([(path * steel[..., None, None]).sum(1),
                            (path * ~steel[..., None, None]).sum(1)], dim=1)

    def collimators(self, generator, count, size):
        """(B, H, W) open fraction in [0, 1]: none, rectangle, iris or both; soft edges."""
        r = self.ranges
        kind = torch.randint(0, 3, (count,), generator=generator, device=self.device)
        used = self._chance(generator, r.collimation_probability, count)
        coords = torch.arange(size, dtype=torch.float32, device=self.device)
        v, u = torch.meshgrid(coords, coords, indexing='ij')
        edges = self._uniform(generator, (0.0, 0.3), (count, 4)) * size
        rectangle = torch.minimum(
            torch.minimum(u[None] - edges[:, 0, None, None],
                          (size - 1) - edges[:, 1, None, None] - u[None]),
            torch.minimum(v[None] - edges[:, 2, None, None],
                          (size - 1) - edges[:, 3, None, None] - v[None]))
        centre = (0.5 + self._uniform(generator, (-0.12, 0.12), (count, 2))) * size
        radius = self._uniform(generator, (0.4, 0.75), count) * size
        iris = radius[:, None, None] - torch.sqrt((u[None] - centre[:, 0, None, None]) ** 2
                                                  + (v[None] - centre[:, 1, None, None]) ** 2)
        distance = torch.where((kind == 0)[:, None, None], rectangle, torch.where(
            (kind == 1)[:, None, None], iris, torch.minimum(rectangle, iris)))
        softness = self._uniform(generator, r.edge_softness_px, count)[:, None, None]
        opening = torch.sigmoid(distance / softness)
        return torch.where(used[:, None, None], opening, torch.ones_like(opening))

    # ------------------------------------------------------------------ image chain
    def _lowpass(self, images):
        """A smooth version of (B, H, W) images (scatter, dynamic-range compression)."""
        size = images.shape[-1]
        pooled = F.avg_pool2d(images[:, None], kernel_size=max(size // 8, 1))
        smooth = F.interpolate(pooled, size=images.shape[-2:], mode='bilinear',
                               align_corners=False)[:, 0]
        return gaussian_blur(smooth, max(size / 32.0, 1.0))

    def __call__(self, rendered, generator):
        """Images (B, 1, H, W) normalised as the network's input, and bone masks (B, H, W).

        ``rendered`` is :meth:`online_sim.OnlineSimulator.render`'s dict. The bone mask is
        ``hit`` inside the open collimator, outside opaque metal.
        """
        r = self.ranges
        paths = rendered['paths']
        count, _, height, width = paths.shape
        size = width
        iodine_scale = self._uniform(generator, r.iodine_scale, count)
        table = self.table_path(generator, rendered['sources'], rendered['directions'])
        metal = self.metal_paths(generator, rendered['K'], size)
        thickness = {MATERIAL_CHANNELS[0]: paths[:, 0], MATERIAL_CHANNELS[1]: paths[:, 1],
                     MATERIAL_CHANNELS[2]: paths[:, 2] * iodine_scale[:, None, None],
                     'carbon_fibre': table.view(count, height, width),
                     'steel': metal[:, 0], 'titanium': metal[:, 1]}
        exponent = sum(self.mu[name][None, :, None, None] * path[:, None]
                       for name, path in thickness.items())               # (B, E, H, W)
        weights = self.spectrum_weights(generator, count)
        primary = (weights[:, :, None, None] * torch.exp(-exponent)).sum(dim=1)
        ramp_angle = self._uniform(generator, (0.0, 2 * math.pi), count)
        coords = torch.linspace(-1.0, 1.0, size, device=self.device)
        v, u = torch.meshgrid(coords, coords, indexing='ij')
        ramp = (torch.cos(ramp_angle)[:, None, None] * u + torch.sin(ramp_angle)[:, None, None]
                * v)
        primary = primary * (1.0 + self._uniform(generator, r.heel, count)[:, None, None] * ramp)
        opening = self.collimators(generator, count, size)
        leakage = self._uniform(generator, r.leakage, count)[:, None, None]
        primary = primary * (opening + leakage * (1.0 - opening))
        scatter = self._uniform(generator, r.scatter_to_primary, count)[:, None, None]
        intensity = primary + scatter * self._lowpass(primary)
        pixel_mm = geometry.CIOS_FUSION_SDD_MM / rendered['K'][:, 0, 0]
        dose = tuple(math.log(p) for p in r.photons_per_mm2)
        photons = torch.exp(self._uniform(generator, dose, count)) * pixel_mm ** 2
        noise = torch.randn(intensity.shape, generator=generator, device=self.device)
        intensity = intensity + torch.sqrt(intensity.clamp(min=0.0) / photons[:, None, None]
                                           ) * noise
        electronic = self._uniform(generator, r.electronic_noise, count)[:, None, None]
        intensity = intensity + electronic * torch.randn(
            intensity.shape, generator=generator, device=self.device)
        blur = self._uniform(generator, r.detector_blur, count)[:, None, None]
        intensity = intensity + blur * (gaussian_blur(intensity, 1.0) - intensity)
        image = self.process(generator, intensity.clamp(min=1e-5), opening > 0.5)
        bone = rendered['hit'] & (opening > 0.5) & (metal.sum(dim=1) < 3.0)
        return normalise_intensity_batch(image)[:, None], bone

    @staticmethod
    def _exposed_quantiles(signal, exposed, *fractions):
        """Per image quantiles (B,) of ``signal`` over its exposed pixels (all if none are)."""
        exposed = exposed.flatten(1) | ~exposed.flatten(1).any(dim=1, keepdim=True)
        values = torch.where(exposed, signal.flatten(1), torch.full_like(signal.flatten(1),
                                                                         float('inf')))
        ordered, _ = values.sort(dim=1)
        last = (exposed.sum(dim=1) - 1).clamp(min=0).float()
        out = []
        for fraction in fractions:
            position = fraction * last
            below = position.floor().long()
            above = torch.minimum(below + 1, last.long())
            weight = position - below
            take = lambda index: ordered.gather(1, index[:, None])[:, 0]  # noqa: E731
            out.append(take(below) * (1 - weight) + take(above) * weight)
        return out

    def process(self, generator, intensity, exposed):
        """C-arm processing of detected intensity (B, H, W) to a displayed image in [0, 1]."""
        r = self.ranges
        count = len(intensity)
        log = self._chance(generator, r.log_probability, count)[:, None, None]
        signal = torch.where(log, -torch.log(intensity), -intensity)   # bone is high in both
        low, high = self._exposed_quantiles(
            signal, exposed, self._uniform(generator, r.window_low_percent, count) / 100.0,
            self._uniform(generator, r.window_high_percent, count) / 100.0)
        x = (signal - low[:, None, None]) / (high - low).clamp(min=1e-6)[:, None, None]
        x = x.clamp(0.0, 1.0)
        compression = self._uniform(generator, r.range_compression, count)[:, None, None]
        smooth = self._lowpass(x)
        x = x - compression * (smooth - smooth.mean(dim=(1, 2), keepdim=True))
        x = x.clamp(0.0, 1.0)
        gamma = self._uniform(generator, r.gamma, count)[:, None, None]
        slope = self._uniform(generator, (3.0, 10.0), count)[:, None, None]
        middle = self._uniform(generator, (0.3, 0.7), count)[:, None, None]
        low_s, high_s = torch.sigmoid(-slope * middle), torch.sigmoid(slope * (1 - middle))
        sigmoid = (torch.sigmoid(slope * (x - middle)) - low_s) / (high_s - low_s)
        x = torch.where(self._chance(generator, r.sigmoid_probability, count)[:, None, None],
                        sigmoid, x ** gamma)
        amount = self._uniform(generator, r.unsharp, count)[:, None, None]
        x = (x + amount * (x - gaussian_blur(x, max(x.shape[-1] / 32.0, 1.0)))).clamp(0.0, 1.0)
        bits = torch.tensor(r.bits, device=self.device)[torch.randint(
            0, len(r.bits), (count,), generator=generator, device=self.device)]
        levels = (2.0 ** bits.float() - 1.0)[:, None, None]
        x = torch.round(x * levels) / levels
        dark_bone = self._chance(generator, 0.5, count)[:, None, None]
        return torch.where(dark_bone, 1.0 - x, x)
