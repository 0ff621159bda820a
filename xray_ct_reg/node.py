"""The lifecycle ROS 2 node: X-ray Image + CameraInfo in; TF, pose, overlay, diagnostics out.

``xray_ct_reg_node`` is a thin adapter over :class:`xray_ct_reg.register.Registrar`:

* configure: load and check the model (and the CT when ``ct_path`` is set; a checkpoint trained
  for another CT fails the transition with a clear log line);
* activate: subscribe to the image and CameraInfo topics, create the output publishers and start
  the worker thread; deactivate / cleanup release them again;
* ``autostart`` (default true) configures and activates the node at start.

Frames are paired with CameraInfo by exact stamp (a small cache of recent CameraInfo), or get
the fallback geometry (``use_camera_info: false``). Registration runs in a worker thread on the
latest frame only: a one-slot mailbox where a new frame replaces the pending one (counted as
dropped). Accepted frames are published stamped with the image stamp: TF (image frame -> CT
frame, or the inverse), ``~/pose`` (PoseWithCovarianceStamped, metres) and ``~/overlay`` (when
someone listens). Rejected frames and bad input publish no pose and no TF; the reason goes to
the log (throttled) and to ``/diagnostics`` (1 Hz), and the node goes on with the next frame.
"""
import collections
from pathlib import Path
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

from xray_ct_reg import geometry, ros_io

NODE_NAME = 'xray_ct_reg_node'
PACKAGE = 'xray_ct_reg'
DEFAULT_MODEL = 'chest_example.pt'
CAMERA_INFO_CACHE = 32          # CameraInfo messages kept for pairing by stamp
STATS_WINDOW = 200              # frames kept for latency percentiles
RATE_WINDOW_S = 10.0            # seconds over which rates are computed
LOG_THROTTLE_S = 2.0
QOS_PROFILES = ('sensor_data', 'reliable')
POLARITIES = ('auto', 'bright_bone', 'dark_bone')
# RegistrationConfig fields exposed as parameters: name -> (description, (min, max))
GATE_PARAMETERS = {
    'max_sigma_mm': ("use a pixel when its predicted sigma (mm) is below this; 0: the "
                     "checkpoint's value", (0.0, 1000.0)),
    'max_correspondences': ('correspondences handed to RANSAC (random subsample)', (12, 1000000)),
    'min_correspondences': ('reject without PnP below this many correspondences', (6, 100000)),
    'min_points': ('when fewer pixels are confident, take this many least uncertain points',
                   (0, 1000000)),
    'ransac_threshold_px': ('RANSAC inlier threshold, px at the 1536^2 reference detector',
                            (0.1, 500.0)),
    'ransac_iterations': ('maximum RANSAC iterations', (1, 1000000)),
    'min_inliers': ('gate: minimum RANSAC inliers', (6, 1000000)),
    'min_inlier_ratio': ('gate: minimum inlier fraction', (0.0, 1.0)),
    'min_inlier_spread': ('gate: minimum std of inlier pixels along u and v, as a fraction of '
                          'the image size', (0.0, 1.0)),
    'max_reprojection_error_px': ('gate: maximum median reprojection error, px at the reference '
                                  'detector', (0.01, 500.0)),
    'min_source_distance_mm': ('gate: minimum source-to-bone-centroid distance (mm)',
                               (0.0, 5000.0)),
    'max_source_distance_mm': ('gate: maximum source-to-bone-centroid distance (mm)',
                               (0.0, 5000.0)),
    'image_margin': ('gate: bone centroid must project inside the image grown by this fraction',
                     (0.0, 10.0)),
    'max_angle_from_ap_deg': ('gate: maximum view angle away from AP (deg)', (0.0, 180.0)),
    'min_ncc': ('gate with intensity_refine: minimum NCC of X-ray and DRR at the refined pose',
                (-1.0, 1.0)),
    'min_exposed_fraction': ('gate with intensity_refine: minimum fraction of the image that is '
                             'not collimated or saturated', (0.0, 1.0)),
}


def default_model_path():
    """The committed example model: installed share dir first, then the source tree ('' if none)."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(PACKAGE)) / 'models' / DEFAULT_MODEL)
    except (ImportError, LookupError, OSError, ValueError):  # no ament index here
        pass
    candidates.append(Path(__file__).resolve().parent.parent / 'models' / DEFAULT_MODEL)
    return next((str(path) for path in candidates if path.is_file()), '')


def _descriptor(description, value):
    """ParameterDescriptor with a description, and a range for numeric (value, lo, hi) tuples."""
    descriptor = ParameterDescriptor(description=description)
    if isinstance(value, tuple):
        _, low, high = value
        if isinstance(low, float):
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high)]
        else:
            descriptor.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
    return descriptor


class InputError(ValueError):
    """A frame that cannot be registered because the input is wrong (not a verdict)."""


class _Frame:
    """An image message waiting in the mailbox, with its arrival time."""

    __slots__ = ('msg', 'received')

    def __init__(self, msg, received):
        self.msg = msg
        self.received = received


class RegistrationNode(LifecycleNode):
    """Lifecycle node registering each X-ray frame to the CT and publishing the pose."""

    def __init__(self, **kwargs):
        """Declare the parameters and the always-on diagnostics; nothing else until configure."""
        super().__init__(NODE_NAME, **kwargs)
        self._declare_parameters()
        self._cond = threading.Condition()
        self._registrar = None
        self._patient = None
        self._state = 'unconfigured'
        self._subscriptions_list = []
        self._pose_pub = self._overlay_pub = self._tf = None
        self._worker = None
        self._stop = False
        self.result_callback = None
        """In-process hook: called as f(stamp_ns, verdict, reason, result or None) per frame."""
        self._reset_stream_state()
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)

    # ------------------------------------------------------------------------- parameters
    def _declare_parameters(self):
        """Declare every parameter with a description (and a range where numeric)."""
        from xray_ct_reg.register import RegistrationConfig
        gates = RegistrationConfig()
        specs = [
            ('autostart', True, 'configure and activate the node at start'),
            ('model_path', default_model_path(),
             'trained scene coordinate regression checkpoint (.pt); default: committed example'),
            ('ct_path', '', 'CT the model was trained for (checked against the checkpoint; '
                            "'' = trust the checkpoint, 'example' = embedded chest CT)"),
            ('ct_frame', 'ct', 'TF frame id of the CT'),
            ('image_topic', '/carm/image_raw', 'X-ray image topic (sensor_msgs/Image)'),
            ('camera_info_topic', '/carm/camera_info', 'CameraInfo topic paired by stamp'),
            ('use_camera_info', True, 'take K from CameraInfo (false: fallback geometry)'),
            ('camera_info_timeout_s', (0.5, 0.01, 10.0),
             'how long a frame waits for its CameraInfo (same stamp)'),
            ('sdd_mm', (geometry.CIOS_FUSION_SDD_MM, 100.0, 3000.0),
             'source-to-detector distance (mm); turns K into detector mm'),
            ('pixel_spacing_mm', (geometry.CIOS_FUSION_PIXEL_SPACING_MM, 0.001, 10.0),
             'fallback geometry: pixel spacing of the incoming image (mm/px)'),
            ('polarity', 'auto', f'image polarity, one of {", ".join(POLARITIES)}: dark_bone '
                                 'images are inverted first; auto/bright_bone pass unchanged '
                                 '(the network was trained on both)'),
            ('intensity_refine', False,
             'refine the PnP pose against a DRR and gate it by NCC (needs ct_path)'),
            ('refine_time_budget_s', (gates.refine_time_budget_s, 0.0, 120.0),
             'time budget of the intensity refinement (s)'),
            ('publish_overlay', True, 'publish ~/overlay when it has subscribers'),
            ('publish_inverse', False,
             'publish CT -> image frame on TF instead (when the CT frame has a parent)'),
            ('image_qos', 'sensor_data', f'QoS of the image subscription: {QOS_PROFILES}'),
            ('no_frame_warning_s', (3.0, 0.5, 60.0),
             'warn when the image topic has publishers but no frame came for this long'),
            ('inference_threads', (1, 1, 64),
             'torch threads of the registration worker; keep a core free for receiving frames'),
        ]
        for name, (description, (low, high)) in GATE_PARAMETERS.items():
            value = getattr(gates, name)
            kind = int if isinstance(value, int) else float
            value = 0.0 if value is None else value  # None ("from the checkpoint") -> 0
            specs.append((name, (kind(value), kind(low), kind(high)), description))
        for name, value, description in specs:
            default = value[0] if isinstance(value, tuple) else value
            self.declare_parameter(name, default, _descriptor(description, value))

    def _param(self, name):
        """Current value of a parameter."""
        return self.get_parameter(name).value

    # ------------------------------------------------------------------------- lifecycle
    def on_configure(self, state):
        """Load and check the model (and CT); fail the transition with a clear log otherwise."""
        try:
            self._check_parameters()
            self._registrar, self._patient = self._load_registrar()
        except Exception as error:  # noqa: BLE001 - any failure must fail the transition
            self._registrar = self._patient = None
            self._last_verdict, self._last_reason = 'error', f'configure failed: {error}'
            self.get_logger().error(f'configure failed: {error}')
            return TransitionCallbackReturn.FAILURE
        self._state = 'inactive'
        self.get_logger().info(f"configured: model {self._param('model_path')}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        """Create subscriptions, publishers and the worker thread."""
        try:
            self._create_interfaces()
        except Exception as error:  # noqa: BLE001
            self.get_logger().error(f'activate failed: {error}')
            self._release_interfaces()
            return TransitionCallbackReturn.FAILURE
        self._state = 'active'
        self.get_logger().info(f"active: listening on {self._param('image_topic')}")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        """Stop the worker and release subscriptions and publishers."""
        self._release_interfaces()
        self._state = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        """Release everything, model included."""
        self._release_interfaces()
        self._registrar = self._patient = None
        self._state = 'unconfigured'
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        """Release everything on shutdown."""
        return self.on_cleanup(state)

    def on_error(self, state):
        """Release everything after an error; go back to unconfigured."""
        return self.on_cleanup(state)

    def start(self):
        """Configure and activate when ``autostart`` is true; return True when active."""
        if not self._param('autostart'):
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop(self):
        """Stop the worker thread and release the interfaces (before destroy_node)."""
        self._release_interfaces()

    # ------------------------------------------------------------------------- setup
    def _check_parameters(self):
        """Reject parameter values that have no meaning (ranges are enforced by rclpy)."""
        if self._param('image_qos') not in QOS_PROFILES:
            raise ValueError(f"image_qos must be one of {QOS_PROFILES}, "
                             f"got {self._param('image_qos')!r}")
        if self._param('polarity') not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, "
                             f"got {self._param('polarity')!r}")
        if not self._param('model_path'):
            raise ValueError('model_path is empty and no committed example model was found')

    def _load_registrar(self):
        """Build the Registrar from the parameters; return (registrar, patient or None)."""
        import torch

        from xray_ct_reg.register import Registrar, RegistrationConfig
        torch.set_num_threads(self._param('inference_threads'))
        patient = None
        if self._param('ct_path'):
            from xray_ct_reg import ct
            patient = ct.load_patient(self._param('ct_path'))
        gates = {name: self._param(name) for name in GATE_PARAMETERS}
        gates['max_sigma_mm'] = gates['max_sigma_mm'] or None  # 0: the checkpoint's value
        config = RegistrationConfig(intensity_refine=self._param('intensity_refine'),
                                    refine_time_budget_s=self._param('refine_time_budget_s'),
                                    **gates)
        registrar = Registrar.from_checkpoint(self._param('model_path'), patient=patient,
                                              config=config)
        return registrar, patient

    def _image_qos(self):
        """QoS profile of the image and CameraInfo subscriptions."""
        if self._param('image_qos') == 'sensor_data':
            return qos_profile_sensor_data
        return QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)

    def _create_interfaces(self):
        """Subscriptions, publishers, worker thread (on activate)."""
        self._reset_stream_state()
        qos = self._image_qos()
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, '~/pose', 10)
        self._overlay_pub = self.create_publisher(Image, '~/overlay', 2)
        self._tf = ros_io.make_tf_publisher(self)
        self._subscriptions_list = [
            self.create_subscription(Image, self._param('image_topic'), self._on_image, qos)]
        if self._param('use_camera_info'):
            self._subscriptions_list.append(self.create_subscription(
                CameraInfo, self._param('camera_info_topic'), self._on_camera_info, qos))
        self._stop = False
        self._worker = threading.Thread(target=self._worker_loop, name='registration',
                                        daemon=True)
        self._worker.start()

    def _release_interfaces(self):
        """Stop the worker, then destroy subscriptions and publishers (idempotent)."""
        with self._cond:
            self._stop = True
            self._pending = None
            self._cond.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()
        self._worker = None
        for subscription in self._subscriptions_list:
            self.destroy_subscription(subscription)
        self._subscriptions_list = []
        if self._tf is not None:
            ros_io.destroy_tf_publisher(self, self._tf)
        for publisher in (self._pose_pub, self._overlay_pub):
            if publisher is not None:
                self.destroy_publisher(publisher)
        self._pose_pub = self._overlay_pub = self._tf = None

    def _reset_stream_state(self):
        """Counters, mailbox and caches of one activation."""
        with self._cond:
            self._pending = None
            self._camera_infos = collections.OrderedDict()
            self._received = self._dropped = self._accepted = self._rejected = 0
            self._errors = 0
            self._latencies_ms = collections.deque(maxlen=STATS_WINDOW)
            self._done_times = collections.deque(maxlen=STATS_WINDOW)
            self._arrival_times = collections.deque(maxlen=STATS_WINDOW)
            self._last_verdict, self._last_reason = getattr(self, '_last_verdict', 'none'), \
                getattr(self, '_last_reason', '')
            self._last_frame_time = None
            self._activated_at = time.monotonic()
            self._last_tf_stamp = None

    # ------------------------------------------------------------------------- input
    def _on_image(self, msg):
        """Put the frame in the one-slot mailbox (replacing, and counting, a pending one)."""
        now = time.monotonic()
        with self._cond:
            if self._pending is not None:
                self._dropped += 1
            self._pending = _Frame(msg, now)
            self._received += 1
            self._last_frame_time = now
            self._arrival_times.append(now)
            self._cond.notify_all()

    def _on_camera_info(self, msg):
        """Cache CameraInfo by stamp (bounded) for pairing with images."""
        with self._cond:
            self._camera_infos[ros_io.stamp_to_ns(msg.header.stamp)] = msg
            while len(self._camera_infos) > CAMERA_INFO_CACHE:
                self._camera_infos.popitem(last=False)
            self._cond.notify_all()

    def _wait_camera_info(self, frame):
        """CameraInfo with the frame's stamp; None when a newer frame supersedes this one."""
        stamp = ros_io.stamp_to_ns(frame.msg.header.stamp)
        deadline = frame.received + self._param('camera_info_timeout_s')
        with self._cond:
            while True:
                info = self._camera_infos.get(stamp)
                if info is not None:
                    return info
                if self._stop:
                    return None
                if self._pending is not None:
                    self._dropped += 1
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InputError(
                        f"no CameraInfo with the image stamp on {self._param('camera_info_topic')}"
                        f" within {self._param('camera_info_timeout_s')} s")
                self._cond.wait(remaining)

    def _intrinsics(self, frame, width, height):
        """Intrinsics for a frame: from its CameraInfo, or the fallback geometry."""
        sdd_mm = self._param('sdd_mm')
        if not self._param('use_camera_info'):
            return geometry.Intrinsics.from_carm(sdd_mm, self._param('pixel_spacing_mm'),
                                                 width, height)
        info = self._wait_camera_info(frame)
        if info is None:
            return None
        try:
            intrinsics = ros_io.camera_info_to_intrinsics(info, sdd_mm)
        except ValueError as error:
            raise InputError(str(error)) from error
        if (intrinsics.width, intrinsics.height) != (width, height):
            raise InputError(f'image size {width}x{height} does not match CameraInfo '
                             f'{intrinsics.width}x{intrinsics.height}')
        return intrinsics

    # ------------------------------------------------------------------------- worker
    def _worker_loop(self):
        """Register the latest frame, one at a time, until stopped; never raise."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stop)
                if self._stop:
                    return
                frame, self._pending = self._pending, None
            try:
                self._process(frame)
            except InputError as error:
                self._finish(frame, 'error', f'bad input: {error}')
            except Exception as error:  # noqa: BLE001 - one bad frame must not stop the node
                self._finish(frame, 'error', f'internal error: {type(error).__name__}: {error}')

    def _process(self, frame):
        """Register one frame and publish the outputs when the result is accepted."""
        msg = frame.msg
        try:
            image = ros_io.image_to_array(msg)
        except ValueError as error:
            raise InputError(str(error)) from error
        if not np.all(np.isfinite(image)):
            raise InputError('image contains NaN or infinite values')
        if image.min() == image.max():
            raise InputError('image is blank (constant)')
        if not msg.header.frame_id:
            raise InputError('image header has no frame_id (needed as the TF parent)')
        intrinsics = self._intrinsics(frame, image.shape[1], image.shape[0])
        if intrinsics is None:
            return
        if self._param('polarity') == 'dark_bone':  # the network's reference is bright bone
            image = image.max() - image
        try:
            result = self._registrar.register(image, intrinsics)
        except ValueError as error:  # the Registrar's input validation
            raise InputError(str(error)) from error
        if not result.accepted:
            self._finish(frame, 'rejected', result.reason or 'rejected by the quality gates',
                         result)
            return
        stamp = ros_io.stamp_to_ns(msg.header.stamp)
        if stamp == self._last_tf_stamp:
            self._finish(frame, 'rejected', 'a pose with this stamp was already published',
                         result)
            return
        self._publish(msg, image, intrinsics, result)
        self._last_tf_stamp = stamp
        self._finish(frame, 'accepted', '', result)

    def _publish(self, msg, image, intrinsics, result):
        """TF, pose with covariance and (when listened to) the overlay, with the image stamp."""
        header = msg.header
        ct_frame = self._param('ct_frame')
        if self._param('publish_inverse'):
            inverse_header = type(header)(stamp=header.stamp, frame_id=ct_frame)
            transform = ros_io.pose_to_transform_stamped(
                geometry.invert_pose(result.pose), inverse_header, header.frame_id)
        else:
            transform = ros_io.pose_to_transform_stamped(result.pose, header, ct_frame)
        self._tf.sendTransform(transform)
        self._pose_pub.publish(ros_io.pose_to_pose_with_covariance(
            result.pose, result.covariance, header))
        if (self._param('publish_overlay') and self._patient is not None
                and self._overlay_pub.get_subscription_count() > 0):
            from xray_ct_reg.overlay import draw_overlay
            overlay = draw_overlay(image, result.pose, intrinsics, self._patient)
            self._overlay_pub.publish(ros_io.array_to_image_msg(overlay, 'bgr8', header))

    def _finish(self, frame, verdict, reason, result=None):
        """Record a frame's verdict and latency; log rejections and errors (throttled)."""
        now = time.monotonic()
        with self._cond:
            self._latencies_ms.append((now - frame.received) * 1e3)
            self._done_times.append(now)
            self._last_verdict, self._last_reason = verdict, reason
            if verdict == 'accepted':
                self._accepted += 1
            elif verdict == 'rejected':
                self._rejected += 1
            else:
                self._errors += 1
        if verdict == 'rejected':
            self.get_logger().warning(f'frame rejected, no pose published: {reason}',
                                      throttle_duration_sec=LOG_THROTTLE_S)
        elif verdict == 'error':
            self.get_logger().error(f'frame skipped: {reason}',
                                    throttle_duration_sec=LOG_THROTTLE_S)
        if self.result_callback is not None:
            self.result_callback(ros_io.stamp_to_ns(frame.msg.header.stamp), verdict, reason,
                                 result)

    # ------------------------------------------------------------------------- diagnostics
    @staticmethod
    def _rate(times, now):
        """Events per second over the last RATE_WINDOW_S seconds."""
        recent = [t for t in times if now - t <= RATE_WINDOW_S]
        return len(recent) / RATE_WINDOW_S if recent else 0.0

    def stats(self):
        """Counters and latency percentiles of the current activation (as on /diagnostics)."""
        now = time.monotonic()
        with self._cond:
            latencies = np.array(self._latencies_ms, dtype=float)
            percentiles = (np.percentile(latencies, [50, 95]) if latencies.size
                           else [float('nan')] * 2)
            return {
                'state': self._state,
                'frames_received': self._received,
                'frames_dropped': self._dropped,
                'accepted': self._accepted,
                'rejected': self._rejected,
                'errors': self._errors,
                'input_rate_hz': round(self._rate(self._arrival_times, now), 2),
                'processed_rate_hz': round(self._rate(self._done_times, now), 2),
                'latency_p50_ms': round(float(percentiles[0]), 1),
                'latency_p95_ms': round(float(percentiles[1]), 1),
                'last_verdict': self._last_verdict,
                'last_reason': self._last_reason,
            }

    def _publish_diagnostics(self):
        """Publish one DiagnosticStatus on /diagnostics (state, rates, latency, verdicts)."""
        now = time.monotonic()
        values = self.stats()
        last_frame = self._last_frame_time
        level, message = DiagnosticStatus.OK, f"{self._state}: last frame {values['last_verdict']}"
        if values['last_verdict'] in ('rejected', 'error'):
            level = DiagnosticStatus.WARN if values['last_verdict'] == 'rejected' else \
                DiagnosticStatus.ERROR
            message += f": {values['last_reason']}"
        if self._state == 'active':
            silence = now - (last_frame if last_frame is not None else self._activated_at)
            publishers = self.count_publishers(self._param('image_topic'))
            if publishers > 0 and silence > self._param('no_frame_warning_s'):
                level = max(level, DiagnosticStatus.WARN)
                message = (f"{self._param('image_topic')} has {publishers} publisher(s) but no "
                           f'frame arrived for {silence:.0f} s: QoS mismatch? (image_qos='
                           f"{self._param('image_qos')})")
                self.get_logger().warning(message, throttle_duration_sec=10.0)
        elif self._state == 'unconfigured' and values['last_verdict'] == 'error':
            level = DiagnosticStatus.ERROR
        status = DiagnosticStatus(level=level, name=f'{self.get_fully_qualified_name()}: '
                                  'registration', message=message, hardware_id='carm')
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def main(args=None) -> int:
    """Run the node until SIGINT/SIGTERM; return the process exit status (0 on a clean stop)."""
    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = RegistrationNode()
        executor.add_node(node)
        node.start()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        executor.shutdown()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
