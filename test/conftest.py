"""Shared pytest fixtures: the colcon-installed package and a real rclpy context.

ROS tests must run inside the loopback-only network namespace made by scripts/ros_sandbox.sh
(``make test`` does that); DDS traffic must never reach the real network.
"""
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parent.parent
# bench/'s scripts (heldout_family: the held-out appearance family) are imported by the tests
# that check them
sys.path.insert(0, str(REPO / 'bench'))
PACKAGE = 'xray_ct_reg'
NODE_EXECUTABLE = 'xray_ct_reg_node'


def _venv_prefix() -> Path:
    """Return the prefix of the running interpreter's environment (the venv)."""
    return Path(os.environ.get('VIRTUAL_ENV') or sys.prefix)


@pytest.fixture(scope='session')
def ros_sandbox():
    """Fail unless we run inside scripts/ros_sandbox.sh (private, loopback-only network)."""
    if os.environ.get('XRAY_CT_REG_SANDBOX') != '1':
        pytest.fail('ROS tests must run in the loopback-only network sandbox: use `make test` '
                    'or `scripts/ros_sandbox.sh .venv/bin/python -m pytest -q test`', pytrace=False)


@pytest.fixture(scope='session')
def colcon_install(tmp_path_factory) -> Path:
    """Build this package with colcon (as on a ROS machine) once per session.

    Returns the (merged) install base ``<tmp>/install``; the node executable is
    ``<install>/lib/xray_ct_reg/xray_ct_reg_node``; run it with the ``colcon_env`` fixture.
    """
    colcon = shutil.which('colcon', path=str(Path(sys.executable).parent)) or shutil.which(
        'colcon')
    if colcon is None:
        pytest.fail('colcon not found: run scripts/bootstrap.sh (installs requirements-build.txt)',
                    pytrace=False)
    base = tmp_path_factory.mktemp('colcon')
    env = dict(os.environ)
    env['AMENT_PREFIX_PATH'] = str(_venv_prefix())
    env['COLCON_HOME'] = str(base / 'colcon_home')
    env.pop('COLCON_PREFIX_PATH', None)
    cmd = [colcon, '--log-base', str(base / 'log'), 'build',
           '--base-paths', str(REPO),
           '--packages-select', PACKAGE,
           '--build-base', str(base / 'build'),
           '--install-base', str(base / 'install'), '--merge-install']
    result = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f'colcon build failed ({result.returncode}):\n{result.stdout[-4000:]}\n'
                    f'{result.stderr[-4000:]}', pytrace=False)
    return base / 'install'


@pytest.fixture(scope='session')
def colcon_env(colcon_install) -> dict:
    """Return os.environ as after ``. <install>/setup.bash``, for starting installed executables.

    The setup script is really sourced (bash), so this checks it works, too.
    """
    install = colcon_install
    env = dict(os.environ)
    env['AMENT_PREFIX_PATH'] = str(_venv_prefix())
    out = subprocess.run(
        ['bash', '-c', f'source "{install}/setup.bash" && env -0'],
        env=env, capture_output=True, check=True, timeout=60).stdout
    return dict(item.split('=', 1) for item in out.decode().split('\0') if '=' in item)


@pytest.fixture
def rclpy_context(ros_sandbox):
    """Yield an initialised rclpy Context of its own; shut it down afterwards."""
    import rclpy
    from rclpy.context import Context

    from xray_ct_reg import ros_io
    ros_io.select_transport_profile()
    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)
