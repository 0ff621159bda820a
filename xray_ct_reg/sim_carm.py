"""A simulated C-arm: a ROS 2 node publishing X-ray frames rendered from a CT.

``simulated_carm`` publishes sensor_msgs/Image (mono16 by default) and CameraInfo on
``/carm/image_raw`` and ``/carm/camera_info`` at ``rate_hz`` (with ``image_transport``
``compressed``: lossless PNG sensor_msgs/CompressedImage on ``/carm/image_raw/compressed``, as
image_transport's compressed plugin names it), and the true pose of each frame on
``/carm/true_pose`` (geometry_msgs/PoseStamped, metres, T_imager_ct, frame = the image frame),
all three with the same stamp, for checking a registration. Frames come from a pool rendered at
start (random poses from ``simulate.PoseSampler`` with ``seed``, or the poses of ``poses_file``),
because rendering is far slower than a C-arm's frame rate; images larger than ``render_size``
are rendered at that size and resized (a resize changes K, never the pose).
"""
from dataclasses import dataclass
import json
import sys

from geometry_msgs.msg import PoseStamped
import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

from xray_ct_reg import geometry, image_io, ros_io, settings
from xray_ct_reg.settings import setting
from xray_ct_reg.stream import IMAGE_TRANSPORTS, QOS_PROFILES

NODE_NAME = 'simulated_carm'


@dataclass
class Frame:
    """One simulated X-ray: the image as published, its intrinsics and the true pose (mm)."""

    image: np.ndarray
    intrinsics: geometry.Intrinsics
    pose: np.ndarray


def render_frames(patient, poses, size=256, render_size=256, encoding='mono16', seed=0,
                  polarity='bright_bone'):
    """Render one Frame per pose at ``size`` px (rendered at <= ``render_size`` and resized).

    Images are DRRs (``drr.DRRProjector``) given the simulator's X-ray appearance
    (``simulate.xray_appearance`` with ``polarity``; noise seeded by ``seed``) and the C-arm's
    intrinsics (Cios Fusion geometry resampled to ``size``).
    """
    import cv2

    from xray_ct_reg import drr, simulate

    projector = drr.DRRProjector(patient.ct)
    rng = np.random.default_rng(seed)
    rendered_size = min(int(size), int(render_size))
    render_intrinsics = geometry.default_intrinsics(rendered_size)
    intrinsics = geometry.default_intrinsics(int(size))
    frames = []
    for pose in poses:
        line_integral = projector.render(np.asarray(pose, dtype=float), render_intrinsics)
        image = simulate.xray_appearance(line_integral, rng, polarity=polarity)
        if rendered_size != size:
            image = cv2.resize(np.asarray(image, dtype=np.float32), (int(size), int(size)),
                               interpolation=cv2.INTER_LINEAR)
        frames.append(Frame(image_io.to_encoding(image, encoding), intrinsics,
                            np.asarray(pose, float)))
    return frames


def readout_region(size, roi_size=0, binning=1):
    """(first pixel, side) of the centred ``roi_size`` square (0: all) of a ``size`` px detector.

    ValueError when it is larger than the detector or not divisible by ``binning``.
    """
    side = int(roi_size) or int(size)
    if side > size or side % int(binning):
        raise ValueError(f'readout: a {side} px square is not a binned ({binning} x {binning}) '
                         f'region of a {size} px detector')
    return (int(size) - side) // 2, side


def read_out(frame, roi_size=0, binning=1):
    """``frame`` as a flat-panel detector reads it out, and the CameraInfo a driver sends with it.

    The image is the centred ``roi_size`` square of the frame's pixels (0: all of them; a C-arm's
    zoom modes read the middle of the detector) binned ``binning`` x ``binning`` (block means).
    The CameraInfo states the whole detector's K and size with that ``roi`` and binning, as the
    message defines them. Returns (the read-out Frame, with the intrinsics its pixels have,
    CameraInfo). ValueError for a ROI larger than the frame or not divisible by the binning.
    """
    from sensor_msgs.msg import RegionOfInterest

    size = frame.image.shape[0]
    start, side = readout_region(size, roi_size, binning)
    crop = frame.image[start:start + side, start:start + side]
    blocks = crop.astype(np.float64).reshape(side // binning, binning, side // binning,
                                             binning).mean(axis=(1, 3))
    image = (blocks.astype(frame.image.dtype) if np.issubdtype(frame.image.dtype, np.floating)
             else np.round(blocks).astype(frame.image.dtype))
    info = ros_io.intrinsics_to_camera_info(frame.intrinsics)
    if side != size:
        info.roi = RegionOfInterest(x_offset=start, y_offset=start, width=side, height=side)
    if binning > 1:
        info.binning_x = info.binning_y = int(binning)
    intrinsics = ros_io.camera_info_to_intrinsics(info, frame.intrinsics.sdd_mm)
    return Frame(image, intrinsics, frame.pose), info


# per-frame step of a sequence: C-arm orbit (deg about the patient's long axis through the
# bone centroid) or table shift (mm along that axis)
MOTION_STEPS = {'rotation': 0.5, 'table_shift': 1.0}
MOTIONS = ('none',) + tuple(MOTION_STEPS)  # 'none': independent random views


def sample_poses(patient, count, seed=0, motion='none'):
    """``count`` C-arm poses (T_imager_ct, mm) from ``simulate.PoseSampler`` (seeded).

    ``motion`` 'none': independent random poses; 'rotation' or 'table_shift': a fluoroscopy
    sequence from the first random pose, the C-arm orbiting by MOTION_STEPS['rotation'] degrees
    or the table moving by MOTION_STEPS['table_shift'] mm per frame along the CT's z axis.
    """
    from xray_ct_reg import simulate

    sampler = simulate.PoseSampler()
    rng = np.random.default_rng(seed)
    vertices = np.asarray(patient.mesh.vertices)
    if motion == 'none':
        return [sampler.sample(rng, vertices, patient.bone_centroid)[0]
                for _ in range(int(count))]
    if motion not in MOTION_STEPS:
        raise ValueError(f"motion must be 'none' or one of {sorted(MOTION_STEPS)}: {motion!r}")
    first = sampler.sample(rng, vertices, patient.bone_centroid)[0]
    centre = np.asarray(patient.bone_centroid, dtype=float)
    step = MOTION_STEPS[motion]
    poses = []
    for index in range(int(count)):
        if motion == 'rotation':
            move = geometry.rotation_about([0.0, 0.0, np.radians(step * index)], centre)
        else:
            move = geometry.make_pose(np.eye(3), [0.0, 0.0, step * index])
        poses.append(geometry.compose(first, move))
    return poses


def read_poses(path):
    """Poses from a JSON file: a list of 4x4 T_imager_ct matrices (mm)."""
    with open(path) as handle:
        poses = [np.asarray(pose, dtype=float) for pose in json.load(handle)]
    for pose in poses:
        if not geometry.is_rigid(pose, tolerance=1e-5):
            raise ValueError(f'{path}: not a rigid 4x4 pose: {pose.tolist()}')
    return poses


@dataclass
class SimCarmConfig:
    """Simulated C-arm: frame pool, rate and topics."""

    ct_path: str = setting('example', "CT to render ('example' = embedded chest CT)")
    size: int = setting(256, 'detector size (px, square): the published image unless roi_size '
                        'or binning reads out less', limits=(16, 4096))
    render_size: int = setting(256, 'render at most this size, then resize (px)',
                               limits=(16, 4096))
    roi_size: int = setting(0, "centred square readout (detector px; 0: the whole detector), as "
                            "a C-arm's zoom modes read out; CameraInfo states it as roi",
                            limits=(0, 4096))
    binning: int = setting(1, 'detector binning: each published pixel the mean of binning x '
                           'binning detector pixels; CameraInfo states it as binning_x/y',
                           limits=(1, 16))
    encoding: str = setting('mono16', 'image encoding', choices=image_io.WRITE_ENCODINGS)
    polarity: str = setting('bright_bone', 'image polarity (random: drawn per frame)',
                            choices=('bright_bone', 'dark_bone', 'random'))
    rate_hz: float = setting(5.0, 'publishing rate (Hz)', limits=(0.01, 1000.0))
    seed: int = setting(0, 'seed of the pose sampler and the image noise', limits=(0, 2**31 - 1))
    pool_size: int = setting(8, 'number of poses rendered at start', limits=(1, 10000))
    motion: str = setting('none', 'none: random poses; rotation or table_shift: a fluoroscopy '
                          'sequence (0.5 deg orbit or 1 mm table shift per frame)',
                          choices=MOTIONS)
    poses_file: str = setting('', 'JSON list of 4x4 poses (mm) to use instead of random ones')
    max_frames: int = setting(0, 'stop publishing after this many frames (0 = never)',
                              limits=(0, 2**31 - 1))
    frame_id: str = setting('carm', 'frame id of the images (the imager frame)')
    image_topic: str = setting('/carm/image_raw', 'image base topic')
    image_transport: str = setting(
        'raw', "image_transport's transport: raw (sensor_msgs/Image on image_topic) or "
        'compressed (lossless PNG sensor_msgs/CompressedImage on image_topic/compressed; '
        f"{' or '.join(ros_io.PNG_ENCODINGS)} only)", choices=IMAGE_TRANSPORTS)
    camera_info_topic: str = setting('/carm/camera_info', 'CameraInfo topic')
    true_pose_topic: str = setting('/carm/true_pose', 'true pose topic (PoseStamped, m)')
    qos: str = setting('reliable', 'QoS of image and CameraInfo (REP 2003: drivers publish '
                       'reliable)', choices=QOS_PROFILES)


class SimulatedCarm(Node):
    """Publishes a pool of simulated frames in a loop at ``rate_hz``."""

    def __init__(self, patient=None, **kwargs):
        """Declare parameters, render the frame pool and start the publishing timer.

        ``patient`` (a loaded ``ct.Patient``) skips loading ``ct_path`` when running in-process.
        """
        super().__init__(NODE_NAME, **kwargs)
        config = self.config = settings.build(
            SimCarmConfig, ros_io.declare_settings(self, settings.specs(SimCarmConfig)))
        if config.image_transport == 'compressed' and config.encoding not in ros_io.PNG_ENCODINGS:
            raise ValueError(f'image_transport compressed publishes PNG: encoding must be one '
                             f'of {ros_io.PNG_ENCODINGS}, not {config.encoding!r}')
        readout_region(config.size, config.roi_size, config.binning)  # refused before rendering
        if patient is None:
            from xray_ct_reg import ct
            patient = ct.load_patient(config.ct_path)
        poses = (read_poses(config.poses_file) if config.poses_file
                 else sample_poses(patient, config.pool_size, config.seed, config.motion))
        self.get_logger().info(f'rendering {len(poses)} frames at {config.size} px ...')
        readouts = [read_out(frame, config.roi_size, config.binning) for frame in render_frames(
            patient, poses, config.size, config.render_size, config.encoding, config.seed,
            config.polarity)]
        self.frames = [frame for frame, _ in readouts]
        """The frames as published: read-out image, the intrinsics its pixels have, true pose."""
        qos = (qos_profile_sensor_data if config.qos == 'sensor_data'
               else QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        message_type, suffix, _ = ros_io.IMAGE_TRANSPORTS[config.image_transport]
        self._image_pub = self.create_publisher(message_type, config.image_topic + suffix, qos)
        self._info_pub = self.create_publisher(CameraInfo, config.camera_info_topic, qos)
        self._pose_pub = self.create_publisher(PoseStamped, config.true_pose_topic, 10)
        self._messages = [(ros_io.array_to_compressed_image_msg(f.image)
                           if config.image_transport == 'compressed'
                           else ros_io.array_to_image_msg(f.image, config.encoding), info)
                          for f, info in readouts]
        self.published = 0
        self.published_stamps = {}
        """stamp (ns) -> index in ``frames`` of every frame published (with max_frames only)."""
        self._timer = self.create_timer(1.0 / config.rate_hz, self._tick)
        self.get_logger().info(f'publishing on {config.image_topic} at {config.rate_hz} Hz')

    def _tick(self):
        """Publish the next frame of the pool with a fresh stamp."""
        if self.config.max_frames and self.published >= self.config.max_frames:
            return
        index = self.published % len(self.frames)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config.frame_id)
        image_msg, info_msg = self._messages[index]
        image_msg.header = header
        info_msg.header = header
        self._info_pub.publish(info_msg)
        self._image_pub.publish(image_msg)
        self._pose_pub.publish(ros_io.pose_to_pose_stamped(self.frames[index].pose, header))
        if self.config.max_frames:  # a finite run keeps them all; an endless one none
            self.published_stamps[ros_io.stamp_to_ns(header.stamp)] = index
        self.published += 1
        if self.published == 1:  # the period counts from the first frame: a host that spins
            self._timer.reset()  # late gets it overdue, and the next would otherwise come early


def main(args=None) -> int:
    """Run the simulated C-arm until SIGINT; return the exit status."""
    return ros_io.run_node(SimulatedCarm, args)


if __name__ == '__main__':
    sys.exit(main())
