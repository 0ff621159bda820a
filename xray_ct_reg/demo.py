"""End-to-end demo: simulated C-arm -> registration node -> TF, over real rclpy in one process.

``xray-ct-reg demo`` renders ``--frames`` views of the example chest CT, publishes them with the
``simulated_carm`` node, registers them with ``xray_ct_reg_node`` (both nodes in this process,
talking over DDS; intensity refinement on, as in config/registration.yaml), listens on ``/tf``
like any other ROS node, and prints per frame the mTRE against the true pose and the latency
from the image stamp to the TF's arrival. It ends with a
summary table and writes overlay PNGs (estimated bone outline on the X-ray) to ``--out``.
Run it in the loopback-only sandbox (``make demo``).
"""
import json
import math
from pathlib import Path
import threading
import time

import numpy as np

from xray_ct_reg import geometry, image_io, ros_io, settings
from xray_ct_reg.stream import IMAGE_TRANSPORTS

TIMEOUT_S = 60.0


class _Listener:
    """A plain rclpy node recording /tf arrivals (pose in mm and wall-clock arrival time)."""

    def __init__(self, context, ct_frame='ct'):
        """Subscribe to /tf with tf2_ros's QoS."""
        from rclpy.node import Node
        from tf2_msgs.msg import TFMessage
        self.node = Node('xray_ct_reg_demo_listener', context=context)
        self.ct_frame = ct_frame
        self.poses = {}
        self.arrivals = {}
        self.lock = threading.Lock()
        self.node.create_subscription(TFMessage, '/tf', self._on_tf, ros_io.TF_QOS)

    def _on_tf(self, msg):
        """Keep transforms to the CT frame by stamp."""
        now = time.time_ns()
        with self.lock:
            for transform in msg.transforms:
                if transform.child_frame_id == self.ct_frame:
                    stamp = ros_io.stamp_to_ns(transform.header.stamp)
                    self.poses[stamp] = ros_io.transform_msg_to_pose(transform)
                    self.arrivals[stamp] = now


def _spin_in_background(executor):
    """Spin ``executor`` in a daemon thread; return the thread."""
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return thread


def register_through_node(frames, model_path, ct_path='', sdd_mm=geometry.CIOS_FUSION_SDD_MM,
                          config=None, tracking=None):
    """Feed bag frames (``bag.read_frames``) one by one through the node, in this process.

    Each frame waits for the node's verdict before the next is sent, so none is dropped.
    ``config`` (a ``RegistrationConfig``) sets the node's registration parameters, ``tracking``
    (a ``stream.NodeConfig``) its tracking ones (None: the node's defaults).
    Returns per frame (result dict with accepted, reason, pose (from /tf, mm), covariance; or
    None) and an error string, like ``bag.register_offline``.
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    from xray_ct_reg.node import RegistrationNode
    from xray_ct_reg.register import RegistrationConfig

    ros_io.select_transport_profile()
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    verdicts, done = {}, threading.Condition()

    def on_result(stamp, verdict, reason, result):
        with done:
            verdicts[stamp] = (verdict, reason, result)
            done.notify_all()

    config = config or RegistrationConfig()
    overrides = [Parameter('model_path', value=str(model_path)),
                 Parameter('ct_path', value=str(ct_path)), Parameter('sdd_mm', value=sdd_mm),
                 Parameter('image_qos', value='reliable'),
                 Parameter('publish_overlay', value=False)]
    overrides += [Parameter(spec.name, value=getattr(config, spec.name))
                  for spec in settings.specs(RegistrationConfig)]
    if tracking is not None:
        overrides += [Parameter(name, value=getattr(tracking, name))
                      for name in ('tracking', 'tracking_max_age_s')]
    node = RegistrationNode(context=context, parameter_overrides=overrides)
    node.result_callback = on_result
    feeder = Node('xray_ct_reg_replay_feeder', context=context)
    listener = _Listener(context)
    image_pub = feeder.create_publisher(Image, '/carm/image_raw', 10)
    info_pub = feeder.create_publisher(CameraInfo, '/carm/camera_info', 10)
    for each in (node, feeder, listener.node):
        executor.add_node(each)
    outcomes, spinner = [], None
    try:
        if not node.start():
            raise RuntimeError(f'the node did not start: {node.stats()["last_reason"]}')
        spinner = _spin_in_background(executor)
        deadline = time.monotonic() + 10.0
        while (image_pub.get_subscription_count() == 0 or info_pub.get_subscription_count() == 0
               ) and time.monotonic() < deadline:  # a CameraInfo sent before matching is lost
            time.sleep(0.05)
        for frame in frames:
            if frame['error'] or frame['image'] is None:
                outcomes.append((None, frame['error'] or 'no image'))
                continue
            outcomes.append(_feed_one(frame, image_pub, info_pub, listener, verdicts, done,
                                      Header))
    finally:
        executor.shutdown()
        if spinner is not None:  # its last callback done before the nodes go
            spinner.join()
        node.stop()
        for each in (node, feeder, listener.node):
            each.destroy_node()
        rclpy.shutdown(context=context)
    return outcomes


def _feed_one(frame, image_pub, info_pub, listener, verdicts, done, header_type):
    """Publish one frame and wait for the node's verdict (and its TF when accepted)."""
    stamp = frame['stamp_ns']
    header = header_type(frame_id=frame['frame_id'] or 'carm')
    header.stamp.sec, header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    if frame['camera_info'] is not None:
        info = frame['camera_info']
        intrinsics = geometry.Intrinsics.from_camera_info(info.k, info.width, info.height)
        info_pub.publish(ros_io.intrinsics_to_camera_info(intrinsics, header))
    image_pub.publish(ros_io.array_to_image_msg(frame['image'],
                                                image_io.encoding_for(frame['image']), header))
    deadline = time.monotonic() + TIMEOUT_S
    with done:
        done.wait_for(lambda: stamp in verdicts, timeout=TIMEOUT_S)
    if stamp not in verdicts:
        return None, 'no verdict from the node within the timeout'
    verdict, reason, result = verdicts[stamp]
    if verdict == 'error':
        return None, reason
    record = {'accepted': verdict == 'accepted', 'reason': reason, 'pose': None,
              'covariance': None}
    if result is not None:
        record['covariance'] = (None if result.covariance is None
                                else np.asarray(result.covariance).tolist())
    if record['accepted']:
        while stamp not in listener.poses and time.monotonic() < deadline:
            time.sleep(0.01)
        pose = listener.poses.get(stamp)
        record['pose'] = None if pose is None else pose.tolist()
    elif result is not None and result.pose is not None:
        record['pose'] = np.asarray(result.pose).tolist()
    return record, ''


# ----------------------------------------------------------------------------- CLI
def add_demo_arguments(parser):
    """Arguments of ``xray-ct-reg demo``."""
    from xray_ct_reg.sim_carm import MOTIONS
    parser.add_argument('--frames', type=int, default=6, help='number of simulated frames')
    parser.add_argument('--out', default='runs/demo', help='folder for overlays and summary')
    parser.add_argument('--size', type=int, default=256, help='image size (px)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='C-arm frame rate (Hz); a refined registration takes 0.3-0.6 s '
                             'here, a tracked one 0.07-0.15 s (frames arriving meanwhile are '
                             'dropped: latest frame only)')
    parser.add_argument('--motion', default='none', choices=MOTIONS,
                        help='none: single shots of random views; rotation or table_shift: a '
                             'fluoroscopy sequence the node tracks (e.g. --frames 30 --rate 5)')
    parser.add_argument('--no-refine', action='store_true',
                        help='SCR only (no intensity refinement against the CT)')
    parser.add_argument('--seed', type=int, default=1, help='pose sampler seed')
    parser.add_argument('--image-transport', default='raw', choices=IMAGE_TRANSPORTS,
                        help='how the simulated C-arm sends its images to the node: raw '
                             'sensor_msgs/Image, or compressed (PNG) on <topic>/compressed')
    parser.add_argument('--model', default=None,
                        help='checkpoint (default: the committed models/chest_example.pt)')


def run_demo(args):
    """Run the simulated C-arm and the registration node together; print and save results."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from xray_ct_reg import ct
    from xray_ct_reg.node import RegistrationNode, default_model_path
    from xray_ct_reg.overlay import draw_overlay
    from xray_ct_reg.sim_carm import SimulatedCarm

    model = args.model or default_model_path()
    if not model:
        print('no model: pass --model or commit models/chest_example.pt')
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f'loading the example CT and rendering {args.frames} frames ...', flush=True)
    patient = ct.load_patient('example')
    ros_io.select_transport_profile()
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    sim = node = listener = None
    try:
        sim = SimulatedCarm(patient=patient, context=context, parameter_overrides=[
            Parameter('size', value=args.size), Parameter('rate_hz', value=args.rate),
            Parameter('pool_size', value=args.frames), Parameter('max_frames', value=args.frames),
            Parameter('seed', value=args.seed), Parameter('motion', value=args.motion),
            Parameter('image_transport', value=args.image_transport)])
        node = RegistrationNode(context=context, parameter_overrides=[
            Parameter('model_path', value=str(model)), Parameter('publish_overlay', value=False),
            Parameter('ct_path', value='example'),
            Parameter('image_transport', value=args.image_transport),
            Parameter('intensity_refine', value=not args.no_refine)])
        verdicts, verdicts_lock = {}, threading.Lock()  # written by the node's worker thread

        def record(stamp, verdict, reason, result):
            with verdicts_lock:
                verdicts[stamp] = (verdict, reason, bool(result is not None and result.tracked))
        node.result_callback = record
        listener = _Listener(context)
        if not node.start():
            print(f'registration node did not start: {node.stats()["last_reason"]}')
            return 1
        for each in (sim, node, listener.node):
            executor.add_node(each)
        deadline = time.monotonic() + args.frames / args.rate + TIMEOUT_S

        def finished():
            """Every frame published and settled, and every accepted one's TF received."""
            with verdicts_lock:
                judged_now = dict(verdicts)
            published = set(sim.published_stamps)
            accepted = {stamp for stamp, (verdict, _, _) in judged_now.items()
                        if verdict == 'accepted'}
            return (sim.published >= args.frames
                    and published <= settled_stamps(published, set(judged_now) | set(
                        listener.poses))
                    and accepted <= set(listener.poses))
        while time.monotonic() < deadline and not finished():
            executor.spin_once(timeout_sec=0.1)
        timed_out = not finished()
        stats = node.stats()
    finally:
        executor.shutdown()
        for each in (node, sim, listener.node if listener else None):
            if each is not None:
                if each is node:
                    node.stop()
                each.destroy_node()
        rclpy.shutdown(context=context)
    return _report(sim, listener, verdicts, stats, patient, out, draw_overlay, timed_out)


def settled_stamps(published, judged):
    """The ``published`` stamps that will get no further verdict: ``judged``, or dropped.

    The node registers only the latest frame, and the simulated C-arm stamps its frames in
    order: a frame published before one the node judged was judged too or dropped unseen.
    """
    newest = max(judged, default=None)
    return {stamp for stamp in published
            if stamp in judged or (newest is not None and stamp < newest)}


def message_rate_hz(arrivals_ns):
    """Messages per second from the first to the last of ``arrivals_ns`` (NaN: fewer than 2)."""
    arrivals = sorted(arrivals_ns)
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return float('nan')
    return (len(arrivals) - 1) * 1e9 / (arrivals[-1] - arrivals[0])


def _hz(rate):
    """A rate for the summary: '4.2 Hz', or '-' when there is none (fewer than 2 messages)."""
    return '-' if math.isnan(rate) else f'{rate:.1f} Hz'


def _report(sim, listener, verdicts, stats, patient, out, draw_overlay, timed_out):
    """Print the per-frame table and summary; write overlays and summary.json.

    ``timed_out``: the demo stopped waiting before every frame was settled.
    """
    import cv2

    from xray_ct_reg.register import to_jsonable
    rows = []
    print(f"{'frame':>5} {'verdict':>9} {'tracked':>7} {'mTRE mm':>8} {'latency ms':>10}  reason")
    for number, (stamp, index) in enumerate(sorted(sim.published_stamps.items())):
        frame = sim.frames[index]
        pose = listener.poses.get(stamp)
        verdict, reason, tracked = verdicts.get(
            stamp, ('dropped' if pose is None else 'accepted', '', False))
        row = {'frame': number, 'stamp_ns': stamp, 'verdict': verdict, 'reason': reason,
               'tracked': tracked}
        if pose is not None:
            row['mtre_mm'] = geometry.mtre(pose, frame.pose, patient.targets)
            row['latency_ms'] = (listener.arrivals[stamp] - stamp) / 1e6
        rows.append(row)
        picture = draw_overlay(frame.image, pose, frame.intrinsics, patient,
                               text=f"frame {number}: {verdict}" + (
                                   f" mTRE {row['mtre_mm']:.1f} mm" if pose is not None else ''))
        cv2.imwrite(str(out / f'overlay_{number:03d}.png'), picture)
        print(f"{number:5d} {verdict:>9} {'yes' if tracked else '':>7} "
              f"{row.get('mtre_mm', float('nan')):8.2f} "
              f"{row.get('latency_ms', float('nan')):10.0f}  {reason}")
    mtres = [r['mtre_mm'] for r in rows if 'mtre_mm' in r]
    latencies = [r['latency_ms'] for r in rows if 'latency_ms' in r]
    tf_rate = message_rate_hz(listener.arrivals.values())
    tracking_rate = message_rate_hz(listener.arrivals[row['stamp_ns']] for row in rows
                                    if row['tracked'] and row['stamp_ns'] in listener.arrivals)
    summary = {'frames': len(rows), 'accepted': len(mtres),
               'mtre_mm': geometry.summarize_mtre(mtres),
               'latency_ms': geometry.summarize(latencies), 'tf_rate_hz': tf_rate,
               'tracking_tf_rate_hz': tracking_rate,
               'tracked': int(stats.get('tracked', 0)), 'timed_out': timed_out, 'node': stats}
    print('\nsummary')
    print(f"  accepted            {summary['accepted']}/{summary['frames']}")
    print(f"  mTRE p25/p50/p95    {summary['mtre_mm']['p25']:.2f} / "
          f"{summary['mtre_mm']['p50']:.2f} / {summary['mtre_mm']['p95']:.2f} mm "
          f"(gross failures {summary['mtre_mm']['gross_failure_rate']:.0%})")
    print(f"  latency p50/p95     {summary['latency_ms']['p50']:.0f} / "
          f"{summary['latency_ms']['p95']:.0f} ms (image stamp -> TF received)")
    print(f"  TF rate             {_hz(tf_rate)} (first to last TF received), "
          f"{summary['tracked']} frames tracked from the previous pose")
    print(f"  TF rate tracking    {_hz(tracking_rate)} (first to last TF of a tracked frame, "
          f"any fallback between them included)")
    print(f'  overlays            {out}/overlay_*.png')
    if timed_out:
        print(f'  timed out           stopped waiting {TIMEOUT_S:.0f} s after the last frame was '
              'due: some frames have no verdict or their TF never arrived')
    with open(out / 'summary.json', 'w') as handle:
        # NaN (no rate, no accepted frame) becomes null: strict JSON readers refuse NaN
        json.dump(to_jsonable({'rows': rows, 'summary': summary}), handle, indent=1,
                  default=str)
    return 0 if rows else 1
