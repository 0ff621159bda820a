"""The manifest of a dataset folder written by ``simulate.write_dataset``.

``read_manifest`` validates it; ``train.load_split`` reads a split's shards into memory (the
shard format is in docs/INTERFACES.md).
"""
import json
from pathlib import Path

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
