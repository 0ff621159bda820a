"""The package builds with colcon like on a ROS machine and its installed node really runs.

Needs the loopback-only sandbox (``make test``) and the build tools from requirements-build.txt.
"""
import signal
import subprocess
import time

import pytest

PACKAGE = 'xray_ct_reg'
NODE_EXECUTABLE = 'xray_ct_reg_node'
NODE_FQN = '/' + NODE_EXECUTABLE
EXPECTED_PARAMETERS = {'model_path', 'ct_path', 'ct_frame', 'image_topic'}


def test_colcon_install_layout(colcon_install):
    assert (colcon_install / 'lib' / PACKAGE / NODE_EXECUTABLE).is_file()
    share = colcon_install / 'share' / PACKAGE
    assert (share / 'package.xml').is_file()
    assert (share / 'launch').is_dir()
    assert (share / 'config').is_dir()
    assert (colcon_install / 'share' / 'ament_index' / 'resource_index' / 'packages'
            / PACKAGE).is_file()
    assert (colcon_install / 'setup.bash').is_file()


def _list_parameters(node, executor, deadline):
    """Return the parameter names of the node under test, or None before the deadline."""
    from rcl_interfaces.srv import ListParameters

    client = node.create_client(ListParameters, NODE_FQN + '/list_parameters')
    try:
        while time.monotonic() < deadline:
            if client.wait_for_service(timeout_sec=0.5):
                future = client.call_async(ListParameters.Request())
                executor.spin_until_future_complete(future, timeout_sec=5.0)
                if future.done() and future.result() is not None:
                    return set(future.result().result.names)
        return None
    finally:
        node.destroy_client(client)


def test_installed_node_runs_and_stops_on_sigint(colcon_install, colcon_env, rclpy_context):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    executable = colcon_install / 'lib' / PACKAGE / NODE_EXECUTABLE
    proc = subprocess.Popen([str(executable)], env=colcon_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    probe = Node('packaging_test_probe', context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(probe)
    try:
        deadline = time.monotonic() + 20.0
        seen = False
        while time.monotonic() < deadline and proc.poll() is None:
            names = {ns.rstrip('/') + '/' + name
                     for name, ns in probe.get_node_names_and_namespaces()}
            if NODE_FQN in names:
                seen = True
                break
            executor.spin_once(timeout_sec=0.2)
        assert proc.poll() is None, f'node exited early ({proc.returncode}):\n' + (
            proc.stdout.read() if proc.stdout else '')
        assert seen, f'{NODE_FQN} not discovered within 20 s'
        parameters = _list_parameters(probe, executor, deadline=time.monotonic() + 40.0)
        assert parameters is not None, 'list_parameters service did not answer'
        assert EXPECTED_PARAMETERS <= parameters, parameters
    finally:
        executor.remove_node(probe)
        probe.destroy_node()
        executor.shutdown()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f'node did not stop within 10 s of SIGINT:\n{output}')
    assert proc.returncode == 0, f'node exit code {proc.returncode} after SIGINT:\n{output}'
