"""Training of the SCR network, and the ``train`` / ``export-patient`` / ``prepare`` CLIs.

Two sources of training batches, with the same network, loss, schedule and checkpoints:

* online (``--patient``, :class:`OnlineSource`; how the committed model was trained): every step
  renders fresh views on the training device from one preprocessed patient file
  (``online_sim``, ``patient_file``) with the physics-based, randomised appearance of
  ``appearance``; no dataset on disk, and only torch and numpy needed (a GPU node);
* a simulated dataset (``--data``, :class:`ShardSource`): the whole training split is held in
  memory (a 2000-sample 128 px dataset is < 1 GB) and augmented on the fly in the main process
  (numpy/OpenCV, deterministic for a seed): a random square crop resized back (scene-coordinate
  maps with nearest neighbour, intrinsics by ``Intrinsics.crop``/``resize``), random collimation
  shutters, the X-ray appearance of :func:`simulate.xray_appearance` with random polarity,
  contrast, noise and blur, and random erasing (erased pixels count as background: the network
  must not be confident there).

Inputs go through :func:`model.normalise_intensity`, exactly as at inference.

The learning rate follows a warm-up + cosine schedule over whichever ends first: the epochs or
``max_minutes``. Validation each epoch on the held-out split gives the median coordinate error
(mm) on bone pixels and on confident bone pixels. "Confident" is calibrated, not fixed: the
checkpoint's ``confident_sigma_mm`` is the sigma below which the ``confident_fraction`` most
confident validation bone pixels lie (a training metric; the registrar ranks pixels by sigma
instead, since the sigma level shifts with the appearance). The best
validation loss is checkpointed; training stops early after ``patience`` epochs without improvement.
"""
import contextlib
import dataclasses
from dataclasses import dataclass
import json
import math
from pathlib import Path
import time

import cv2
import numpy as np
import torch

from xray_ct_reg import atomic_file, geometry
from xray_ct_reg import model as scr
from xray_ct_reg.dataset import read_manifest

CURVES_NAME = 'training_curves.png'
STATE_FORMAT = 'xray_ct_reg.train_state/1'
STATE_SUFFIX = '.state.pt'
LOG_NAME = 'training_log.json'
TRAINING_KEYS = ('line_integral', 'entry', 'exit', 'hit', 'collimation', 'K')


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint's metadata)."""

    data: str
    out: str
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.03
    seed: int = 0
    size: int | None = None
    width: int = 12
    depth: int = 4
    patience: int = 8
    max_minutes: float | None = None
    resume: str | None = None
    stop_after_minutes: float | None = None
    threads: int = 2
    patient: str | None = None
    device: str = 'auto'
    epoch_views: int = 2048
    local_fraction: float = 0.4
    extension_probability: float = 0.5
    extension_mm: float = 200.0
    crop_probability: float = 0.5
    min_crop_scale: float = 0.6
    collimation_probability: float = 0.3
    erase_probability: float = 0.3
    background_weight: float = 0.1
    confident_fraction: float = 0.25
    max_val_samples: int = 96
    progress: bool = True


# ----------------------------------------------------------------------------- data
def load_split(folder, split, limit=None):
    """Stack a dataset split into memory: dict of numpy arrays with a first sample axis.

    Reads the shards listed in the manifest directly (format in docs/INTERFACES.md), which is
    much faster than one sample at a time; ``limit`` keeps the first samples of the split.
    """
    manifest = read_manifest(folder)
    start, stop = manifest['splits'][split]
    if limit is not None:
        stop = min(stop, start + limit)
    if stop <= start:
        raise ValueError(f'dataset {folder} has no {split!r} samples')
    parts = {key: [] for key in TRAINING_KEYS}
    for shard in manifest['shards']:
        first, last = max(start, shard['start']), min(stop, shard['start'] + shard['count'])
        if first >= last:
            continue
        with np.load(Path(folder) / shard['file'], allow_pickle=False) as arrays:
            for key in TRAINING_KEYS:
                parts[key].append(arrays[key][first - shard['start']:last - shard['start']])
    data = {key: np.concatenate(value) for key, value in parts.items()}
    if len(data['K']) != stop - start:
        raise ValueError(f'dataset {folder}: shards hold {len(data["K"])} of the '
                         f'{stop - start} {split!r} samples the manifest lists')
    return data


def resample_split(data, size):
    """Resample an in-memory split to ``size`` x ``size`` px, pixel centres exact.

    The line integral is area-averaged (cv2.INTER_AREA) and K follows ``Intrinsics.resize``;
    the masks and the scene-coordinate maps are interpolated bilinearly at the same pixel
    centres (cv2.INTER_LINEAR maps centres as they do), the maps weighted by the hit mask, and
    a mask pixel is set when at least half of it is.
    """
    height, width = data['line_integral'].shape[1:3]
    if (height, width) == (size, size):
        return data
    target = (int(size), int(size))

    def resized(image):
        return cv2.resize(image, target, interpolation=cv2.INTER_LINEAR)
    out = {'line_integral': np.stack([cv2.resize(image, target, interpolation=cv2.INTER_AREA)
                                      for image in data['line_integral']])}
    hit = np.stack([resized(m.astype(np.float32)) for m in data['hit']])
    for key in ('entry', 'exit'):
        weighted = np.stack([resized(m * h[..., None]) for m, h in
                             zip(data[key], data['hit'].astype(np.float32), strict=True)])
        out[key] = np.where(hit[..., None] >= 0.5,
                            weighted / np.maximum(hit, 1e-6)[..., None], 0.0).astype(
                                data[key].dtype)
    out['hit'] = hit >= 0.5
    out['collimation'] = np.stack([resized(m.astype(np.float32))
                                   for m in data['collimation']]) >= 0.5
    out['K'] = np.stack([geometry.Intrinsics(K, width, height).resize(*target).K
                         for K in data['K']])
    return out


class Augmenter:
    """Turns a stored sample into a random training image and its targets (numpy, seeded)."""

    def __init__(self, config):
        """Augmentation strengths from a :class:`TrainConfig`."""
        self.config = config

    def crop(self, sample, rng):
        """Random square crop (scale in [min_crop_scale, 1]) resized back to the sample size."""
        height, width = sample['line_integral'].shape
        side = int(round(rng.uniform(self.config.min_crop_scale, 1.0) * min(height, width)))
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        window = (slice(y0, y0 + side), slice(x0, x0 + side))
        size = (width, height)
        out = {'line_integral': cv2.resize(sample['line_integral'][window], size,
                                           interpolation=cv2.INTER_LINEAR)}
        for key in ('entry', 'exit'):
            out[key] = cv2.resize(sample[key][window], size,
                                  interpolation=cv2.INTER_NEAREST_EXACT)
        for key in ('hit', 'collimation'):
            out[key] = cv2.resize(sample[key][window].astype(np.uint8), size,
                                  interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
        intrinsics = geometry.Intrinsics(sample['K'], width, height)
        out['K'] = intrinsics.crop(x0, y0, side, side).resize(width, height).K
        return out

    def __call__(self, sample, rng, train=True):
        """Return (image float32 in [0, 1], entry mm, exit mm, bone bool, K)."""
        from xray_ct_reg import simulate

        config = self.config
        if train and rng.random() < config.crop_probability:
            sample = self.crop(sample, rng)
        collimation = sample['collimation'].astype(bool)
        if train and rng.random() < config.collimation_probability:
            collimation = collimation & simulate.collimation_mask(*collimation.shape, rng)
        image = simulate.xray_appearance(sample['line_integral'], rng, polarity='random',
                                         collimation=collimation)
        bone = sample['hit'].astype(bool) & collimation
        if train and rng.random() < config.erase_probability:
            image, bone = random_erase(image, bone, rng)
        image = scr.normalise_intensity(image) if np.ptp(image) > 0 else np.zeros_like(image)
        return image.astype(np.float32), sample['entry'], sample['exit'], bone, sample['K']


def random_erase(image, bone, rng, max_boxes=3):
    """Fill 1..max_boxes random rectangles with a constant; erased pixels are not bone."""
    image, bone = image.copy(), bone.copy()
    height, width = image.shape
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        box_h = int(rng.integers(height // 16 + 1, height // 3 + 2))
        box_w = int(rng.integers(width // 16 + 1, width // 3 + 2))
        y0 = int(rng.integers(0, height - box_h + 1))
        x0 = int(rng.integers(0, width - box_w + 1))
        image[y0:y0 + box_h, x0:x0 + box_w] = rng.uniform(image.min(), image.max())
        bone[y0:y0 + box_h, x0:x0 + box_w] = False
    return image, bone


def make_batch(data, indices, augmenter, rng, train=True):
    """Augment the samples ``indices`` of an in-memory split into torch tensors."""
    items = [augmenter({key: value[i] for key, value in data.items()}, rng, train)
             for i in indices]
    image, entry, exit_, bone, _ = (np.stack(parts) for parts in zip(*items, strict=True))
    return (torch.from_numpy(image)[:, None], torch.from_numpy(entry.astype(np.float32)),
            torch.from_numpy(exit_.astype(np.float32)), torch.from_numpy(bone))


# ----------------------------------------------------------------------------- metrics
def coordinate_errors(network, image, entry_mm, exit_mm, bone):
    """Per bone pixel errors (mm) and sigmas (mm) of entry and exit, as flat numpy arrays."""
    network.eval()
    with torch.no_grad():
        prediction = network.predict(image)
    errors, sigmas = [], []
    for name, target in (('entry', entry_mm), ('exit', exit_mm)):
        error = torch.linalg.norm(prediction[f'{name}_mm'] - target, dim=-1)
        errors.append(error[bone].cpu().numpy())
        sigmas.append(torch.exp(prediction[f'{name}_log_sigma'])[bone].cpu().numpy())
    return np.concatenate(errors), np.concatenate(sigmas)


def summarize_errors(errors, sigmas, confident_sigma_mm):
    """Median error on bone pixels, on confident ones (sigma < threshold), fraction confident."""
    confident = sigmas < confident_sigma_mm
    nan = float('nan')
    return {
        'median_error_mm': float(np.median(errors)) if errors.size else nan,
        'p90_error_mm': float(np.percentile(errors, 90)) if errors.size else nan,
        'median_error_confident_mm': float(np.median(errors[confident])) if confident.any()
        else nan,
        'p90_error_confident_mm': float(np.percentile(errors[confident], 90))
        if confident.any() else nan,
        'fraction_confident': float(confident.mean()) if errors.size else 0.0,
        'confident_sigma_mm': float(confident_sigma_mm),
    }


def validate(network, batches, config):
    """Validation loss and coordinate error summary over fixed, pre-augmented batches."""
    losses, errors, sigmas = [], [], []
    network.eval()
    for image, entry, exit_, bone in batches:
        with torch.no_grad():
            output = network(image)
            loss, _ = scr.scr_loss(output, network.normalise_coordinates(entry),
                                   network.normalise_coordinates(exit_), bone,
                                   config.background_weight)
        losses.append(float(loss) * len(image))
        error, sigma = coordinate_errors(network, image, entry, exit_, bone)
        errors.append(error)
        sigmas.append(sigma)
    sigmas = np.concatenate(sigmas)
    threshold = float(np.quantile(sigmas, config.confident_fraction)) if sigmas.size else 0.0
    metrics = summarize_errors(np.concatenate(errors), sigmas, threshold)
    metrics['loss'] = sum(losses) / sum(len(b[0]) for b in batches)
    return metrics


# ----------------------------------------------------------------------------- training
def learning_rate(config, progress):
    """Warm-up then cosine decay to 1% of ``config.lr``; ``progress`` in [0, 1]."""
    if progress < config.warmup_fraction:
        return config.lr * max(progress / config.warmup_fraction, 0.01)
    phase = (progress - config.warmup_fraction) / max(1.0 - config.warmup_fraction, 1e-9)
    return config.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(phase, 1.0))))


def _checkpoint_metadata(config, source, metrics, history, wall_s):
    """Metadata stored with the checkpoint (JSON-able)."""
    K = np.asarray(history['K'])
    size = source.size
    intrinsics = geometry.Intrinsics(K, size, size, source.info['sdd_mm'])
    return {
        'ct_sha256': source.info['ct_sha256'],
        'ct_path': source.info['ct_path'],
        'image_size': [size, size],
        'intrinsics': {'convention': 'xray_ct_reg.geometry module docstring (pinhole K in px, '
                                     'fx = fy = sdd / pixel spacing, pixel centres at integers)',
                       'K': K.tolist(), 'sdd_mm': intrinsics.sdd_mm,
                       'pixel_spacing_mm': intrinsics.pixel_spacing_mm},
        'geometry': source.info['geometry'],
        'dataset': source.info['dataset'],
        'log_sigma_units': 'predict() returns log(sigma in mm)',
        'confident_sigma_mm': metrics['confident_sigma_mm'],
        'training_config': dataclasses.asdict(config),
        'validation': metrics,
        'epochs_trained': len(history['epochs']),
        'training_wall_s': round(wall_s, 1),
    }


def _write_curves(path, history):
    """Plot train/validation loss and validation errors per epoch (matplotlib Agg)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [entry['epoch'] for entry in history['epochs']]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [e['train_loss'] for e in history['epochs']], label='train')
    left.plot(epochs, [e['val']['loss'] for e in history['epochs']], label='validation')
    left.set_xlabel('epoch')
    left.set_ylabel('loss (NLL)')
    left.legend()
    right.plot(epochs, [e['val']['median_error_mm'] for e in history['epochs']],
               label='median, bone pixels')
    right.plot(epochs, [e['val']['median_error_confident_mm'] for e in history['epochs']],
               label='median, confident bone pixels')
    right.set_xlabel('epoch')
    right.set_ylabel('coordinate error (mm)')
    right.set_yscale('log')
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _progress_bar(total, enabled, description):
    """A tqdm bar (or a silent stand-in when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit='sample',
                dynamic_ncols=True, leave=False)


class ShardSource:
    """Training batches from a simulated dataset folder, held in memory, augmented in numpy."""

    def __init__(self, config, device):
        """Load the splits of ``config.data`` and pre-augment the validation batches."""
        manifest = read_manifest(config.data)
        self.train_data = load_split(config.data, 'train')
        val_data = load_split(config.data, 'val', limit=config.max_val_samples)
        if config.size:
            self.train_data = resample_split(self.train_data, config.size)
            val_data = resample_split(val_data, config.size)
        self.size = int(self.train_data['line_integral'].shape[1])
        self.config, self.device = config, device
        self.steps_per_epoch = max(len(self.train_data['K']) // config.batch_size, 1)
        self.augmenter = Augmenter(config)
        self.K = self.train_data['K'][0]
        self.bone_centroid, self.bone_radius = manifest['bone_centroid'], manifest['bone_radius']
        self.info = {'ct_sha256': manifest.get('ct_sha256'),
                     'ct_path': Path(str(manifest.get('ct_path', ''))).name,
                     'sdd_mm': float((manifest.get('geometry') or {}).get(
                         'sdd_mm', geometry.CIOS_FUSION_SDD_MM)),
                     'geometry': manifest.get('geometry'),
                     'dataset': {'path': str(Path(config.data).resolve()),
                                 'seed': manifest.get('seed'), 'counts': manifest.get('counts')}}
        val_rng = np.random.default_rng(config.seed + 1_000_003)
        count = len(val_data['K'])
        self.val_batches = [self._to_device(make_batch(
            val_data, range(start, min(start + config.batch_size, count)), self.augmenter,
            val_rng, train=False)) for start in range(0, count, config.batch_size)]

    def _to_device(self, batch):
        return tuple(part.to(self.device) for part in batch)

    def epoch(self, rng):
        """The batches of one pass over the training split, in a random order."""
        order = rng.permutation(len(self.train_data['K']))
        size = self.config.batch_size
        for first in range(0, self.steps_per_epoch * size, size):
            yield self._to_device(make_batch(self.train_data, order[first:first + size],
                                             self.augmenter, rng))

    def state(self):
        """Nothing to keep: the data are on disk."""
        return {}

    def restore(self, state):
        """Nothing to restore."""


class OnlineSource:
    """Fresh views every step: ``online_sim`` renders them and ``appearance`` draws the X-ray."""

    def __init__(self, config, device):
        """Load the patient file and render the fixed validation views."""
        from xray_ct_reg.appearance import RandomAppearance
        from xray_ct_reg.online_sim import OnlineSimulator
        from xray_ct_reg.patient_file import read_patient_file

        volumes = read_patient_file(config.patient)
        self.size = int(config.size or 128)
        self.config, self.device = config, device
        self.steps_per_epoch = max(config.epoch_views // config.batch_size, 1)
        self.simulator = OnlineSimulator(volumes, self.size, device, surface_step_mm=1.5,
                                         rays_per_chunk=(
            2 ** 27 if device.type == 'cuda' else 2 ** 22))
        self.appearance = RandomAppearance(volumes, device)
        self.K = geometry.default_intrinsics(self.size).K
        self.bone_centroid, self.bone_radius = volumes.bone_centroid, volumes.bone_radius
        self.info = {'ct_sha256': volumes.ct_sha256, 'ct_path': Path(config.patient).name,
                     'sdd_mm': geometry.CIOS_FUSION_SDD_MM,
                     'geometry': {'sdd_mm': geometry.CIOS_FUSION_SDD_MM,
                                  'detector': 'Siemens Cios Fusion (resampled)'},
                     'dataset': {'online': Path(config.patient).name, 'seed': config.seed}}
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        val_rng = np.random.default_rng(config.seed + 1_000_003)
        val_generator = torch.Generator(device).manual_seed(config.seed + 1_000_003)
        count = config.max_val_samples
        self.val_batches = [self._batch(min(config.batch_size, count - first), val_rng,
                                        val_generator)
                            for first in range(0, count, config.batch_size)]

    def _batch(self, count, rng, generator):
        """Render ``count`` random views; return (image, entry, exit, bone) tensors."""
        config = self.config
        poses, intrinsics, _ = self.simulator.draw_views(rng, count,
                                                         local_fraction=config.local_fraction)
        extension = rng.uniform(0.0, config.extension_mm, count) * (
            rng.random(count) < config.extension_probability)
        with torch.no_grad():
            rendered = self.simulator.render(poses, intrinsics, extension)
            image, bone = self.appearance(rendered, generator)
        return image, rendered['entry'], rendered['exit'], bone

    def epoch(self, rng):
        """``epoch_views`` fresh views in batches (``rng`` is unused: the source has its own)."""
        for _ in range(self.steps_per_epoch):
            yield self._batch(self.config.batch_size, self.rng, self.generator)

    def state(self):
        """Random states, so that a resumed run continues the same stream of views."""
        return {'rng': self.rng.bit_generator.state,
                'generator': self.generator.get_state()}

    def restore(self, state):
        """Continue the stream of views of a saved :meth:`state`."""
        self.rng.bit_generator.state = state['rng']
        self.generator.set_state(state['generator'])


def training_device(name):
    """``torch.device`` for ``--device auto|cpu|cuda`` (auto: CUDA when available)."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but torch sees no CUDA device')
    if name not in ('cpu', 'cuda'):
        raise ValueError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def state_path(checkpoint_path):
    """Where the resumable training state of a checkpoint is written."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(checkpoint_path.stem + STATE_SUFFIX)


def _save_state(path, network, optimizer, progress, source, rng):
    """Write the full-precision weights, optimiser, schedule and random states atomically.

    ``progress`` holds the best checkpoint's bytes too, so a run resumed elsewhere (another
    machine, another ``--out``) that does not beat it still leaves it at its ``out``.
    """
    payload = {'format': STATE_FORMAT, 'network': network.state_dict(),
               'architecture': {'base_width': network.base_width, 'depth': network.depth},
               'optimizer': optimizer.state_dict(), 'progress': progress,
               'source': source.state(), 'rng': rng.bit_generator.state}
    with atomic_file.replaced_on_success(path) as temporary:
        torch.save(payload, temporary)


def _start(config, source, device):
    """Network, optimiser and progress: fresh, from a checkpoint, or from a training state."""
    progress = {'step': 0, 'train_s': 0.0, 'history': [], 'best_loss': math.inf,
                'first_epoch': 0, 'best_metrics': None, 'best_checkpoint': None}
    rng = np.random.default_rng(config.seed)
    state = None
    if config.resume:
        try:
            payload = torch.load(config.resume, weights_only=True, map_location='cpu')
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable file is a bad --resume
            raise ValueError(f'cannot read --resume {config.resume}: {error}') from None
        state = payload if isinstance(payload, dict) and payload.get(
            'format') == STATE_FORMAT else None
    if state is not None:
        network = scr.SCRNet(1, state['architecture']['base_width'],
                             state['architecture']['depth'])
        network.load_state_dict(state['network'])
        progress = state['progress']
        source.restore(state['source'])
        rng.bit_generator.state = state['rng']
    elif config.resume:
        network, resumed = scr.load_checkpoint(config.resume,
                                               expected_ct_sha256=source.info['ct_sha256'])
        progress['history'] = resumed.get('history', [])
        progress['first_epoch'] = len(progress['history'])  # a new schedule starts here
    else:
        network = scr.SCRNet(1, config.width, config.depth)
    network.set_normalisation(source.bone_centroid, source.bone_radius)
    network.to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state['optimizer'])
    return network, optimizer, progress, rng


def train(config):
    """Train an SCR network as ``config`` says; write the best checkpoint; return its metrics.

    Data come from a dataset folder (``config.data``) or, online, from a patient file
    (``config.patient``). Next to ``config.out`` it also writes ``training_curves.png``,
    ``training_log.json`` and the resumable state (``<name>.state.pt``: full-precision weights,
    optimiser, schedule position, random states and the best checkpoint so far, which a resumed
    run writes to its own ``out`` at once; ``--resume`` it to continue). The schedule
    runs over ``epochs`` or ``max_minutes`` of training time, whichever ends first, counted
    across runs resumed from a state (resumed from a checkpoint's weights alone, a new schedule
    starts); ``stop_after_minutes`` ends this run early without changing it. The
    returned dict holds the best validation metrics plus ``epochs``, ``wall_s``,
    ``samples_per_s``, ``device`` and ``checkpoint``.
    """
    started = time.monotonic()
    device = training_device(config.device)
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # fixed input size: pick fast kernels
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    source = (OnlineSource if config.patient else ShardSource)(config, device)
    network, optimizer, progress, rng = _start(config, source, device)
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda'
                else contextlib.nullcontext())
    steps_per_epoch = source.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    budget_s = config.max_minutes * 60.0 if config.max_minutes else None
    history = {'epochs': progress['history'], 'K': np.asarray(source.K).tolist()}
    out = Path(config.out)
    stale, samples_seen, run_train_s = 0, 0, 0.0
    if progress.get('best_checkpoint') is not None:  # resumed: the best so far, wherever out is
        atomic_file.write_bytes(out, progress['best_checkpoint'].numpy().tobytes())
    while len(history['epochs']) - progress['first_epoch'] < config.epochs:
        epoch = len(history['epochs'])
        network.train()
        bar = _progress_bar(steps_per_epoch * config.batch_size, config.progress,
                            f'epoch {epoch + 1}')
        epoch_losses, epoch_start = [], time.monotonic()
        schedule_done = False
        for batch_index, (image, entry, exit_, bone) in enumerate(source.epoch(rng)):
            elapsed = progress['train_s'] + time.monotonic() - epoch_start
            fraction = max(progress['step'] / total_steps, elapsed / budget_s if budget_s else 0.0)
            if fraction >= 1.0:
                schedule_done = True
                break
            for group in optimizer.param_groups:
                group['lr'] = learning_rate(config, fraction)
            with autocast:
                output = network(image)
            loss, _ = scr.scr_loss(output, network.normalise_coordinates(entry),
                                   network.normalise_coordinates(exit_), bone,
                                   config.background_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
            optimizer.step()
            progress['step'] += 1
            epoch_losses.append(loss.detach())
            samples_seen += len(image)
            bar.update(len(image))
            if config.progress and batch_index % 10 == 0:
                with torch.no_grad():
                    delta = network.denormalise(output.detach().float())['entry_mm'] - entry
                    error = torch.linalg.norm(delta, dim=-1)[bone]
                rate = bar.n / max(time.monotonic() - epoch_start, 1e-9)
                bar.set_postfix(loss=f'{float(torch.stack(epoch_losses[-10:]).mean()):.3f}',
                                err_mm=f'{float(error.median()) if error.numel() else 0:.1f}',
                                samples_s=f'{rate:.1f}')
        bar.close()
        epoch_s = time.monotonic() - epoch_start
        progress['train_s'] += epoch_s
        run_train_s += epoch_s
        if not epoch_losses:
            break
        metrics = validate(network, source.val_batches, config)
        train_loss = float(torch.stack(epoch_losses).mean())
        history['epochs'].append({'epoch': epoch + 1, 'train_loss': train_loss, 'val': metrics,
                                  'lr': optimizer.param_groups[0]['lr'],
                                  'step': progress['step'],
                                  'train_s': round(progress['train_s'], 1)})
        print(f"epoch {epoch + 1}: train loss {train_loss:.3f}, val loss "
              f"{metrics['loss']:.3f}, median error {metrics['median_error_mm']:.2f} mm, "
              f"confident {metrics['median_error_confident_mm']:.2f} mm on "
              f"{100 * metrics['fraction_confident']:.0f}% of bone pixels "
              f"({progress['train_s'] / 60:.1f} min)", flush=True)
        if metrics['loss'] < progress['best_loss']:
            progress['best_loss'], progress['best_metrics'], stale = metrics['loss'], metrics, 0
            metadata = _checkpoint_metadata(config, source, metrics, history,
                                            progress['train_s'])
            metadata['history'] = history['epochs']
            scr.save_checkpoint(out, network, metadata)
            progress['best_checkpoint'] = torch.frombuffer(bytearray(out.read_bytes()),
                                                           dtype=torch.uint8)
        else:
            stale += 1
        _save_state(state_path(out), network, optimizer, progress, source, rng)
        _write_curves(out.with_name(CURVES_NAME), history)
        atomic_file.write_text(out.with_name(LOG_NAME),
                               json.dumps(history, indent=1, default=float))
        stop_run = (config.stop_after_minutes is not None
                    and time.monotonic() - started >= config.stop_after_minutes * 60.0)
        if schedule_done or stale >= config.patience or stop_run:
            break
    wall_s = time.monotonic() - started
    result = dict(progress.get('best_metrics') or {})  # absent from states before 93b9184
    result.update({'epochs': len(history['epochs']), 'wall_s': round(wall_s, 1),
                   'samples_per_s': round(samples_seen / max(run_train_s, 1e-9), 2),
                   'device': str(device), 'checkpoint': str(out)})
    return result


# ----------------------------------------------------------------------------- CLI
def _add_common_training_arguments(parser, epochs, max_minutes=None):
    """Training options shared by ``train`` and ``prepare``."""
    defaults = TrainConfig(data='', out='')
    parser.add_argument('--epochs', type=int, default=epochs, help='maximum number of epochs')
    parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
    parser.add_argument('--lr', type=float, default=defaults.lr, help='peak learning rate')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--width', type=int, default=defaults.width,
                        help='channels of the first U-Net level')
    parser.add_argument('--depth', type=int, default=defaults.depth, help='U-Net levels')
    parser.add_argument('--train-size', type=int, default=defaults.size,
                        help='network image size (px); default: the dataset size (128 online)')
    parser.add_argument('--max-minutes', type=float, default=max_minutes,
                        help='the learning-rate schedule ends after this much training time, '
                             'counted across resumed runs')
    parser.add_argument('--stop-after-minutes', type=float, default=None,
                        help='end this run after this many minutes (resume it later); the '
                             'schedule is not shortened')
    parser.add_argument('--patience', type=int, default=defaults.patience,
                        help='early stopping: epochs without validation improvement')
    parser.add_argument('--device', default=defaults.device, choices=('auto', 'cpu', 'cuda'),
                        help='training device (auto: CUDA when available; bf16 autocast there)')
    parser.add_argument('--threads', type=int, default=defaults.threads,
                        help='CPU threads of torch')
    parser.add_argument('--quiet', action='store_true', help='no progress display')


def _config_from_args(args, data, out, resume=None, patient=None):
    """A TrainConfig from parsed CLI arguments."""
    return TrainConfig(data=str(data), out=str(out), epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       size=args.train_size, width=args.width, depth=args.depth,
                       max_minutes=args.max_minutes, patience=args.patience, resume=resume,
                       stop_after_minutes=args.stop_after_minutes, device=args.device,
                       threads=args.threads, patient=patient,
                       epoch_views=getattr(args, 'epoch_views', TrainConfig.epoch_views),
                       progress=not args.quiet)


def _print_result(result):
    """One-paragraph summary of a training run."""
    print(f"best checkpoint {result['checkpoint']} after {result['epochs']} epochs, "
          f"{result['wall_s'] / 60:.1f} min on {result['device']} ({result['samples_per_s']} "
          f"samples/s): validation median error {result.get('median_error_mm', float('nan')):.2f}"
          f" mm, confident {result.get('median_error_confident_mm', float('nan')):.2f} mm on "
          f"{100 * result.get('fraction_confident', 0.0):.0f}% of bone pixels")


def add_train_arguments(parser):
    """Arguments of ``xray-ct-reg train``."""
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument('--data', help='dataset folder (manifest.json + shards)')
    data.add_argument('--patient', help='patient file (xray-ct-reg export-patient): simulate '
                                        'fresh views online, on the training device')
    parser.add_argument('--out', required=True, help='checkpoint file to write (best model)')
    parser.add_argument('--resume', default=None,
                        help='continue from a training state (<name>.state.pt: weights, '
                             'optimiser, schedule) or start from a checkpoint\'s weights')
    parser.add_argument('--epoch-views', type=int, default=TrainConfig.epoch_views,
                        help='online: views per epoch (validation and checkpoint cadence)')
    _add_common_training_arguments(parser, TrainConfig.epochs)


def run_train(args):
    """Run ``xray-ct-reg train``; return the exit status."""
    try:
        result = train(_config_from_args(args, args.data or '', args.out, args.resume,
                                         args.patient))
    except (FileNotFoundError, ValueError) as error:
        print(f'train: {error}')
        return 1
    _print_result(result)
    return 0


def add_export_patient_arguments(parser):
    """Arguments of ``xray-ct-reg export-patient``."""
    parser.add_argument('--ct', required=True, help="CT file or DICOM folder, or 'example'")
    parser.add_argument('--labels', default=None, help='label map aligned with the CT')
    parser.add_argument('--label-ids', type=int, nargs='+', default=None,
                        help='label ids of the bones (default: all labels / threshold)')
    parser.add_argument('--out', required=True, help='patient file to write (.npz)')


def run_export_patient(args):
    """Write the patient file that online training (``train --patient``) reads."""
    from xray_ct_reg import ct, patient_file

    try:
        patient = ct.load_patient(args.ct, args.labels, args.label_ids)
        size = patient_file.write_patient_file(patient, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f'export-patient: {error}')
        return 1
    print(f'wrote {args.out} ({size / 1e6:.1f} MB) for CT {patient.ct_sha256[:12]}')
    return 0


def add_prepare_arguments(parser):
    """Arguments of ``xray-ct-reg prepare``."""
    parser.add_argument('--ct', required=True,
                        help="CT file (NIfTI, NRRD, MHA) or DICOM folder, or 'example'")
    parser.add_argument('--labels', default=None, help='label map aligned with the CT')
    parser.add_argument('--label-ids', type=int, nargs='+', default=None,
                        help='label ids of the bones to use (default: all labels / threshold)')
    parser.add_argument('--out', required=True, help='output folder (data/ and model.pt)')
    parser.add_argument('-n', '--num-samples', type=int, default=4000,
                        help='number of simulated views')
    parser.add_argument('--size', type=int, default=64,
                        help='simulated (and network) image size (px); 64 fits a 2-core CPU')
    _add_common_training_arguments(parser, TrainConfig.epochs, max_minutes=27.0)


def run_prepare(args):
    """Run ``xray-ct-reg prepare``: simulate a dataset from the CT, then train on it."""
    from xray_ct_reg import ct, simulate

    out = Path(args.out)
    data = out / 'data'
    try:
        patient = ct.load_patient(args.ct, args.labels, args.label_ids)
        if not (data / 'manifest.json').is_file():
            print(f'simulating {args.num_samples} views of {args.size} px into {data}')
            simulate.write_dataset(patient, data, args.num_samples, args.size, args.seed)
        result = train(_config_from_args(args, data, out / 'model.pt'))
    except (FileNotFoundError, ValueError) as error:
        print(f'prepare: {error}')
        return 1
    _print_result(result)
    return 0

