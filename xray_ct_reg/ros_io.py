"""The ROS boundary: sensor_msgs / geometry_msgs <-> numpy and the core's conventions.

Millimetres become metres here and nowhere else: TF and geometry_msgs poses carry metres
(REP 103), the core works in millimetres. Image conversion uses ``cv_bridge`` when it imports
(a real ROS install) and otherwise a small numpy conversion for the encodings a C-arm uses
(``image_io.IMAGE_ENCODINGS``; colour frames become their luminance), honouring ``step`` (row
padding) and ``is_bigendian``; image_transport's compressed transport (PNG, JPEG) is decoded
with OpenCV (``IMAGE_TRANSPORTS``). TF goes
out through ``tf2_ros.TransformBroadcaster`` when it imports, else through a
``tf2_msgs/TFMessage`` publisher on ``/tf`` with tf2_ros's QoS. ``select_transport_profile``
points Fast DDS at the package's profile for full-size frames.
"""
import array
import os
from pathlib import Path
import sys

from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped, TransformStamped
import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from xray_ct_reg import geometry, image_io, settings

try:  # a real ROS install has cv_bridge; PyPI does not
    from cv_bridge import CvBridge
except ImportError:  # pragma: no cover - depends on the installation
    CvBridge = None

try:
    from tf2_ros import TransformBroadcaster
except ImportError:  # pragma: no cover - depends on the installation
    TransformBroadcaster = None

MM_PER_M = 1000.0
PACKAGE = 'xray_ct_reg'
TRANSPORT_PROFILE = 'config/fastdds_profile.xml'
PROFILE_VARIABLES = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')

# tf2_ros.TransformBroadcaster's QoS
TF_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)


# ----------------------------------------------------------------------------- files
def package_file(relative):
    """Path of a file shipped with the package, or '' when there is none.

    The installed share directory comes first, then the source tree.
    """
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(PACKAGE)) / relative)
    except (ImportError, LookupError, OSError, ValueError):  # no ament index here
        pass
    candidates.append(Path(__file__).resolve().parent.parent / relative)
    return next((str(path) for path in candidates if path.is_file()), '')


def select_transport_profile():
    """Point Fast DDS at the package's transport profile unless the user chose a profile.

    Call before ``rclpy.init``. Full-size C-arm frames (2-5 MB) need the shared-memory
    transport with large segments (``config/fastdds_profile.xml``); Fast DDS reads the file
    named by ``FASTRTPS_DEFAULT_PROFILES_FILE`` (2.x, Jazzy) or ``FASTDDS_DEFAULT_PROFILES_FILE``
    (3.x, Kilted): both are set. Returns the profile used ('' for none: another RMW, or a
    variable already set).
    """
    if any(os.environ.get(name) for name in PROFILE_VARIABLES):
        return ''
    if not os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp').startswith('rmw_fastrtps'):
        return ''
    profile = package_file(TRANSPORT_PROFILE)
    if profile:
        os.environ.update(dict.fromkeys(PROFILE_VARIABLES, profile))
    return profile


# ----------------------------------------------------------------------------- parameters
def spin_until_shutdown(executor):
    """Spin ``executor`` until SIGINT, SIGTERM or an external shutdown: all a clean stop.

    rclpy's signal handler shuts the context down. The executor usually notices at its next
    turn (ExternalShutdownException); when the signal lands while it builds its wait set it
    fails with RCLError on the invalid context instead. That is a stop too; an RCLError while
    the context is valid propagates.
    """
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except rclpy_implementation.RCLError:
        if executor.context.ok():
            raise


def check_frame_id(frame_id, what):
    """Raise ValueError unless ``frame_id`` is a TF frame id tf2 accepts (``what`` names it).

    Not empty, no leading '/' (ROS 2 frame ids have none), no whitespace.
    """
    if not frame_id or frame_id.startswith('/') or any(c.isspace() for c in frame_id):
        raise ValueError(f'{what} {frame_id!r} is not a valid TF frame id (non-empty, no '
                         "leading '/', no spaces)")


def run_node(build, args=None):
    """A node's process: rclpy up, ``build()``'s node spun until a stop, then torn down; 0.

    A node with ``start`` / ``stop`` methods gets them called after it joins the executor and
    before it is destroyed. The Fast DDS transport profile is chosen first
    (``select_transport_profile``).
    """
    select_transport_profile()
    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = build()
        executor.add_node(node)
        if hasattr(node, 'start'):
            node.start()
        spin_until_shutdown(executor)
    finally:
        if node is not None:
            if hasattr(node, 'stop'):
                node.stop()
            node.destroy_node()
        executor.shutdown()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


def parameter_descriptor(spec):
    """ParameterDescriptor of a setting: description, range, choices, read-only unless live."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    descriptor = ParameterDescriptor(description=spec.description, read_only=not spec.live)
    if spec.limits is not None and spec.kind is float:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=float(spec.limits[0]), to_value=float(spec.limits[1]))]
    elif spec.limits is not None:
        descriptor.integer_range = [
            IntegerRange(from_value=int(spec.limits[0]), to_value=int(spec.limits[1]), step=1)]
    if spec.choices is not None:
        descriptor.additional_constraints = f"one of: {', '.join(spec.choices)}"
    return descriptor


def declare_settings(node, specs):
    """Declare a parameter per setting (``settings.Spec``) on ``node``; return their values.

    The values (by name) include the overrides given at start (-p, --params-file).
    """
    for spec in specs:
        node.declare_parameter(spec.name, spec.default, parameter_descriptor(spec))
    return {spec.name: node.get_parameter(spec.name).value for spec in specs}


def _ros_arguments(args):
    """(flag, value) of the --params-file and -p/--param arguments in ``args``' --ros-args."""
    inside, pending = False, None
    for token in args:
        if pending is not None:
            yield pending, token
            pending = None
        elif token == '--ros-args':
            inside = True
        elif token == '--':
            inside = False
        elif inside and token in ('--params-file', '-p', '--param'):
            pending = token


def _params_file_names(path, node_name):
    """Parameter names a ROS 2 parameter file sets for the node ``node_name`` (full name)."""
    import yaml
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return set()  # rclpy.init has already refused a file it cannot read

    def flatten(values, prefix=''):
        for name, value in values.items():
            if isinstance(value, dict):
                yield from flatten(value, f'{prefix}{name}.')
            else:
                yield prefix + str(name)
    names = set()
    for section in (settings.node_parameters(document, node_name)
                    if isinstance(document, dict) else ()):
        names.update(flatten(section))
    return names


def undeclared_overrides(node, args=None):
    """Names set for ``node`` at start (--params-file, -p) that it has not declared, sorted.

    ROS ignores such overrides without a word, so a misspelt setting would silently keep its
    default. ``args``: the process arguments (default ``sys.argv``).
    """
    names = set()
    for flag, value in _ros_arguments(sys.argv if args is None else args):
        if flag == '--params-file':
            names |= _params_file_names(value, node.get_fully_qualified_name())
        else:
            names.add(value.split(':=', 1)[0])
    return sorted(name for name in names if not node.has_parameter(name))


# ----------------------------------------------------------------------------- time
def stamp_to_ns(stamp):
    """A builtin_interfaces/Time as integer nanoseconds (a hashable key)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ----------------------------------------------------------------------------- images
def _check_image(msg):
    """Validate an Image's encoding and buffer size; return its (numpy dtype, channels)."""
    dtype, channels = image_io.read_layout(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f'empty image ({width}x{height})')
    if step < width * channels * dtype.itemsize:
        raise ValueError(f'image step {step} is smaller than width {width} x '
                         f'{channels * dtype.itemsize} bytes')
    if len(msg.data) != step * height:
        raise ValueError(f'image data has {len(msg.data)} bytes, expected step {step} x '
                         f'height {height} = {step * height}')
    return dtype, channels


def image_to_array(msg):
    """Convert a sensor_msgs/Image to a 2D numpy array (uint8, uint16 or float32).

    A colour frame (``image_io.COLOUR_ENCODINGS``) becomes its luminance. Raises ValueError for
    an unsupported encoding, an empty image or a data size that does not match
    ``step * height``.
    """
    dtype, channels = _check_image(msg)
    if CvBridge is not None:
        pixels = np.asarray(CvBridge().imgmsg_to_cv2(msg, desired_encoding='passthrough'))
    else:
        height, width, step = int(msg.height), int(msg.width), int(msg.step)
        rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)
        packed = np.ascontiguousarray(rows[:, :width * channels * dtype.itemsize])
        order = '>' if msg.is_bigendian else '<'
        shape = (height, width, channels) if channels > 1 else (height, width)
        pixels = packed.view(dtype.newbyteorder(order)).reshape(shape).astype(dtype)
    return image_io.to_grey(pixels, msg.encoding)


def compressed_image_to_array(msg):
    """Decode a sensor_msgs/CompressedImage (PNG or JPEG) to a 2D uint8 or uint16 array.

    As image_transport's compressed plugin publishes it (``format`` e.g. 'mono16; png
    compressed ', or just 'png'); a colour frame becomes its luminance. Raises ValueError for
    empty or undecodable data and for the compressedDepth format (a depth camera's).
    """
    import cv2
    if 'compresseddepth' in msg.format.replace(' ', '').lower():
        raise ValueError(f'compressed image format {msg.format!r} (compressedDepth) is not '
                         'supported: publish with the compressed transport (PNG)')
    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if data.size == 0:
        raise ValueError('empty compressed image')
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f'could not decode the compressed image (format {msg.format!r}, '
                         f'{data.size} bytes) as PNG or JPEG')
    return image_io.decoded_to_grey(pixels)


# encodings a PNG sensor_msgs/CompressedImage carries losslessly
PNG_ENCODINGS = ('mono8', 'mono16')


def array_to_compressed_image_msg(image, header=None):
    """A 2D uint8 or uint16 array as a PNG sensor_msgs/CompressedImage (lossless)."""
    import cv2
    image = np.asarray(image)
    encoding = image_io.encoding_for(image)
    if image.ndim != 2 or encoding not in PNG_ENCODINGS:
        raise ValueError(f'PNG needs a 2D uint8 or uint16 image, got {image.dtype} '
                         f'{image.shape}')
    ok, png = cv2.imencode('.png', image)
    if not ok:
        raise ValueError('OpenCV could not encode the image as PNG')
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = f'{encoding}; png compressed '
    msg.data = array.array('B', png.tobytes())
    return msg


# image_transport transport name -> (message type, topic suffix, converter to a 2D array)
IMAGE_TRANSPORTS = {'raw': (Image, '', image_to_array),
                    'compressed': (CompressedImage, '/compressed', compressed_image_to_array)}


def array_to_image_msg(image, encoding, header=None):
    """Convert a 2D array to a sensor_msgs/Image with ``encoding`` (values cast to its dtype).

    Also accepts ``bgr8`` for (H, W, 3) uint8 images (overlays).
    """
    image = np.asarray(image)
    msg = Image()
    if header is not None:
        msg.header = header
    if encoding == 'bgr8':
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'bgr8 needs an (H, W, 3) image, got shape {image.shape}')
        data = np.ascontiguousarray(image, dtype=np.uint8)
    else:
        dtype = image_io.encoding_dtype(encoding)
        if image.ndim != 2:
            raise ValueError(f'{encoding} needs a 2D image, got shape {image.shape}')
        data = np.ascontiguousarray(image.astype(dtype, copy=False))
    if data.size == 0:
        raise ValueError('empty image')
    msg.height, msg.width = int(data.shape[0]), int(data.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == 'big')
    msg.step = int(data.strides[0])
    msg.data = array.array('B', data.tobytes())
    return msg


# ----------------------------------------------------------------------------- camera info
def camera_info_to_intrinsics(msg, sdd_mm):
    """Intrinsics of the image a sensor_msgs/CameraInfo describes; ``sdd_mm`` turns K into mm.

    As the CameraInfo message defines them, K, ``width`` and ``height`` are the full detector's
    and the image is its region of interest ``roi`` (full-resolution pixels; all zero: the
    whole detector), binned by ``binning_x`` x ``binning_y`` (0 counts as 1): a collimated crop
    or a binned readout registers with the geometry it really has. The binning is pixel-centre
    exact (a binned pixel's centre is the mean of its pixels' centres), which puts the principal
    point (b - 1) / (2 b) px from image_geometry's cx / b.

    Raises ValueError for a zero, NaN or otherwise invalid K or size, a ROI outside the
    detector or not divisible by the binning, and non-zero distortion coefficients D (an image
    intensifier's pincushion: rectify first, e.g. with image_proc, and send the rectified image
    with a CameraInfo of D = 0).
    """
    k = np.asarray(msg.k, dtype=float)
    if k.size != 9 or not np.all(np.isfinite(k)) or k[0] <= 0 or k[4] <= 0:
        raise ValueError(f'invalid CameraInfo K {k.tolist()} (zero, NaN or non-positive focal)')
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise ValueError(f'invalid CameraInfo size {msg.width}x{msg.height}')
    distortion = np.asarray(msg.d, dtype=float)
    if distortion.size and not np.all(distortion == 0.0):
        raise ValueError(f'CameraInfo has distortion ({msg.distortion_model} D = '
                         f'{distortion.tolist()}): registration needs an undistorted image '
                         '(rectify it, and send a CameraInfo with D = 0)')
    detector = geometry.Intrinsics.from_camera_info(k, width, height, sdd_mm)
    roi = msg.roi
    x0, y0, roi_width, roi_height = (int(roi.x_offset), int(roi.y_offset), int(roi.width),
                                     int(roi.height))
    if (x0, y0, roi_width, roi_height) == (0, 0, 0, 0):
        roi_width, roi_height = width, height
    if roi_width <= 0 or roi_height <= 0 or x0 + roi_width > width or y0 + roi_height > height:
        raise ValueError(f'CameraInfo region of interest {roi_width}x{roi_height} at ({x0}, '
                         f'{y0}) does not lie within the {width}x{height} detector')
    binning_x, binning_y = max(int(msg.binning_x), 1), max(int(msg.binning_y), 1)
    if roi_width % binning_x or roi_height % binning_y:
        raise ValueError(f'CameraInfo region of interest {roi_width}x{roi_height} is not '
                         f'divisible by its binning {binning_x}x{binning_y}')
    return detector.crop(x0, y0, roi_width, roi_height).resize(roi_width // binning_x,
                                                               roi_height // binning_y)


def intrinsics_to_camera_info(intrinsics, header=None):
    """A sensor_msgs/CameraInfo (pinhole, no distortion) for ``intrinsics``."""
    msg = CameraInfo()
    if header is not None:
        msg.header = header
    msg.width, msg.height = int(intrinsics.width), int(intrinsics.height)
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    K = np.asarray(intrinsics.K, dtype=float)
    msg.k = K.reshape(9).tolist()
    msg.r = np.eye(3).reshape(9).tolist()
    msg.p = np.hstack([K, np.zeros((3, 1))]).reshape(12).tolist()
    return msg


# ----------------------------------------------------------------------------- poses
def _fill_pose_fields(position, orientation, pose_mm):
    """Write a mm pose into geometry_msgs Point/Vector3 + Quaternion fields, in metres."""
    quaternion, translation = geometry.pose_to_quaternion(np.asarray(pose_mm, dtype=float))
    position.x, position.y, position.z = (float(v) / MM_PER_M for v in translation)
    orientation.x, orientation.y, orientation.z, orientation.w = (float(v) for v in quaternion)


def pose_to_transform_stamped(T_imager_ct_mm, header, child_frame):
    """TransformStamped (metres) of a 4x4 mm pose; frame_id from ``header``."""
    msg = TransformStamped()
    msg.header = header
    msg.child_frame_id = child_frame
    _fill_pose_fields(msg.transform.translation, msg.transform.rotation, T_imager_ct_mm)
    return msg


def pose_to_pose_stamped(T_imager_ct_mm, header):
    """PoseStamped (metres) of a 4x4 mm pose."""
    msg = PoseStamped()
    msg.header = header
    _fill_pose_fields(msg.pose.position, msg.pose.orientation, T_imager_ct_mm)
    return msg


def covariance_mm_to_m(covariance_mm_rad):
    """Convert a 6x6 covariance (x y z in mm, rx ry rz in rad) to metres and radians."""
    covariance = np.asarray(covariance_mm_rad, dtype=float).reshape(6, 6)
    scale = np.diag([1.0 / MM_PER_M] * 3 + [1.0] * 3)
    return scale @ covariance @ scale


def pose_to_pose_with_covariance(T_imager_ct_mm, covariance_mm_rad, header):
    """PoseWithCovarianceStamped (metres); covariance order x y z rx ry rz, converted to m."""
    msg = PoseWithCovarianceStamped()
    msg.header = header
    _fill_pose_fields(msg.pose.pose.position, msg.pose.pose.orientation, T_imager_ct_mm)
    msg.pose.covariance = covariance_mm_to_m(covariance_mm_rad).reshape(36).tolist()
    return msg


def transform_msg_to_pose(msg):
    """4x4 pose in mm from a Transform(Stamped), Pose(Stamped) or PoseWithCovariance(Stamped)."""
    for name in ('transform', 'pose', 'pose'):  # unwrap *Stamped / *WithCovariance layers
        if hasattr(msg, name):
            msg = getattr(msg, name)
    if hasattr(msg, 'translation'):
        position, orientation = msg.translation, msg.rotation
    elif hasattr(msg, 'position'):
        position, orientation = msg.position, msg.orientation
    else:
        raise ValueError(f'not a transform or pose message: {type(msg).__name__}')
    translation = np.array([position.x, position.y, position.z]) * MM_PER_M
    quaternion = [orientation.x, orientation.y, orientation.z, orientation.w]
    return geometry.pose_from_quaternion(quaternion, translation)


# ----------------------------------------------------------------------------- TF
class _TfPublisher:
    """Minimal stand-in for tf2_ros.TransformBroadcaster: TFMessage on /tf, tf2_ros QoS."""

    def __init__(self, node):
        """Create the /tf publisher on ``node``."""
        from tf2_msgs.msg import TFMessage
        self._message_type = TFMessage
        self.pub_tf = node.create_publisher(TFMessage, '/tf', TF_QOS)

    def sendTransform(self, transform):  # noqa: N802 - tf2_ros's name
        """Publish one TransformStamped or a list of them."""
        transforms = transform if isinstance(transform, (list, tuple)) else [transform]
        self.pub_tf.publish(self._message_type(transforms=list(transforms)))


def make_tf_publisher(node):
    """A TF broadcaster for ``node`` (tf2_ros when importable); use ``.sendTransform(t)``."""
    if TransformBroadcaster is not None:
        return TransformBroadcaster(node)
    return _TfPublisher(node)


def destroy_tf_publisher(node, broadcaster):
    """Release the publisher behind a broadcaster made by :func:`make_tf_publisher`."""
    node.destroy_publisher(broadcaster.pub_tf)
