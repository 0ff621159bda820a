"""Simulated C-arm views of a patient's CT: poses, DRRs, scene coordinates, dataset shards.

For each view the simulator renders the DRR line integral (``drr.DRRProjector``) and ray casts
the bone mesh (Open3D ``RaycastingScene``) through every pixel centre: the first hit is the
pixel's *entry* scene coordinate, the last hit its *exit* coordinate (CT mm). ``write_dataset``
stores many such views as shards plus a manifest (formats in docs/INTERFACES.md), and the
``simulate`` CLI wraps it.
"""
from dataclasses import asdict
import io
import json
import multiprocessing
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np
import open3d as o3d
from scipy.ndimage import gaussian_filter
import torch

from xray_ct_reg import geometry
from xray_ct_reg.drr import DRRProjector
from xray_ct_reg.views import PoseSampler, local_view_intrinsics  # noqa: F401 (re-exported)

DATASET_FORMAT_VERSION = 1
SHARD_KEYS = {  # key -> dtype; arrays are stacked along a first (sample) axis
    'line_integral': 'float32', 'entry': 'float32', 'exit': 'float32', 'hit': 'bool',
    'collimation': 'bool', 'pose': 'float64', 'K': 'float64', 'sdd_mm': 'float64',
    'index': 'int64', 'local_view': 'bool'}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: same seed -> same shard bytes


# ----------------------------------------------------------------------------- ray casting
def make_scene(mesh):
    """Open3D ray-casting scene of a legacy ``TriangleMesh``."""
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(mesh))
    return scene


def raycast_scene_coordinates(scene, pose, intrinsics, bounds=None):
    """Entry and exit scene coordinates of every pixel-centre ray.

    Returns ``entry``, ``exit`` ((H, W, 3) float32 CT mm, NaN where the ray misses) and ``hit``
    ((H, W) bool). The exit is the first hit of the reverse ray cast from a point beyond the
    mesh back towards the source; ``bounds`` ((min (3,), max (3,)) of the mesh, mm) places that
    point just past the mesh (default: 4 m from the source).
    """
    width, height = intrinsics.width, intrinsics.height
    pixels = geometry.pixel_centers(width, height).reshape(-1, 2)
    source, directions = geometry.backproject_rays(pose, intrinsics.K, pixels)
    far_mm = 4000.0
    if bounds is not None:
        corners = np.array(np.meshgrid(*np.asarray(bounds, dtype=float).T)).reshape(3, -1).T
        far_mm = float(np.linalg.norm(corners - source, axis=1).max()) + 10.0
    rays = np.concatenate([np.broadcast_to(source, directions.shape), directions], axis=1)
    t_entry = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))['t_hit'].numpy()
    far_points = source + far_mm * directions
    reverse = np.concatenate([far_points, -directions], axis=1)
    t_reverse = scene.cast_rays(o3d.core.Tensor(reverse.astype(np.float32)))['t_hit'].numpy()
    hit = np.isfinite(t_entry) & np.isfinite(t_reverse)
    entry = np.full(directions.shape, np.nan)
    exit_ = np.full(directions.shape, np.nan)
    entry[hit] = source + t_entry[hit, None].astype(np.float64) * directions[hit]
    exit_[hit] = far_points[hit] - t_reverse[hit, None].astype(np.float64) * directions[hit]
    shape = (height, width)
    return (entry.reshape(*shape, 3).astype(np.float32),
            exit_.reshape(*shape, 3).astype(np.float32), hit.reshape(shape))


# ----------------------------------------------------------------------------- collimation
def collimation_mask(height, width, rng):
    """Random collimator shutters: rectangular, iris or both. True = beam passes."""
    v, u = np.mgrid[0:height, 0:width]
    mask = np.ones((height, width), dtype=bool)
    kind = rng.integers(3)  # 0 rectangle, 1 iris, 2 both
    if kind in (0, 2):
        left, right = rng.uniform(0.0, 0.25, 2) * width
        top, bottom = rng.uniform(0.0, 0.25, 2) * height
        mask &= (u >= left) & (u <= width - 1 - right) & (v >= top) & (v <= height - 1 - bottom)
    if kind in (1, 2):
        centre = np.array([width, height]) * (0.5 + rng.uniform(-0.1, 0.1, 2))
        radius = rng.uniform(0.45, 0.75) * min(width, height)
        mask &= (u - centre[0]) ** 2 + (v - centre[1]) ** 2 <= radius ** 2
    return mask


# ----------------------------------------------------------------------------- appearance
def xray_appearance(line_integral, rng=None, polarity='random', collimation=None,
                    contrast=(0.1, 2.5), gamma=(0.7, 1.4), noise=(0.0, 0.04), blur_px=(0.0, 1.0),
                    window=((0.0, 5.0), (97.0, 100.0))):
    """Detector-like image in [0, 1] (float32) from a line integral image.

    The line integral L is windowed between two percentiles of the open (uncollimated) pixels
    (drawn from ``window``) to x in [0, 1]; the intensity exp(-k x) (k from ``contrast``) is
    rescaled to [0, 1] (dark bone, as raw detector intensity), gamma corrected, given
    Poisson-like noise and a Gaussian blur, and inverted for ``'bright_bone'`` (as displayed
    radiographs). ``polarity='random'`` picks one. Collimated pixels (``collimation`` False) get
    a flat level of no exposure. ``rng=None`` takes the middle of every range, no noise, no blur
    and bright bone. Deterministic for a given ``rng`` state.
    """
    line_integral = np.nan_to_num(np.asarray(line_integral, dtype=np.float64))
    pick = (lambda r: 0.5 * (r[0] + r[1])) if rng is None else (lambda r: rng.uniform(*r))
    if polarity == 'random':
        polarity = 'bright_bone' if rng is None or rng.random() < 0.5 else 'dark_bone'
    if polarity not in ('bright_bone', 'dark_bone'):
        raise ValueError(f"polarity must be 'random', 'bright_bone' or 'dark_bone': {polarity}")
    open_values = line_integral if collimation is None else line_integral[collimation]
    if open_values.size == 0:
        open_values = line_integral
    low, high = np.percentile(open_values, [pick(window[0]), pick(window[1])])
    x = np.clip((line_integral - low) / max(high - low, 1e-6), 0.0, 1.0)
    k = pick(contrast)
    image = (np.exp(-k * x) - np.exp(-k)) / (1.0 - np.exp(-k))
    image = image ** pick(gamma)
    if collimation is not None:
        image = np.where(collimation, image, 0.0 if rng is None else rng.uniform(0.0, 0.1))
    if rng is not None:
        sigma = pick(noise)
        image = image + sigma * np.sqrt(np.clip(image, 0.0, 1.0)) * rng.standard_normal(
            image.shape)
        image = gaussian_filter(image, pick(blur_px))
    if polarity == 'bright_bone':
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- simulator
class Simulator:
    """Simulates C-arm views of one patient: DRR + scene coordinates."""

    def __init__(self, patient, projector=None):
        """Prepare the DRR projector and the ray-casting scene (both once per patient)."""
        self.patient = patient
        self.projector = projector or DRRProjector(patient.ct)
        self.scene = make_scene(patient.mesh)
        bounds = patient.mesh.get_axis_aligned_bounding_box()
        self.bounds = (np.asarray(bounds.min_bound), np.asarray(bounds.max_bound))
        self.vertices = np.asarray(patient.mesh.vertices)

    def simulate(self, pose, intrinsics, collimation=None):
        """One view as a Sample dict (docs/INTERFACES.md); ``collimation`` None = fully open."""
        pose = np.asarray(pose, dtype=float)
        if not geometry.is_rigid(pose):
            raise ValueError(f'pose is not a rigid 4x4 transform: {pose}')
        entry, exit_, hit = raycast_scene_coordinates(self.scene, pose, intrinsics,
                                                     self.bounds)
        line_integral = self.projector.render(pose, intrinsics)
        shape = (intrinsics.height, intrinsics.width)
        if collimation is None:
            collimation = np.ones(shape, dtype=bool)
        elif collimation.shape != shape:
            raise ValueError(f'collimation mask {collimation.shape} does not match {shape}')
        return {'line_integral': line_integral, 'entry': entry, 'exit': exit_, 'hit': hit,
                'pose': pose, 'K': intrinsics.K.copy(), 'collimation': collimation.astype(bool),
                'sdd_mm': float(intrinsics.sdd_mm)}

    def random_view(self, rng, size, sampler=None, local_fraction=0.4, collimation_fraction=0.3,
                    extreme=False):
        """Draw a pose, maybe a local view and collimation, and simulate it.

        Returns (sample dict with ``local_view`` added, pose parameter dict).
        """
        sampler = sampler or PoseSampler()
        pose, params = sampler.sample(rng, self.vertices, self.patient.bone_centroid, extreme)
        intrinsics = geometry.default_intrinsics(size)
        local = bool(rng.random() < local_fraction)
        if local:
            intrinsics = local_view_intrinsics(intrinsics, rng)
        collimation = (collimation_mask(size, size, rng)
                       if rng.random() < collimation_fraction else None)
        sample = self.simulate(pose, intrinsics, collimation)
        sample['local_view'] = local
        return sample, params


# ----------------------------------------------------------------------------- dataset
def _save_npz(path, arrays):
    """np.savez-compatible, uncompressed, byte-deterministic (fixed zip timestamps)."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f'{key}.npy', date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def _stack_shard(samples):
    """Stack sample dicts into shard arrays (entry/exit NaN -> 0)."""
    arrays = {}
    for key, dtype in SHARD_KEYS.items():
        arrays[key] = np.stack([np.asarray(s[key]) for s in samples]).astype(dtype)
    for key in ('entry', 'exit'):
        arrays[key] = np.nan_to_num(arrays[key], nan=0.0)
    return arrays


def _contact_sheet(path, samples, patient, rows=6):
    """PNG: per sample, DRR appearance | entry coordinates as RGB | exit as RGB | hit mask."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    chosen = samples[:rows]
    figure, axes = plt.subplots(len(chosen), 4, figsize=(10, 2.5 * len(chosen)), squeeze=False)
    low = patient.bone_centroid - patient.bone_radius
    span = 2.0 * patient.bone_radius
    for row, sample in zip(axes, chosen, strict=True):
        image = xray_appearance(sample['line_integral'], None, 'bright_bone',
                                sample['collimation'])
        row[0].imshow(image, cmap='gray', vmin=0, vmax=1)
        for column, key in ((1, 'entry'), (2, 'exit')):
            rgb = np.clip((sample[key] - low) / span, 0, 1)
            row[column].imshow(np.where(sample['hit'][..., None], rgb, 0.0))
        row[3].imshow(sample['hit'], cmap='gray')
        row[0].set_ylabel(f"#{sample['index']}{' local' if sample['local_view'] else ''}")
    for axis, title in zip(axes[0], ('DRR (bright bone)', 'entry xyz', 'exit xyz', 'hit'),
                           strict=True):
        axis.set_title(title)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


_WORKER = {}  # state of a dataset worker process (inherited by fork)


def _worker_view(job):
    """Simulate view ``job = (index, seed sequence)`` with the worker's simulator."""
    index, seed_sequence = job
    state = _WORKER
    if 'simulator' not in state:  # first job in this process: own scene, one torch thread
        torch.set_num_threads(1)
        state['simulator'] = Simulator(state['patient'], state['projector'])
    sample, _ = state['simulator'].random_view(np.random.default_rng(seed_sequence),
                                               *state['args'])
    sample['index'] = index
    return sample


def _views(simulator, jobs, args, workers):
    """Iterate over the simulated views of ``jobs`` in order, with ``workers`` processes."""
    if workers <= 1:
        for index, seed_sequence in jobs:
            sample, _ = simulator.random_view(np.random.default_rng(seed_sequence), *args)
            sample['index'] = index
            yield sample
        return
    _WORKER.clear()
    _WORKER.update(patient=simulator.patient, projector=simulator.projector, args=args)
    with multiprocessing.get_context('fork').Pool(workers) as pool:
        yield from pool.imap(_worker_view, jobs, chunksize=4)
    _WORKER.clear()


def write_dataset(patient, out_dir, n, size=128, seed=0, local_fraction=0.4, val_fraction=0.1,
                  shard_size=250, sampler=None, progress=True, collimation_fraction=0.3,
                  overwrite=False, simulator=None, workers=2):
    """Simulate ``n`` views of ``patient`` into ``out_dir`` (shards, manifest, contact sheet).

    Sample i is drawn from ``np.random.SeedSequence(seed).spawn(n)[i]`` so the shards are
    byte-identical for the same seed, whatever the number of ``workers`` (processes, one torch
    thread each; 1 = in this process). The last ``val_fraction`` of samples form the 'val'
    split. The folder is written under a temporary name and renamed when complete. Returns the
    manifest dict.
    """
    from tqdm import tqdm
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'dataset folder {out_dir} exists and is not empty '
                              '(use overwrite=True / --overwrite)')
    if n < 1 or size < 8 or shard_size < 1:
        raise ValueError(f'need n >= 1, size >= 8, shard_size >= 1 (got {n}, {size}, '
                         f'{shard_size})')
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= local_fraction <= 1.0):
        raise ValueError(f'need 0 <= val_fraction < 1 and 0 <= local_fraction <= 1 (got '
                         f'{val_fraction}, {local_fraction})')
    sampler = sampler or PoseSampler()
    simulator = simulator or Simulator(patient)
    prepare_s = time.perf_counter() - start
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        jobs = list(enumerate(np.random.SeedSequence(seed).spawn(n)))
        views = _views(simulator, jobs, (size, sampler, local_fraction, collimation_fraction),
                       workers)
        shards, sheet_samples, pending, bone_pixels = [], [], [], 0.0
        collimated = local = 0
        for i, sample in enumerate(tqdm(views, total=n, desc='simulate', unit='view',
                                        disable=not progress)):
            bone_pixels += float(sample['hit'].mean())
            collimated += int(not sample['collimation'].all())
            local += int(sample['local_view'])
            pending.append(sample)
            if len(sheet_samples) < 6:
                sheet_samples.append(sample)
            if len(pending) == shard_size or i == n - 1:
                name = f'shard_{len(shards):05d}.npz'
                _save_npz(tmp_dir / name, _stack_shard(pending))
                shards.append({'file': name, 'start': i + 1 - len(pending),
                               'count': len(pending)})
                pending = []
        _contact_sheet(tmp_dir / 'contact_sheet.png', sheet_samples, patient)
        n_val = int(round(n * val_fraction)) if n > 1 else 0
        elapsed = time.perf_counter() - start
        intrinsics = geometry.default_intrinsics(size)
        manifest = {
            'format_version': DATASET_FORMAT_VERSION,
            'ct_sha256': patient.ct_sha256, 'ct_path': patient.ct_path,
            'labels_path': patient.labels_path, 'mask_params': patient.mask_params,
            'size': {'width': size, 'height': size},
            'geometry': {'sdd_mm': intrinsics.sdd_mm, 'K': intrinsics.K.tolist(),
                         'pixel_spacing_mm': intrinsics.pixel_spacing_mm,
                         'detector': 'Siemens Cios Fusion (resampled)'},
            'pose_ranges': asdict(sampler), 'seed': int(seed), 'local_fraction': local_fraction,
            'collimation_fraction': collimation_fraction,
            'counts': {'total': n, 'train': n - n_val, 'val': n_val, 'local_views': local,
                       'collimated': collimated},
            'splits': {'train': [0, n - n_val], 'val': [n - n_val, n]},
            'shards': shards, 'keys': SHARD_KEYS,
            'bone_centroid': np.asarray(patient.bone_centroid).tolist(),
            'bone_radius': float(patient.bone_radius),
            'bone_pixel_fraction': bone_pixels / n,
            'workers': workers,
            'timing': {'prepare_s': prepare_s, 'total_s': elapsed,
                       'samples_per_s': n / max(elapsed - prepare_s, 1e-9)},
        }
        (tmp_dir / 'manifest.json').write_text(json.dumps(manifest, indent=1))
        tmp_dir.chmod(0o755)  # mkdtemp made it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- CLI
def add_simulate_arguments(parser):
    """Arguments of ``xray-ct-reg simulate``."""
    parser.add_argument('--ct', required=True, help="CT file or DICOM folder, or 'example'")
    parser.add_argument('--labels', help='label map on the CT grid (mesh from its labels)')
    parser.add_argument('--label-ids', type=int, nargs='+', help='bone label ids for the mesh')
    parser.add_argument('--target-label-ids', type=int, nargs='+',
                        help='label ids whose centroids are the target points')
    parser.add_argument('--threshold-hu', type=float, default=250.0,
                        help='bone threshold without a label map (HU)')
    parser.add_argument('--out', required=True, help='output dataset folder')
    parser.add_argument('-n', type=int, default=2000, help='number of views')
    parser.add_argument('--size', type=int, default=128, help='image size (px)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--local-fraction', type=float, default=0.4,
                        help='fraction of local (cropped detector) views')
    parser.add_argument('--val-fraction', type=float, default=0.1)
    parser.add_argument('--shard-size', type=int, default=250)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing folder')
    parser.add_argument('--workers', type=int, default=2,
                        help='simulation processes (one torch thread each)')


def run_simulate(args):
    """Load the patient, write the dataset, print a summary; return the exit status."""
    from xray_ct_reg.ct import CTError, load_patient
    start = time.perf_counter()
    try:
        patient = load_patient(args.ct, args.labels, args.label_ids, args.target_label_ids,
                               args.threshold_hu)
    except (CTError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'patient: {patient.ct_path} ({patient.ct_sha256[:12]}), mesh '
          f'{len(patient.mesh.triangles)} triangles, {len(patient.targets)} targets, '
          f'loaded in {patient.load_time_s:.1f} s')
    try:
        manifest = write_dataset(patient, args.out, args.n, args.size, args.seed,
                                 args.local_fraction, args.val_fraction, args.shard_size,
                                 overwrite=args.overwrite, workers=args.workers)
    except (OSError, ValueError) as error:  # FileExistsError, PermissionError are OSErrors
        print(f'error: {error}', file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    timing = manifest['timing']
    print(f"wrote {args.n} views ({manifest['counts']['train']} train, "
          f"{manifest['counts']['val']} val) of {args.size}x{args.size} px to {args.out} in "
          f"{total:.1f} s ({timing['samples_per_s']:.1f} samples/s); bone pixel fraction "
          f"{manifest['bone_pixel_fraction']:.3f}; contact sheet: "
          f"{Path(args.out) / 'contact_sheet.png'}")
    return 0
