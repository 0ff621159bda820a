"""ROS-style lint test: ruff (pycodestyle, pyflakes, pydocstyle, isort, bugbear) must pass."""
from pathlib import Path
import shutil
import subprocess
import sys

REPO = Path(__file__).resolve().parent.parent
LINTED = ['xray_ct_reg', 'test', 'bench', 'launch']


def test_ruff():
    ruff = shutil.which('ruff', path=str(Path(sys.executable).parent)) or shutil.which('ruff')
    assert ruff, 'ruff not installed: run scripts/bootstrap.sh'
    paths = [p for p in LINTED if (REPO / p).exists()]
    result = subprocess.run([ruff, 'check', '--no-cache', '--config', str(REPO / 'ruff.toml'),
                             *paths], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f'ruff found problems:\n{result.stdout}{result.stderr}'
