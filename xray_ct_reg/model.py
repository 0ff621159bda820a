"""The scene coordinate regression (SCR) network, its input preparation and checkpoint I/O.

The network (Shrestha et al., MICCAI 2023) maps an X-ray image to 8 channels per pixel: the
entry point of the pixel's ray into the bone surface (x, y, z), its log sigma, the exit point
(x, y, z) and its log sigma. Coordinates are normalised as ``(x - bone_centroid) / bone_radius``
(CT mm, see :mod:`xray_ct_reg.geometry`); centroid and radius are buffers of the model, so a
checkpoint carries them. Log sigma is bounded to ``[LOG_SIGMA_MIN, LOG_SIGMA_MAX]`` (normalised
units) by a sigmoid inside the network. :meth:`SCRNet.predict` returns coordinates in CT mm and
log sigma in mm (``log_sigma_mm = log_sigma + log(bone_radius)``).

Normalisation layers: :class:`ChannelNorm`, a per-pixel layer norm over channels (as in
ConvNeXt). It uses no batch and no spatial statistics, so training does not depend on the batch
size and the network stays translation equivariant (up to zero padding at the image border): a
crop of the input gives the crop of the output away from the border.
"""
import contextlib
import datetime
import hashlib
import io
import json
import math
from pathlib import Path
import subprocess
import zipfile

import cv2
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import xray_ct_reg
from xray_ct_reg import atomic_file

CHECKPOINT_FORMAT = 'xray_ct_reg.scr/1'
OUTPUT_CHANNELS = 8
LOG_SIGMA_MIN = -6.0
LOG_SIGMA_MAX = 3.0
# Inputs are mapped to [0, 1] between these percentiles of the image.
INPUT_PERCENTILES = (1.0, 99.0)
# Largest |normalised coordinate| the loss looks at (guards against absurd targets).
COORD_LIMIT = 1.0e3


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, wrong format or wrong CT."""


# ----------------------------------------------------------------------------- network
class ChannelNorm(nn.Module):
    """Layer norm over the channels of each pixel (no batch or spatial statistics)."""

    def __init__(self, channels, eps=1e-5):
        """Learnable per-channel scale and shift, as nn.LayerNorm."""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        """Normalise (B, C, H, W) over C at every pixel (in float32 under mixed precision)."""
        dtype = x.dtype
        x = x.float()
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=1, keepdim=True)
        scaled = centred * torch.rsqrt(variance + self.eps)
        return (scaled * self.weight[:, None, None] + self.bias[:, None, None]).to(dtype)


def _stem(in_channels, out_channels):
    """Full-resolution 3x3 conv (with bias) -> SiLU, without normalisation.

    A per-pixel channel norm right after a conv of a single input channel would discard the
    local intensity level (every channel is a multiple of the same patch), so the stem has none.
    """
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.SiLU(inplace=True))


def _conv_block(in_channels, out_channels, stride=1, convs=2):
    """``convs`` x (3x3 conv -> norm -> SiLU); the first conv may be strided."""
    layers = []
    for index in range(convs):
        layers += [nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3,
                             stride=stride if index == 0 else 1, padding=1, bias=False),
                   ChannelNorm(out_channels), nn.SiLU(inplace=True)]
    return nn.Sequential(*layers)


class SCRNet(nn.Module):
    """A small fully convolutional U-Net regressing scene coordinates with uncertainty.

    ``depth`` stride-2 stages (input height and width must be multiples of ``2**depth``); level
    ``i`` has ``base_width * 2**i`` channels. The decoder upsamples bilinearly and concatenates
    the encoder features of the same scale. Levels below full resolution have two 3x3 convs per
    block; the full-resolution stem and last decoder block have one each, which roughly halves
    the CPU time (full resolution dominates it). Output (B, 8, H, W): entry xyz, entry log sigma,
    exit xyz, exit log sigma (normalised units, log sigma bounded by a sigmoid).
    """

    def __init__(self, in_channels=1, base_width=12, depth=4):
        """Build the network; normalisation buffers start at centroid 0, radius 1."""
        super().__init__()
        if depth < 1 or base_width < 1:
            raise ValueError(f'need depth >= 1 and base_width >= 1, got {depth}, {base_width}')
        self.in_channels = int(in_channels)
        self.base_width = int(base_width)
        self.depth = int(depth)
        widths = [base_width * 2 ** level for level in range(depth + 1)]
        self.stem = _stem(in_channels, widths[0])
        self.down = nn.ModuleList(_conv_block(widths[level], widths[level + 1], stride=2)
                                  for level in range(depth))
        self.up = nn.ModuleList(
            _conv_block(widths[level + 1] + widths[level], widths[level],
                        convs=1 if level == 0 else 2)
            for level in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], OUTPUT_CHANNELS, 1)
        self.register_buffer('bone_centroid', torch.zeros(3))
        self.register_buffer('bone_radius', torch.ones(()))

    @property
    def stride(self):
        """Input height and width must be multiples of this."""
        return 2 ** self.depth

    def set_normalisation(self, bone_centroid, bone_radius):
        """Set the CT normalisation (centroid in mm, radius in mm > 0)."""
        centroid = torch.as_tensor(np.asarray(bone_centroid, dtype=np.float32).reshape(3))
        radius = float(bone_radius)
        if not (torch.all(torch.isfinite(centroid)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f'invalid normalisation: centroid {bone_centroid}, '
                             f'radius {bone_radius}')
        self.bone_centroid.copy_(centroid)
        self.bone_radius.fill_(radius)

    def forward(self, image):
        """(B, 1, H, W) image in [0, 1] -> (B, 8, H, W) normalised output."""
        height, width = image.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(f'input size {width}x{height} is not a multiple of {self.stride}')
        features = [self.stem(image)]
        for block in self.down:
            features.append(block(features[-1]))
        x = features.pop()
        for block in self.up:
            skip = features.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode='bilinear', align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        raw = self.head(x)
        sigma_range = LOG_SIGMA_MAX - LOG_SIGMA_MIN
        entry_sigma = LOG_SIGMA_MIN + sigma_range * torch.sigmoid(raw[:, 3:4])
        exit_sigma = LOG_SIGMA_MIN + sigma_range * torch.sigmoid(raw[:, 7:8])
        return torch.cat([raw[:, 0:3], entry_sigma, raw[:, 4:7], exit_sigma], dim=1)

    def denormalise(self, output):
        """Normalised (B, 8, H, W) output -> dict of CT mm coordinates and log sigma in mm.

        Keys: ``entry_mm``, ``exit_mm`` (B, H, W, 3) and ``entry_log_sigma``,
        ``exit_log_sigma`` (B, H, W), log of sigma in mm.
        """
        centroid = self.bone_centroid.view(1, 1, 1, 3)
        radius = self.bone_radius
        log_radius = torch.log(radius)
        channels_last = output.permute(0, 2, 3, 1)
        return {
            'entry_mm': channels_last[..., 0:3] * radius + centroid,
            'entry_log_sigma': channels_last[..., 3] + log_radius,
            'exit_mm': channels_last[..., 4:7] * radius + centroid,
            'exit_log_sigma': channels_last[..., 7] + log_radius,
        }

    @torch.no_grad()
    def predict(self, image_tensor):
        """Run the network on a prepared (B, 1, H, W) tensor; see :meth:`denormalise`."""
        return self.denormalise(self(image_tensor))

    def normalise_coordinates(self, points_mm):
        """CT mm coordinates (..., 3) -> normalised coordinates (same shape)."""
        return (points_mm - self.bone_centroid) / self.bone_radius


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread inside (the previous count restored after).

    Registration runs the network and the refinement this way, so its arithmetic does not
    depend on the machine's core count or on who set torch's threads: with two threads the
    network's reductions split differently and its last bits change, which RANSAC on a few
    hundred inliers among thousands can turn into another pose (16 of 30 own views registered
    differently with 1 and 2 threads, one accepted with 2 and rejected with 1). The cost is
    about 2 ms for the 64 px network (8-9 ms against 6-7 ms on two threads); the refinement's
    tensors are small, and a second OpenMP thread only spins against OpenCV's warps there.
    Another CPU type (other SIMD kernels) can still change the last bits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def count_parameters(model):
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def count_flops(model, size):
    """Multiply-accumulates of the conv layers for one ``size`` x ``size`` image.

    Counted with forward hooks on every Conv2d (output elements x input channels per group x
    kernel area). Returns ``{'macs': int, 'flops': 2 * macs}``; norms and activations are not
    counted (they are a few percent).
    """
    macs = [0]

    def hook(module, _inputs, output):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        macs[0] += output[0].numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, model.in_channels, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {'macs': int(macs[0]), 'flops': int(2 * macs[0])}


# ----------------------------------------------------------------------------- input
def _resize(image, width, height):
    """Resample a 2D image: area averaging when shrinking, bilinear when enlarging."""
    shrinking = width <= image.shape[1] and height <= image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (int(width), int(height)), interpolation=interpolation)


def _size_pair(size):
    """``size`` as (width, height): an int means a square image."""
    if np.isscalar(size):
        return int(size), int(size)
    width, height = size
    return int(width), int(height)


def _as_float_gray(image):
    """Any 2D (or single/multi-channel HxWxC) numpy image -> float32 2D, validated."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., :3].astype(np.float32).mean(axis=2)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f'expected a 2D grey image, got shape {np.asarray(image).shape}')
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f'expected a numeric image, got dtype {array.dtype}')
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f'image contains {bad} NaN or infinite pixels')
    return array


def resize_for_network(image, intrinsics, size):
    """Resample an image to the network size and return it with matching intrinsics.

    ``size`` is an int (square) or (width, height). Uses cv2.INTER_AREA when shrinking (bilinear
    when enlarging) and :meth:`geometry.Intrinsics.resize`, which keeps pixel centres exact.
    Returns ``(image float32, intrinsics)``.
    """
    array = _as_float_gray(image)
    if (intrinsics.width, intrinsics.height) != (array.shape[1], array.shape[0]):
        raise ValueError(f'image is {array.shape[1]}x{array.shape[0]} but intrinsics are for '
                         f'{intrinsics.width}x{intrinsics.height}')
    width, height = _size_pair(size)
    return _resize(array, width, height), intrinsics.resize(width, height)


def pad_to_square(image, intrinsics):
    """A non-square X-ray centred on a square canvas, for a network trained on square views.

    The canvas is filled with the image's median (a flat region, like a collimator shutter; the
    committed model's SCR estimates on 32 4:3 crops of full views: 25.4 mm median padded, 44.7
    mm stretched to the square). Returns ``(image float32, intrinsics of the canvas, (x0, y0)
    of the image on it)``.
    """
    array = _as_float_gray(image)
    height, width = array.shape
    if height == width:
        return array, intrinsics, (0, 0)
    side = max(height, width)
    x0, y0 = (side - width) // 2, (side - height) // 2
    canvas = np.full((side, side), np.median(array), dtype=np.float32)
    canvas[y0:y0 + height, x0:x0 + width] = array
    return canvas, intrinsics.crop(-x0, -y0, side, side), (x0, y0)


def normalise_intensity(image):
    """Map an image to [0, 1] between its 1st and 99th percentiles (float32, same shape)."""
    array = _as_float_gray(image)
    low, high = np.percentile(array, INPUT_PERCENTILES)
    if not high > low:
        raise ValueError(f'image has no contrast (1st and 99th percentiles are both {low:g})')
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def normalise_intensity_batch(images):
    """:func:`normalise_intensity` of a (B, H, W) torch batch on its device; flat images -> 0."""
    flat = images.flatten(1).float()
    fractions = torch.tensor(INPUT_PERCENTILES, dtype=flat.dtype, device=flat.device) / 100.0
    low, high = torch.quantile(flat, fractions, dim=1)[..., None, None]
    span = high - low
    scaled = ((images - low) / span.clamp(min=1e-12)).clamp(0.0, 1.0)
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


def prepare_input(image, size=None):
    """Any X-ray (uint8, uint16, float; either polarity) -> float32 (1, 1, H, W) tensor in [0, 1].

    Intensities are mapped by robust percentiles (1st -> 0, 99th -> 1, clipped). ``size`` (int or
    (width, height)) optionally resamples first, with the interpolation of
    :func:`resize_for_network`; a caller that needs intrinsics uses that function instead. Raises
    ValueError for empty, non-2D, NaN/inf or constant images.
    """
    array = _as_float_gray(image)
    if size is not None:
        array = _resize(array, *_size_pair(size))
    return torch.from_numpy(normalise_intensity(array))[None, None]


# ----------------------------------------------------------------------------- checkpoints
def _weights_digest(state_dict):
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_version():
    """``xray_ct_reg.__version__``, plus ``git describe`` of the source tree when available."""
    version = xray_ct_reg.__version__
    try:
        described = subprocess.run(
            ['git', 'describe', '--always', '--dirty', '--tags'], capture_output=True, text=True,
            timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ''
    return f'{version}+{described}' if described else version


def save_checkpoint(path, model, metadata):
    """Write ``model`` and ``metadata`` to ``path`` atomically (``atomic_file``).

    The file is a torch.save of ``{'format', 'state_dict', 'weights_sha256', 'metadata'}``:
    floating-point parameters in float16, buffers in float32, and ``metadata`` (a JSON-able
    dict) completed with the architecture, normalisation, code version and creation time.
    """
    metadata = json.loads(json.dumps(metadata))  # must be plain JSON; copies it
    metadata['architecture'] = {'in_channels': model.in_channels,
                                'base_width': model.base_width, 'depth': model.depth}
    metadata['normalisation'] = {'bone_centroid_mm': model.bone_centroid.tolist(),
                                 'bone_radius_mm': float(model.bone_radius)}
    metadata.setdefault('code_version', code_version())
    metadata.setdefault('created', datetime.datetime.now(datetime.timezone.utc).isoformat())
    buffers = {name for name, _ in model.named_buffers()}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float() if name in buffers else tensor.half()
        state_dict[name] = tensor.clone()
    payload = {'format': CHECKPOINT_FORMAT, 'state_dict': state_dict,
               'weights_sha256': _weights_digest(state_dict), 'metadata': metadata}
    path = Path(path)
    with atomic_file.replaced_on_success(path) as temporary:
        torch.save(payload, temporary)
    return path


def _read_payload(path):
    """torch.load a checkpoint file safely (weights only), mapping failures to CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        payload = torch.load(path, weights_only=True, map_location='cpu')
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            io.UnsupportedOperation) as error:
        raise CheckpointError(f'{path} is not a readable torch checkpoint (corrupt or another '
                              f'kind of file): {error}') from error
    except Exception as error:  # unpickling refused by weights_only, or garbage bytes
        raise CheckpointError(f'{path} could not be loaded safely as a checkpoint: '
                              f'{type(error).__name__}: {error}') from error
    if not isinstance(payload, dict):
        raise CheckpointError(f'{path}: expected a checkpoint dict, got {type(payload).__name__}')
    return payload


def load_checkpoint(path, expected_ct_sha256=None):
    """Load a checkpoint; return ``(model in eval mode, float32, on CPU; metadata dict)``.

    Raises :class:`CheckpointError` (a ValueError) with a clear message when the file is
    missing, not a torch file, corrupt (weights digest mismatch), of another format, lacks keys,
    has weights that do not fit the architecture, or was trained for a CT other than
    ``expected_ct_sha256``.
    """
    payload = _read_payload(path)
    if payload.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{path}: checkpoint format {payload.get("format")!r} is not '
                              f'{CHECKPOINT_FORMAT!r}')
    missing = [k for k in ('state_dict', 'weights_sha256', 'metadata') if k not in payload]
    if missing:
        raise CheckpointError(f'{path}: checkpoint lacks {", ".join(missing)}')
    state_dict, metadata = payload['state_dict'], payload['metadata']
    if not isinstance(state_dict, dict) or not isinstance(metadata, dict):
        raise CheckpointError(f'{path}: state_dict and metadata must be dicts')
    if _weights_digest(state_dict) != payload['weights_sha256']:
        raise CheckpointError(f'{path}: weights do not match their SHA-256 (file corrupted or '
                              f'modified)')
    if expected_ct_sha256 is not None and metadata.get('ct_sha256') != expected_ct_sha256:
        raise CheckpointError(f'{path} was trained for another CT: checkpoint ct_sha256 '
                              f'{metadata.get("ct_sha256")} != expected {expected_ct_sha256}')
    architecture = metadata.get('architecture')
    if not isinstance(architecture, dict):
        raise CheckpointError(f'{path}: metadata lacks the architecture')
    try:
        model = SCRNet(int(architecture['in_channels']), int(architecture['base_width']),
                       int(architecture['depth']))
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f'{path}: weights do not fit SCRNet{architecture}: {error}') \
            from error
    if not all(torch.all(torch.isfinite(t)) for t in model.state_dict().values()):
        raise CheckpointError(f'{path}: weights contain NaN or infinite values')
    if not float(model.bone_radius) > 0:
        raise CheckpointError(f'{path}: invalid bone radius {float(model.bone_radius)}')
    return model.eval(), metadata


# ----------------------------------------------------------------------------- loss
def scr_loss(output, target_entry, target_exit, bone, background_weight=0.1,
             background_log_sigma=1.0):
    """Scene coordinate regression loss; returns ``(loss, parts dict of floats)``.

    ``output`` (B, 8, H, W) as :class:`SCRNet` gives it; ``target_entry`` and ``target_exit``
    (B, H, W, 3) normalised coordinates; ``bone`` (B, H, W) bool, the pixels whose ray hits bone
    inside the collimated field. On bone pixels, for entry and exit: the coordinate error
    ``|delta|`` (Euclidean, normalised units) plus the paper's Gaussian NLL
    ``|delta|^2 / sigma^2 + 2 log sigma`` with ``delta`` detached, so sigma learns the error
    while the coordinates get gradients of constant size. (Through the NLL alone the coordinate
    gradient is scaled by 1/sigma^2, which is tiny while errors and sigmas are large: measured
    here, the network then learned several times slower per epoch.) On the other pixels
    ``background_weight * softplus(background_log_sigma - log sigma)``, which pushes sigma up so
    that background is never confident. Log sigma is clamped to [LOG_SIGMA_MIN, LOG_SIGMA_MAX],
    coordinates to +-COORD_LIMIT and NaN/inf are zeroed, so the loss stays finite.
    """
    output = torch.nan_to_num(output.float(), nan=0.0, posinf=COORD_LIMIT, neginf=-COORD_LIMIT)
    bone = bone.bool()
    weight = bone.float()
    background = (~bone).float()
    bone_count = weight.sum().clamp_min(1.0)
    background_count = background.sum().clamp_min(1.0)
    loss = output.new_zeros(())
    parts = {}
    for name, offset, target in (('entry', 0, target_entry), ('exit', 4, target_exit)):
        target = torch.nan_to_num(target.float(), nan=0.0, posinf=COORD_LIMIT,
                                  neginf=-COORD_LIMIT).clamp(-COORD_LIMIT, COORD_LIMIT)
        predicted = output[:, offset:offset + 3].permute(0, 2, 3, 1).clamp(-COORD_LIMIT,
                                                                           COORD_LIMIT)
        log_sigma = output[:, offset + 3].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
        distance = torch.sqrt((predicted - target).square().sum(dim=-1) + 1e-12)
        nll = distance.detach().square() * torch.exp(-2.0 * log_sigma) + 2.0 * log_sigma
        bone_term = ((distance + nll) * weight).sum() / bone_count
        background_term = (F.softplus(background_log_sigma - log_sigma)
                           * background).sum() / background_count
        loss = loss + bone_term + background_weight * background_term
        parts[f'{name}_nll'] = float(bone_term.detach())
        parts[f'{name}_background'] = float(background_term.detach())
    return loss, parts
