"""rosbag2 record and replay with ``rosbags`` (pure Python; sqlite3 and mcap storage).

* ``xray-ct-reg bag-record-sim --out BAG -n N`` writes simulated C-arm frames: Image,
  CameraInfo and the true pose (PoseStamped, metres), all with the same stamp per frame.
* ``xray-ct-reg replay BAG`` registers every Image of a bag offline with the Registrar (or,
  with ``--through-node``, through the real ROS node in this process) and writes the results
  (pose, verdict, errors against the true pose when the bag has one) to JSON and, optionally,
  to a new bag with ``/tf`` and the pose messages of the accepted frames.

Messages are built and read with the same ``ros_io`` conversions as the node (rclpy's CDR
serialisation and the rosbags Jazzy typestore agree byte for byte).
"""
import json
from pathlib import Path
import sys
import time

import numpy as np

from xray_ct_reg import geometry, image_io, ros_io, settings, stream

IMAGE_TOPIC = '/carm/image_raw'
COMPRESSED_IMAGE_TOPIC = IMAGE_TOPIC + ros_io.IMAGE_TRANSPORTS['compressed'][1]
CAMERA_INFO_TOPIC = '/carm/camera_info'
TRUE_POSE_TOPIC = '/carm/true_pose'
POSE_TOPIC = '/xray_ct_reg_node/pose'
# image topic -> its image_transport (``ros_io.IMAGE_TRANSPORTS``)
IMAGE_TOPICS = {IMAGE_TOPIC: 'raw', COMPRESSED_IMAGE_TOPIC: 'compressed'}
TYPES = {
    IMAGE_TOPIC: 'sensor_msgs/msg/Image',
    COMPRESSED_IMAGE_TOPIC: 'sensor_msgs/msg/CompressedImage',
    CAMERA_INFO_TOPIC: 'sensor_msgs/msg/CameraInfo',
    TRUE_POSE_TOPIC: 'geometry_msgs/msg/PoseStamped',
    POSE_TOPIC: 'geometry_msgs/msg/PoseWithCovarianceStamped',
    '/tf': 'tf2_msgs/msg/TFMessage',
}


def _typestore():
    """The rosbags type store of ROS 2 Jazzy."""
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_JAZZY)


def _storage_plugin(name):
    """Rosbags StoragePlugin for 'sqlite3' or 'mcap'."""
    from rosbags.rosbag2 import StoragePlugin
    plugins = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
    if name not in plugins:
        raise ValueError(f'storage must be one of {sorted(plugins)}, got {name!r}')
    return plugins[name]


class BagWriter:
    """Write rclpy messages to a rosbag2 (Jazzy, version 9) with rosbags."""

    def __init__(self, path, storage='sqlite3'):
        """Open ``path`` (must not exist) for writing with ``storage`` (sqlite3 or mcap)."""
        from rosbags.rosbag2 import Writer
        self._typestore = _typestore()
        self._writer = Writer(Path(path), version=9, storage_plugin=_storage_plugin(storage))
        self._connections = {}

    def __enter__(self):
        """Open the bag."""
        self._writer.open()
        return self

    def __exit__(self, *exc):
        """Close the bag."""
        self._writer.close()

    def write(self, topic, msg, timestamp_ns):
        """Write an rclpy message (or a TransformStamped list for ``/tf``) at ``timestamp_ns``."""
        from rclpy.serialization import serialize_message
        msgtype = TYPES[topic]
        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self._typestore)
        if topic == '/tf':  # built in the typestore: tf2_msgs need not be importable
            transforms = [self._typestore.deserialize_cdr(
                bytes(serialize_message(t)), 'geometry_msgs/msg/TransformStamped') for t in msg]
            data = self._typestore.serialize_cdr(
                self._typestore.types[msgtype](transforms=transforms), msgtype)
        else:
            data = serialize_message(msg)
        self._writer.write(self._connections[topic], int(timestamp_ns), bytes(data))


def read_frames(path):
    """Read a bag: list of dicts, one per Image (raw or compressed) message, by stamp.

    Keys: ``stamp_ns``, ``frame_id``, ``image`` (the numpy image; None with ``error`` set when
    the Image message is bad), ``camera_info`` (the CameraInfo message with the same stamp, or
    None), ``true_pose`` (the 4x4 mm pose from ``/carm/true_pose`` with the same stamp, or
    None) and ``error``. Raises ValueError when ``path`` is not a readable rosbag2 (OSError
    when it does not exist).
    """
    from rosbags.rosbag2 import Reader, ReaderError
    typestore = _typestore()
    images, infos, truths = [], {}, {}
    try:
        with Reader(Path(path)) as reader:
            for connection, _, raw in reader.messages():
                if connection.topic not in (*IMAGE_TOPICS, CAMERA_INFO_TOPIC, TRUE_POSE_TOPIC):
                    continue
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                stamp = ros_io.stamp_to_ns(msg.header.stamp)
                if connection.topic in IMAGE_TOPICS:
                    images.append((IMAGE_TOPICS[connection.topic], msg))
                elif connection.topic == CAMERA_INFO_TOPIC:
                    infos[stamp] = msg
                else:
                    truths[stamp] = ros_io.transform_msg_to_pose(msg)
    except ReaderError as error:
        raise ValueError(f'{path} is not a readable rosbag2: {error}') from error
    frames = []
    for transport, msg in images:
        stamp = ros_io.stamp_to_ns(msg.header.stamp)
        frame = {'stamp_ns': stamp, 'frame_id': msg.header.frame_id, 'image': None,
                 'camera_info': infos.get(stamp), 'true_pose': truths.get(stamp), 'error': ''}
        try:
            frame['image'] = ros_io.IMAGE_TRANSPORTS[transport][2](msg)
        except ValueError as error:
            frame['error'] = f'bad image: {error}'
        frames.append(frame)
    return sorted(frames, key=lambda f: f['stamp_ns'])


# ----------------------------------------------------------------------------- record
def add_bag_record_sim_arguments(parser):
    """Arguments of ``xray-ct-reg bag-record-sim``."""
    from xray_ct_reg.sim_carm import MOTIONS
    parser.add_argument('--out', required=True, help='bag directory to create')
    parser.add_argument('-n', '--frames', type=int, default=10, help='number of frames')
    parser.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    parser.add_argument('--size', type=int, default=256, help='image size (px)')
    parser.add_argument('--encoding', choices=image_io.WRITE_ENCODINGS, default='mono16')
    parser.add_argument('--ct', default='example', help="CT to render ('example' = chest CT)")
    parser.add_argument('--seed', type=int, default=0, help='pose sampler and noise seed')
    parser.add_argument('--rate', type=float, default=10.0, help='frame rate of the stamps (Hz)')
    parser.add_argument('--motion', default='none', choices=MOTIONS,
                        help='none: random views; rotation or table_shift: a fluoroscopy '
                             'sequence (replay tracks it, as the node does)')


def record_sim(out, frames, storage='sqlite3', encoding='mono16', rate_hz=10.0, frame_id='carm',
               start_ns=None):
    """Write ``sim_carm.Frame`` objects to a new bag; return the stamps (ns) written."""
    from std_msgs.msg import Header
    start_ns = time.time_ns() if start_ns is None else int(start_ns)
    stamps = []
    with BagWriter(out, storage) as writer:
        for index, frame in enumerate(frames):
            stamp = start_ns + int(round(index * 1e9 / rate_hz))
            header = Header(frame_id=frame_id)
            header.stamp.sec, header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            writer.write(CAMERA_INFO_TOPIC,
                         ros_io.intrinsics_to_camera_info(frame.intrinsics, header), stamp)
            writer.write(IMAGE_TOPIC, ros_io.array_to_image_msg(frame.image, encoding, header),
                         stamp)
            writer.write(TRUE_POSE_TOPIC, ros_io.pose_to_pose_stamped(frame.pose, header), stamp)
            stamps.append(stamp)
    return stamps


def run_bag_record_sim(args):
    """Render ``-n`` simulated frames and write them to ``--out``."""
    from xray_ct_reg import ct, sim_carm
    try:
        patient = ct.load_patient(args.ct)
    except (ValueError, OSError) as error:  # CTError is a ValueError
        print(f'error: {error}', file=sys.stderr)
        return 2
    poses = sim_carm.sample_poses(patient, args.frames, args.seed, args.motion)
    frames = sim_carm.render_frames(patient, poses, args.size, args.size, args.encoding,
                                    args.seed)
    stamps = record_sim(args.out, frames, args.storage, args.encoding, args.rate)
    print(f'wrote {len(stamps)} frames ({args.size} px {args.encoding}, {args.storage}) '
          f'to {args.out}')
    return 0


# ----------------------------------------------------------------------------- replay
def add_replay_arguments(parser):
    """Arguments of ``xray-ct-reg replay``."""
    parser.add_argument('bag', help='rosbag2 directory with /carm/image_raw (+ camera_info)')
    parser.add_argument('--model', default=None,
                        help='checkpoint (default: the committed models/chest_example.pt)')
    parser.add_argument('--ct', default=None,
                        help="CT of the model ('example' = chest CT): checked against the "
                             'checkpoint and gives the targets for mTRE')
    parser.add_argument('--sdd-mm', type=float, default=geometry.CIOS_FUSION_SDD_MM,
                        help='source-to-detector distance for CameraInfo K (mm)')
    parser.add_argument('--out-json', default=None, help='write per-frame results here')
    parser.add_argument('--out-bag', default=None, help='write /tf and pose messages here')
    parser.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3',
                        help='storage of --out-bag')
    parser.add_argument('--through-node', action='store_true',
                        help='feed the frames through the ROS node (in this process) instead')
    parser.add_argument('--refine', action='store_true',
                        help='intensity refinement and its gates (needs --ct), as the node '
                             'config does')
    settings.add_params_file_argument(parser)


def _frame_intrinsics(frame, sdd_mm):
    """Intrinsics from the frame's CameraInfo (ValueError when missing or invalid)."""
    if frame['camera_info'] is None:
        raise ValueError('no CameraInfo with the image stamp')
    return ros_io.camera_info_to_intrinsics(frame['camera_info'], sdd_mm)


def register_offline(frames, registrar, sdd_mm=geometry.CIOS_FUSION_SDD_MM, tracking=None):
    """Run the Registrar on every frame; return (result dict or None, error str) per frame.

    As the node does, a frame starts from the last accepted pose of its ``frame_id`` while that
    is fresh by the stamps (``stream.tracking_start`` with ``tracking``, a ``stream.NodeConfig``;
    default: the node's defaults).
    """
    tracking = tracking or stream.NodeConfig()
    outcomes, last_accepted = [], {}  # frame_id -> (stamp ns, pose) of its last accepted frame
    for frame in frames:
        if frame['error']:
            outcomes.append((None, frame['error']))
            continue
        prior = stream.tracking_start(last_accepted.get(frame['frame_id']), frame['stamp_ns'],
                                      tracking)
        try:
            result = registrar.register(frame['image'], _frame_intrinsics(frame, sdd_mm),
                                        prior_pose=prior)
        except ValueError as error:
            outcomes.append((None, f'bad input: {error}'))
            continue
        if result.accepted:
            last_accepted[frame['frame_id']] = (frame['stamp_ns'], result.pose)
        outcomes.append((result.to_dict(), ''))
    return outcomes


def frame_record(index, frame, result, error, targets=None):
    """One JSON record: verdict, pose and errors against the true pose when known."""
    record = {'index': index, 'stamp_ns': frame['stamp_ns'], 'error': error,
              'accepted': bool(result and result['accepted']),
              'reason': error or (result['reason'] if result else ''),
              'pose': result['pose'] if result else None, 'result': result}
    truth = frame['true_pose']
    if truth is not None:
        record['true_pose'] = truth.tolist()
    if truth is not None and record['pose'] is not None:
        pose = np.asarray(record['pose'], dtype=float)
        record['translation_error_mm'] = geometry.translation_error_mm(pose, truth)
        record['rotation_error_deg'] = geometry.rotation_error_deg(pose, truth)
        if targets is not None:
            record['mtre_mm'] = geometry.mtre(pose, truth, targets)
    return record


def write_results_bag(path, frames, records, storage='sqlite3', ct_frame='ct'):
    """Bag with /tf and the pose (with covariance) of every accepted frame, + the true poses."""
    from std_msgs.msg import Header
    with BagWriter(path, storage) as writer:
        for frame, record in zip(frames, records, strict=True):
            stamp = frame['stamp_ns']
            header = Header(frame_id=frame['frame_id'])
            header.stamp.sec, header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            if frame['true_pose'] is not None:
                writer.write(TRUE_POSE_TOPIC,
                             ros_io.pose_to_pose_stamped(frame['true_pose'], header), stamp)
            if not record['accepted']:
                continue
            pose = np.asarray(record['pose'], dtype=float)
            covariance = record['result'].get('covariance') if record['result'] else None
            covariance = np.zeros((6, 6)) if covariance is None else np.asarray(
                covariance, dtype=float)
            writer.write('/tf', [ros_io.pose_to_transform_stamped(pose, header, ct_frame)],
                         stamp)
            writer.write(POSE_TOPIC, ros_io.pose_to_pose_with_covariance(pose, covariance,
                                                                         header), stamp)


def summarize_records(records):
    """Counts and error percentiles of a replay."""
    summary = {'frames': len(records), 'accepted': sum(r['accepted'] for r in records),
               'errors': sum(bool(r['error']) for r in records)}
    mtres = [r['mtre_mm'] for r in records if 'mtre_mm' in r and r['accepted']]
    if mtres:
        summary['mtre_mm'] = geometry.summarize_mtre(mtres)
    translation = [r['translation_error_mm'] for r in records
                   if 'translation_error_mm' in r and r['accepted']]
    if translation:
        summary['translation_error_mm'] = geometry.summarize(translation)
    return summary


def run_replay(args):
    """Replay a bag through the Registrar (or the node) and report per frame."""
    from xray_ct_reg import node as ros_node
    from xray_ct_reg.register import Registrar, cli_config
    model = args.model or ros_node.default_model_path()
    if not model:
        print('error: no model given and no committed models/chest_example.pt found',
              file=sys.stderr)
        return 2
    try:  # settings, CT, bag and checkpoint: a clear message, not a traceback
        config, ct_path, tracking = cli_config(args)
        if config.intensity_refine and not ct_path:
            raise ValueError('intensity refinement needs --ct (the CT the model was trained for)')
        patient = None
        if ct_path:
            from xray_ct_reg import ct
            patient = ct.load_patient(ct_path)
        frames = read_frames(args.bag)
        registrar = None if args.through_node else Registrar.from_checkpoint(
            model, patient=patient, config=config)
    except (ValueError, OSError) as error:  # CTError and CheckpointError are ValueErrors
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.through_node:
        from xray_ct_reg import demo
        outcomes = demo.register_through_node(frames, model, ct_path or '', args.sdd_mm,
                                              config=config, tracking=tracking)
    else:
        outcomes = register_offline(frames, registrar, args.sdd_mm, tracking)
    targets = patient.targets if patient is not None else None
    records = [frame_record(i, frame, result, error, targets)
               for i, (frame, (result, error)) in enumerate(zip(frames, outcomes, strict=True))]
    for record in records:
        errors = (f"  mTRE {record['mtre_mm']:.2f} mm" if 'mtre_mm' in record else '') + (
            f"  dt {record['translation_error_mm']:.2f} mm" if 'translation_error_mm' in record
            else '')
        verdict = 'accepted' if record['accepted'] else f"rejected: {record['reason']}"
        tracked = ' (tracked)' if (record['result'] or {}).get('tracked') else ''
        print(f"frame {record['index']:3d}  {verdict}{tracked}{errors}")
    summary = summarize_records(records)
    print(json.dumps(summary, indent=1))
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out_json, 'w') as handle:
            json.dump({'bag': str(args.bag), 'model': str(model),
                       'mode': 'node' if args.through_node else 'offline',
                       'frames': records, 'summary': summary}, handle, indent=1)
    if args.out_bag:
        write_results_bag(args.out_bag, frames, records, args.storage)
    return 0
