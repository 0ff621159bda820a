"""Benchmark of the registration node at 1024^2 mono16 input: latency and throughput.

Runs the node and a 30 Hz simulated C-arm stream in this process over real rclpy (run it in the
sandbox: ``scripts/ros_sandbox.sh .venv/bin/python bench/node.py``). Latency is measured from
the image stamp to the TF's arrival at a separate listener node; throughput is processed frames
per second. Prints a table and writes bench/results/node.json (SCR only, node defaults) or,
with ``--refine``, bench/results/node_refine.json (config/registration.yaml's mode: intensity
refinement against the embedded CT; each frame then takes seconds, so run it longer, e.g.
``--seconds 60``).
"""
import argparse
import json
import os
from pathlib import Path
import platform
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=20.0)
    parser.add_argument('--rate', type=float, default=30.0)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--model', default=None)
    parser.add_argument('--refine', action='store_true',
                        help='intensity refinement against the embedded CT (the YAML default)')
    parser.add_argument('--out', default=None, help='JSON path (default: bench/results/'
                                                     'node.json, node_refine.json with --refine)')
    args = parser.parse_args()
    results_dir = Path(__file__).parent / 'results'
    args.out = args.out or str(results_dir / ('node_refine.json' if args.refine else 'node.json'))

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    from xray_ct_reg import ct, geometry, ros_io, sim_carm
    from xray_ct_reg.demo import _Listener, _spin_in_background
    from xray_ct_reg.node import RegistrationNode, default_model_path
    from xray_ct_reg.register import to_jsonable

    model = args.model or default_model_path()
    patient = ct.load_patient('example')
    poses = sim_carm.sample_poses(patient, 4, seed=11)
    frames = sim_carm.render_frames(patient, poses, size=args.size, render_size=256, seed=11)
    ros_io.select_transport_profile()
    context = Context()
    rclpy.init(context=context)
    node = RegistrationNode(context=context, parameter_overrides=[
        Parameter('model_path', value=str(model)), Parameter('publish_overlay', value=False),
        Parameter('intensity_refine', value=args.refine),
        Parameter('ct_path', value='example' if args.refine else '')])
    done = []
    node.result_callback = lambda stamp, verdict, reason, result: done.append(
        (stamp, verdict, time.time_ns(), result.timings_ms if result else {}))
    feeder = Node('bench_feeder', context=context)
    listener = _Listener(context)
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    image_pub = feeder.create_publisher(Image, '/carm/image_raw', qos)
    info_pub = feeder.create_publisher(CameraInfo, '/carm/camera_info', qos)
    executor = SingleThreadedExecutor(context=context)  # callbacks are short: a worker registers
    for each in (node, feeder, listener.node):
        executor.add_node(each)
    assert node.start(), node.stats()
    spinner = _spin_in_background(executor)
    while image_pub.get_subscription_count() == 0 or info_pub.get_subscription_count() == 0:
        time.sleep(0.05)
    messages = [(ros_io.array_to_image_msg(f.image, 'mono16'),
                 ros_io.intrinsics_to_camera_info(f.intrinsics)) for f in frames]
    start, sent, truths = time.monotonic(), 0, {}
    while time.monotonic() - start < args.seconds:
        image, info = messages[sent % len(messages)]
        stamp = time.time_ns()
        header = Header(frame_id='carm')
        header.stamp.sec, header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        image.header = info.header = header
        info_pub.publish(info)
        image_pub.publish(image)
        truths[stamp] = frames[sent % len(frames)].pose
        sent += 1
        time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
    time.sleep(2.0)
    stats = node.stats()
    executor.shutdown()
    spinner.join()  # its last callback done before the nodes are destroyed
    node.stop()
    for each in (node, feeder, listener.node):
        each.destroy_node()
    rclpy.shutdown(context=context)

    latency = [(listener.arrivals[s] - s) / 1e6 for s in listener.arrivals]
    done_latency = [(t - s) / 1e6 for s, _, t, _ in done]
    network = [timings.get('network', np.nan) for *_, timings in done]
    mtres = [geometry.mtre(pose, truths[s], patient.targets)
             for s, pose in listener.poses.items() if s in truths]
    results = {
        'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()},
        'intensity_refine': args.refine,
        'input': {'size': args.size, 'encoding': 'mono16', 'rate_hz': args.rate,
                  'seconds': args.seconds, 'sent': sent},
        'model': str(model),
        'node': stats,
        'throughput_hz': len(done) / args.seconds,
        'stamp_to_tf_ms': geometry.summarize(latency),
        'stamp_to_verdict_ms': geometry.summarize(done_latency),
        'network_ms': geometry.summarize([v for v in network if np.isfinite(v)]),
        'accepted_mtre_mm': geometry.summarize_mtre(mtres),
    }
    print(f"{'metric':<34}{'p50':>10}{'p95':>10}")
    for key in ('stamp_to_tf_ms', 'stamp_to_verdict_ms', 'network_ms'):
        print(f"{key:<34}{results[key]['p50']:>10.1f}{results[key]['p95']:>10.1f}")
    print(f"{'arrival->verdict ms':<34}{stats['arrival_to_verdict_p50_ms']:>10}"
          f"{stats['arrival_to_verdict_p95_ms']:>10}")
    print(f"throughput {results['throughput_hz']:.2f} frames/s; received "
          f"{stats['frames_received']}/{sent}, dropped {stats['frames_dropped']}, "
          f"accepted {stats['accepted']}, rejected {stats['rejected']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_jsonable(results), indent=1, default=str))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
