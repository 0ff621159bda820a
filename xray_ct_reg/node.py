"""The lifecycle ROS 2 node: X-ray Image + CameraInfo in; TF, pose, overlay, diagnostics out.

``xray_ct_reg_node`` is a thin adapter. The work lives elsewhere:

* ``stream.StreamCore`` (no ROS): the latest-frame mailbox, CameraInfo pairing by stamp, the
  stamp rules that keep tf2 from dropping a transform, and the statistics;
* ``register.Registrar``: input checks, the registration and its quality gates;
* ``ros_io``: message conversions (metres at this boundary only) and the transport profile.

Parameters are declared from the settings dataclasses (``stream.NodeConfig``,
``register.RegistrationConfig``) with their descriptions and ranges. Those that take effect at
configure are read-only; live ones are checked and applied in one on-set callback.

Lifecycle: configure loads and checks the model (and CT); activate subscribes, creates the
publishers and starts the worker thread; deactivate and cleanup release them; ``autostart``
(default true) configures and activates at start. A lifecycle request that is not valid in the
current state gets ``success: false``, never a crash. Accepted frames are published stamped
with the image stamp: TF (image frame -> CT frame, or the inverse), ``~/pose``
(PoseWithCovarianceStamped) and ``~/overlay`` (when someone listens). Rejected frames and bad
input publish nothing; the reason goes to the log (throttled) and ``/diagnostics`` (1 Hz).
"""
import sys
import threading

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import SetParametersResult

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

from xray_ct_reg import geometry, ros_io, settings
from xray_ct_reg.register import RegistrationConfig
from xray_ct_reg.stream import NodeConfig, StreamCore

NODE_NAME = settings.NODE_NAME
DEFAULT_MODEL = 'models/chest_example.pt'
LOG_THROTTLE_S = 2.0
SPECS = {spec.name: spec for spec in settings.node_specs()}


def default_model_path():
    """The committed example model: installed share dir first, then the source tree ('' if none)."""
    return ros_io.package_file(DEFAULT_MODEL)


class RegistrationNode(LifecycleNode):
    """Lifecycle node registering each X-ray frame to the CT and publishing the pose."""

    def __init__(self, **kwargs):
        """Declare the parameters and the always-on diagnostics; nothing else until configure."""
        super().__init__(NODE_NAME, **kwargs)
        ros_io.declare_settings(self, SPECS.values())
        undeclared = ros_io.undeclared_overrides(self)  # ROS ignores them without a word
        self._undeclared_warning = '' if not undeclared else (
            f"set but not parameters of this node, ignored: {', '.join(undeclared)} "
            '(misspelt? `xray-ct-reg params` lists them)')
        if undeclared:
            self.get_logger().warning(self._undeclared_warning)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._answer_invalid_transitions()
        self._core = StreamCore(NodeConfig())
        self._registrar = self._patient = None
        self._state = 'unconfigured'
        self._configure_error = ''
        self._subscriptions_list = []
        self._image_topic_name = ''    # the image topic as remapped (kept as text: diagnostics
                                       # may run while a stop destroys the subscription)
        self._to_array = ros_io.image_to_array  # the image_transport's message -> 2D array
        self._pose_pub = self._overlay_pub = self._tf = None
        self._worker = None
        self.result_callback = None
        """In-process hook: called as f(stamp_ns, verdict, reason, result or None) per frame."""
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)

    # ------------------------------------------------------------------------- parameters
    @property
    def _config(self):
        """The node's settings (``stream.NodeConfig``), held by the stream core."""
        return self._core.config

    def _values(self):
        """Current value of every setting, by name."""
        return {name: self.get_parameter(name).value for name in SPECS}

    def _on_set_parameters(self, parameters):
        """Check live changes against their settings and apply them at once (or refuse all)."""
        changes = {}
        for parameter in parameters:
            if parameter.name in SPECS:
                try:
                    changes[parameter.name] = settings.check_value(SPECS[parameter.name],
                                                                   parameter.value)
                except ValueError as error:
                    return SetParametersResult(successful=False, reason=str(error))
        try:  # both configs first: a change inconsistent with the others applies nowhere
            node_config = settings.update(self._config, changes)
            registration_config = (None if self._registrar is None else
                                    settings.update(self._registrar.config, changes))
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        self._core.config = node_config
        if registration_config is not None:
            self._registrar.config = registration_config
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------- lifecycle
    def _answer_invalid_transitions(self):
        """Make ~/change_state answer success=false to a transition invalid in this state.

        rclpy's lifecycle service lets the state machine's RCLError escape into the executor,
        which ends the process; wrap its callback so the request is refused instead.
        """
        service = next(s for s in self.services if s.srv_name.endswith('/change_state'))
        handler = service.callback

        def change_state(request, response):
            try:
                return handler(request, response)
            except Exception as error:  # noqa: BLE001 - any refusal must not end the node
                self.get_logger().warning(
                    f'lifecycle transition id {request.transition.id} label '
                    f"'{request.transition.label}' refused in state {self._state}: "
                    f'{str(error).splitlines()[0]}')
                response.success = False
                return response

        service.callback = change_state

    def on_configure(self, state):
        """Load and check the model (and CT); fail the transition with a clear log otherwise."""
        try:
            values = self._values()
            self._core.config = settings.build(NodeConfig, values)
            ros_io.check_frame_id(self._core.config.ct_frame, 'ct_frame')
            self._registrar, self._patient = self._load_registrar(
                settings.build(RegistrationConfig, values))
        except Exception as error:  # noqa: BLE001 - any failure must fail the transition
            self._registrar = self._patient = None
            self._configure_error = f'configure failed: {error}'
            self.get_logger().error(self._configure_error)
            return TransitionCallbackReturn.FAILURE
        self._configure_error = ''
        self._state = 'inactive'
        self.get_logger().info(f'configured: model {self._model_path()}')
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
        self.get_logger().info(f'active: listening on {self._config.image_topic}')
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
        """Release everything on shutdown (the node is then finalized)."""
        self.on_cleanup(state)
        self._state = 'finalized'
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        """Release everything after an error; go back to unconfigured."""
        return self.on_cleanup(state)

    def start(self):
        """Configure and activate when ``autostart`` is true; return True when active."""
        if not self.get_parameter('autostart').value:
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop(self):
        """Stop the worker thread and release the interfaces (before destroy_node)."""
        self._release_interfaces()

    # ------------------------------------------------------------------------- setup
    def _model_path(self):
        """The checkpoint to load: ``model_path``, else the committed example model."""
        return self._config.model_path or default_model_path()

    def _load_registrar(self, registration_config):
        """Build the Registrar; return (registrar, patient or None)."""
        from xray_ct_reg.register import Registrar
        if not self._model_path():
            raise ValueError('model_path is empty and no committed example model was found')
        patient = None
        if self._config.ct_path:
            from xray_ct_reg import ct
            patient = ct.load_patient(self._config.ct_path)
        registrar = Registrar.from_checkpoint(self._model_path(), patient=patient,
                                              config=registration_config)
        return registrar, patient

    def _image_qos(self):
        """QoS profile of the image and CameraInfo subscriptions."""
        if self._config.image_qos == 'sensor_data':
            return qos_profile_sensor_data
        return QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)

    def _create_interfaces(self):
        """Subscriptions, publishers, worker thread (on activate)."""
        self._core.reset()
        qos = self._image_qos()
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, '~/pose', 10)
        self._overlay_pub = self.create_publisher(Image, '~/overlay', 2)
        self._tf = ros_io.make_tf_publisher(self)
        events = SubscriptionEventCallbacks(incompatible_qos=lambda info: (
            self._core.note_incompatible_publisher(info.last_policy_kind.name)))
        message_type, suffix, self._to_array = ros_io.IMAGE_TRANSPORTS[
            self._config.image_transport]
        self._subscriptions_list = [self.create_subscription(
            message_type, self._config.image_topic + suffix, self._on_image, qos,
            event_callbacks=events)]
        self._image_topic_name = self._subscriptions_list[0].topic_name
        if self._config.use_camera_info:
            self._subscriptions_list.append(self.create_subscription(
                CameraInfo, self._config.camera_info_topic, self._on_camera_info, qos,
                event_callbacks=events))
        self._worker = threading.Thread(target=self._worker_loop, name='registration',
                                        daemon=True)
        self._worker.start()

    def _release_interfaces(self):
        """Stop the worker, then destroy subscriptions and publishers (idempotent)."""
        self._core.stop()
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

    # ------------------------------------------------------------------------- input
    def _tf_frames(self, image_frame):
        """(parent, child) frames of the transform a frame from ``image_frame`` publishes."""
        if self._config.publish_inverse:
            return self._config.ct_frame, image_frame
        return image_frame, self._config.ct_frame

    def _on_image(self, msg):
        """Hand the frame to the mailbox; report a refused stamp at once."""
        frame, refusal = self._core.offer_image(msg, ros_io.stamp_to_ns(msg.header.stamp),
                                                self._tf_frames(msg.header.frame_id))
        if refusal:
            self._report(frame, 'error', f'bad stamp: {refusal}')

    def _on_camera_info(self, msg):
        """Hand a CameraInfo to the pairing cache."""
        self._core.offer_camera_info(msg, ros_io.stamp_to_ns(msg.header.stamp))

    def _intrinsics(self, frame, width, height):
        """Intrinsics of a frame from its CameraInfo or the fallback geometry (None: superseded)."""
        config = self._config
        if not config.use_camera_info:
            return geometry.Intrinsics.from_carm(config.sdd_mm, config.pixel_spacing_mm,
                                                 width, height)
        info = self._core.camera_info_for(frame)
        if info is None:
            return None
        intrinsics = ros_io.camera_info_to_intrinsics(info, config.sdd_mm)
        if (intrinsics.width, intrinsics.height) != (width, height):
            expected = f'{intrinsics.width}x{intrinsics.height}'
            if (intrinsics.width, intrinsics.height) != (info.width, info.height):
                expected += (f' (its {info.width}x{info.height} detector through its ROI and '
                             'binning)')
            raise ValueError(f'image size {width}x{height} does not match CameraInfo {expected}')
        return intrinsics

    # ------------------------------------------------------------------------- worker
    def _worker_loop(self):
        """Register the latest frame, one at a time, until stopped; never raise."""
        while (frame := self._core.take()) is not None:
            try:
                self._process(frame)
            except ValueError as error:  # conversion, CameraInfo pairing, Registrar input checks
                self._report(frame, 'error', f'bad input: {error}')
            except Exception as error:  # noqa: BLE001 - one bad frame must not stop the node
                self._report(frame, 'error',
                             f'internal error: {type(error).__name__}: {error}')

    def _process(self, frame):
        """Register one frame and publish the outputs when the result is accepted."""
        msg = frame.payload
        image = self._to_array(msg)
        ros_io.check_frame_id(msg.header.frame_id, 'image header frame_id (the TF parent)')
        if msg.header.frame_id == self._config.ct_frame:
            raise ValueError(f'image frame_id equals ct_frame {self._config.ct_frame!r}: a '
                             'transform from a frame to itself')
        intrinsics = self._intrinsics(frame, image.shape[1], image.shape[0])
        if intrinsics is None:
            return
        result = self._registrar.register(image, intrinsics,
                                          prior_pose=self._core.prior_pose(frame))
        if not result.accepted:
            self._report(frame, 'rejected', result.reason or 'rejected by the quality gates',
                         result)
            return
        refusal = self._core.claim_stamp(frame)
        if refusal:
            self._report(frame, 'error', f'not published: {refusal}', result)
            return
        self._publish(msg, image, intrinsics, result)
        self._core.remember_pose(frame, result.pose, result.tracked)
        stamp_to_tf_ms = (self.get_clock().now().nanoseconds - frame.stamp_ns) * 1e-6
        self._report(frame, 'accepted', '', result, stamp_to_tf_ms)

    def _publish(self, msg, image, intrinsics, result):
        """TF, pose with covariance and (when listened to) the overlay, with the image stamp."""
        header, config = msg.header, self._config
        if config.publish_inverse:
            inverse_header = type(header)(stamp=header.stamp, frame_id=config.ct_frame)
            transform = ros_io.pose_to_transform_stamped(
                geometry.invert_pose(result.pose), inverse_header, header.frame_id)
        else:
            transform = ros_io.pose_to_transform_stamped(result.pose, header, config.ct_frame)
        self._tf.sendTransform(transform)
        self._pose_pub.publish(ros_io.pose_to_pose_with_covariance(
            result.pose, result.covariance, header))
        if (config.publish_overlay and self._patient is not None
                and self._overlay_pub.get_subscription_count() > 0):
            from xray_ct_reg.overlay import draw_overlay
            overlay = draw_overlay(image, result.pose, intrinsics, self._patient)
            self._overlay_pub.publish(ros_io.array_to_image_msg(overlay, 'bgr8', header))

    def _report(self, frame, verdict, reason, result=None, stamp_to_tf_ms=None):
        """Record a frame's verdict; log rejections and errors (throttled); call the hook."""
        self._core.finish(frame, verdict, reason, stamp_to_tf_ms)
        if verdict == 'rejected':
            self.get_logger().warning(f'frame rejected, no pose published: {reason}',
                                      throttle_duration_sec=LOG_THROTTLE_S)
        elif verdict == 'error':
            self.get_logger().error(f'frame skipped: {reason}',
                                    throttle_duration_sec=LOG_THROTTLE_S)
        if self.result_callback is not None:
            self.result_callback(frame.stamp_ns, verdict, reason, result)

    # ------------------------------------------------------------------------- diagnostics
    def stats(self):
        """Lifecycle state, counters and latency percentiles (as on /diagnostics)."""
        values = {'state': self._state, **self._core.stats()}
        if self._configure_error:
            values['last_verdict'], values['last_reason'] = 'error', self._configure_error
        return values

    def _publish_diagnostics(self):
        """Publish one DiagnosticStatus on /diagnostics: the verdict first, then any warning."""
        values = self.stats()
        verdict = values['last_verdict']
        message = f'{self._state}: last frame {verdict}'
        level = {'rejected': DiagnosticStatus.WARN, 'error': DiagnosticStatus.ERROR}.get(
            verdict, DiagnosticStatus.OK)
        if verdict in ('rejected', 'error'):
            message += f": {values['last_reason']}"
        if self._state == 'active' and self._image_topic_name:
            warning = self._core.warning(self.count_publishers(self._image_topic_name))
        else:  # a monitor must not read a node that publishes nothing as healthy
            warning = f'not publishing: lifecycle state {self._state}'
        warning = '; '.join(filter(None, (warning, self._undeclared_warning)))
        if warning:
            level = max(level, DiagnosticStatus.WARN)
            message += f' | warning: {warning}'
            self.get_logger().warning(warning, throttle_duration_sec=10.0)
        values['warning'] = warning
        status = DiagnosticStatus(level=level, name=f'{self.get_fully_qualified_name()}: '
                                  'registration', message=message, hardware_id='carm')
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def main(args=None) -> int:
    """Run the node until SIGINT/SIGTERM; return the process exit status (0 on a clean stop)."""
    return ros_io.run_node(RegistrationNode, args)


if __name__ == '__main__':
    sys.exit(main())
