"""Torch Dataset over the shards written by ``simulate.write_dataset``.

Shards are uncompressed ``.npz`` files, so every array is memory-mapped straight out of the zip
and a sample reads only its own bytes; compressed shards (written by other tools) fall back to
loading whole arrays, with a small cache of open shards.
"""
from collections import OrderedDict
import json
from pathlib import Path
import zipfile

import numpy as np
from torch.utils.data import Dataset

SAMPLE_KEYS = ('line_integral', 'entry', 'exit', 'hit', 'collimation', 'K', 'pose')
_MANIFEST_KEYS = ('ct_sha256', 'size', 'counts', 'splits', 'shards', 'bone_centroid',
                  'bone_radius', 'seed')


class DatasetError(ValueError):
    """A dataset folder or manifest is missing, corrupt or inconsistent."""


def read_manifest(folder):
    """Read and validate ``folder/manifest.json``; DatasetError says what is wrong."""
    path = Path(folder) / 'manifest.json'
    if not path.is_file():
        raise DatasetError(f'dataset manifest not found: {path}')
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f'corrupt dataset manifest {path}: {error}') from None
    if not isinstance(manifest, dict):
        raise DatasetError(f'corrupt dataset manifest {path}: not a JSON object')
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DatasetError(f'dataset manifest {path} lacks {missing}')
    total = sum(int(shard['count']) for shard in manifest['shards'])
    if total != manifest['counts']['total']:
        raise DatasetError(f'dataset manifest {path}: shards hold {total} samples, counts say '
                           f"{manifest['counts']['total']}")
    for shard in manifest['shards']:
        if not (Path(folder) / shard['file']).is_file():
            raise DatasetError(f"dataset shard missing: {Path(folder) / shard['file']}")
    return manifest


def _memmap_npz(path):
    """Memory-map every array of an uncompressed .npz; None if any member is compressed."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, 'rb') as handle:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            handle.seek(info.header_offset)
            local_header = handle.read(30)
            name_length = int.from_bytes(local_header[26:28], 'little')
            extra_length = int.from_bytes(local_header[28:30], 'little')
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            arrays[info.filename.removesuffix('.npy')] = np.memmap(
                path, dtype=dtype, mode='r', offset=handle.tell(), shape=shape,
                order='F' if fortran else 'C')
    return arrays


class ShardDataset(Dataset):
    """Samples of one split of a dataset folder, as dicts of numpy arrays.

    Each item holds ``line_integral`` (H, W) float32, ``entry``/``exit`` (H, W, 3) float32 CT
    mm (0 where not hit), ``hit``/``collimation`` (H, W) bool, ``K`` (3, 3) and ``pose`` (4, 4)
    float64. ``manifest`` is the validated manifest.
    """

    def __init__(self, folder, split='train', keys=SAMPLE_KEYS, max_open_shards=4):
        """Index the samples of ``split`` ('train', 'val' or 'all') in ``folder``."""
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.keys = tuple(keys)
        if split == 'all':
            start, stop = 0, self.manifest['counts']['total']
        elif split in self.manifest['splits']:
            start, stop = self.manifest['splits'][split]
        else:
            raise DatasetError(f"unknown split {split!r} (have {list(self.manifest['splits'])})")
        self.indices = np.arange(start, stop)
        self._shard_starts = np.array([s['start'] for s in self.manifest['shards']])
        self._open = OrderedDict()
        self._max_open = max_open_shards

    def __len__(self):
        """Number of samples in the split."""
        return len(self.indices)

    def _shard(self, number):
        """Arrays of shard ``number`` (memory-mapped when possible), from a small LRU cache."""
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        path = self.folder / self.manifest['shards'][number]['file']
        try:
            arrays = _memmap_npz(path)
            if arrays is None:
                with np.load(path) as data:
                    arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DatasetError(f'corrupt dataset shard {path}: {error}') from None
        missing = [key for key in self.keys if key not in arrays]
        if missing:
            raise DatasetError(f'dataset shard {path} lacks {missing}')
        self._open[number] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def __getitem__(self, item):
        """Sample ``item`` of the split as a dict of numpy arrays (copies)."""
        if not -len(self) <= item < len(self):
            raise IndexError(f'sample {item} out of range ({len(self)} samples)')
        index = int(self.indices[item])
        number = int(np.searchsorted(self._shard_starts, index, side='right') - 1)
        arrays = self._shard(number)
        row = index - int(self._shard_starts[number])
        return {key: np.array(arrays[key][row]) for key in self.keys}
