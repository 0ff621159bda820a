"""The ROS boundary: image encodings, CameraInfo, and mm <-> metres pose conversion."""
import array
import os

from geometry_msgs.msg import TransformStamped
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import Header

from xray_ct_reg import geometry, ros_io

RNG = np.random.default_rng(0)
SAMPLES = {
    'mono8': RNG.integers(0, 256, (5, 7)).astype(np.uint8),
    '8UC1': RNG.integers(0, 256, (5, 7)).astype(np.uint8),
    'mono16': RNG.integers(0, 65536, (5, 7)).astype(np.uint16),
    '16UC1': RNG.integers(0, 65536, (5, 7)).astype(np.uint16),
    '32FC1': RNG.normal(size=(5, 7)).astype(np.float32),
}


def _raw_image(image, encoding, bigendian=False, padding=0):
    """Build an Image message by hand (independent of array_to_image_msg)."""
    order = '>' if bigendian else '<'
    rows = image.astype(image.dtype.newbyteorder(order)).tobytes()
    row_bytes = image[0].nbytes
    data = b''.join(rows[i * row_bytes:(i + 1) * row_bytes] + b'\xAB' * padding
                    for i in range(image.shape[0]))
    msg = Image(height=image.shape[0], width=image.shape[1], encoding=encoding,
                is_bigendian=int(bigendian), step=row_bytes + padding)
    msg.data = array.array('B', data)
    return msg


@pytest.mark.parametrize('encoding', sorted(SAMPLES))
def test_round_trip(encoding):
    image = SAMPLES[encoding]
    header = Header(frame_id='carm')
    msg = ros_io.array_to_image_msg(image, encoding, header)
    assert msg.header.frame_id == 'carm' and msg.encoding == encoding
    out = ros_io.image_to_array(msg)
    assert out.dtype == image.dtype and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('encoding', ['mono16', '32FC1', 'mono8'])
@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('padding', [0, 6])
def test_big_endian_and_padded_step(encoding, bigendian, padding):
    image = SAMPLES[encoding]
    out = ros_io.image_to_array(_raw_image(image, encoding, bigendian, padding))
    np.testing.assert_array_equal(out, image)
    assert out.dtype == image.dtype


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'rgb16', 'bgr16',
                                      'rgba16', 'bgra16'])
@pytest.mark.parametrize('bigendian', [False, True])
def test_colour_frames_are_read_as_their_luminance(encoding, bigendian):
    """A frame grabber's colour copy of a grey X-ray gives back the grey image, any alpha."""
    dtype = np.uint16 if encoding.endswith('16') else np.uint8
    grey = RNG.integers(0, np.iinfo(dtype).max + 1, (5, 7)).astype(dtype)
    channels = [grey] * 3 + ([RNG.integers(0, 200, (5, 7)).astype(dtype)]
                             if 'a' in encoding else [])
    out = ros_io.image_to_array(_raw_image(np.stack(channels, axis=-1), encoding, bigendian, 4))
    assert out.dtype == dtype and out.shape == grey.shape
    np.testing.assert_array_equal(out, grey)
    red = np.zeros((5, 7, 3), dtype)
    red[..., 0 if encoding.startswith('rgb') else 2] = np.iinfo(dtype).max  # pure red
    luminance = ros_io.image_to_array(_raw_image(red, encoding.replace('a', '')))  # no alpha
    np.testing.assert_allclose(luminance, 0.299 * np.iinfo(dtype).max, rtol=0.01)


def test_colour_image_files_are_read_as_their_luminance(tmp_path):
    """A colour PNG (OpenCV's BGR or BGRA order) reads as the message of the same frame."""
    import cv2

    from xray_ct_reg import image_io
    frame = RNG.integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    for channels, encoding in ((3, 'bgr16'), (4, 'bgra16')):
        path = tmp_path / f'colour{channels}.png'
        cv2.imwrite(str(path), frame[..., :channels])
        from_file = image_io.read_image(path)
        assert from_file.shape == (5, 7) and from_file.dtype == np.uint16
        np.testing.assert_array_equal(
            from_file, ros_io.image_to_array(_raw_image(frame[..., :channels], encoding)))


@pytest.mark.parametrize('mutate, match', [
    (lambda m: setattr(m, 'encoding', 'yuv422'), 'unsupported image encoding'),
    (lambda m: setattr(m, 'encoding', 'rgb16'), 'step'),  # 2 bytes a pixel are not 6
    (lambda m: setattr(m, 'encoding', ''), 'unsupported image encoding'),
    (lambda m: setattr(m, 'height', 0), 'empty image'),
    (lambda m: setattr(m, 'step', 3), 'step'),
    (lambda m: setattr(m, 'data', array.array('B', b'\0' * 10)), 'bytes, expected'),
    (lambda m: setattr(m, 'height', 6), 'bytes, expected'),
])
def test_bad_images_raise(mutate, match):
    msg = _raw_image(SAMPLES['mono16'], 'mono16')
    mutate(msg)
    with pytest.raises(ValueError, match=match):
        ros_io.image_to_array(msg)


def test_array_to_image_msg_rejects_bad_input():
    with pytest.raises(ValueError, match='unsupported'):
        ros_io.array_to_image_msg(np.zeros((3, 3)), 'yuv422')
    with pytest.raises(ValueError, match='2D'):
        ros_io.array_to_image_msg(np.zeros((3, 3, 3)), 'mono8')
    with pytest.raises(ValueError, match='empty'):
        ros_io.array_to_image_msg(np.zeros((0, 3)), 'mono8')
    bgr = ros_io.array_to_image_msg(np.full((2, 3, 3), 7, np.uint8), 'bgr8')
    assert bgr.step == 9 and len(bgr.data) == 18


def test_camera_info_round_trip():
    intrinsics = geometry.default_intrinsics(256)
    msg = ros_io.intrinsics_to_camera_info(intrinsics, Header(frame_id='carm'))
    assert msg.width == 256 and msg.height == 256 and msg.header.frame_id == 'carm'
    assert msg.p[0] == pytest.approx(intrinsics.K[0, 0]) and msg.p[3] == 0.0
    back = ros_io.camera_info_to_intrinsics(msg, intrinsics.sdd_mm)
    assert back.equals(intrinsics)
    assert back.pixel_spacing_mm == pytest.approx(0.194 * 1536 / 256)


@pytest.mark.parametrize('k', [[0.0] * 9, [float('nan')] + [0.0] * 8,
                               [-5.0, 0, 10, 0, 5.0, 10, 0, 0, 1]])
def test_camera_info_bad_k_raises(k):
    msg = CameraInfo(width=10, height=10)
    msg.k = k
    with pytest.raises(ValueError, match='invalid CameraInfo K'):
        ros_io.camera_info_to_intrinsics(msg, 1020.0)


def test_camera_info_distortion_raises():
    """A distorted image is refused, not registered as a pinhole image."""
    msg = ros_io.intrinsics_to_camera_info(geometry.default_intrinsics(64))
    msg.d = [-0.4, 0.2, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match='distortion'):
        ros_io.camera_info_to_intrinsics(msg, 1020.0)


@pytest.mark.parametrize('binning', [(0, 0), (1, 1), (2, 2), (4, 2)])
def test_camera_info_roi_and_binning_give_the_image_its_true_geometry(binning):
    """The image of a ROI binned b x b is the detector's pixels averaged in b x b blocks.

    CT points project into it where the averaged full-detector image shows them: at
    ((u - x0 + 0.5) / b - 0.5, ...) for a full-detector pixel (u, v).
    """
    detector = geometry.default_intrinsics(256)
    msg = ros_io.intrinsics_to_camera_info(detector)
    msg.roi = RegionOfInterest(x_offset=40, y_offset=24, width=128, height=96)
    msg.binning_x, msg.binning_y = binning
    intrinsics = ros_io.camera_info_to_intrinsics(msg, detector.sdd_mm)
    bx, by = max(binning[0], 1), max(binning[1], 1)
    assert (intrinsics.width, intrinsics.height) == (128 // bx, 96 // by)
    assert intrinsics.pixel_spacing_mm == pytest.approx(detector.pixel_spacing_mm * bx)
    points = np.random.default_rng(0).uniform(-80.0, 80.0, (50, 3))
    pose = _example_pose()
    full_pixels, _ = geometry.project_points(pose, detector.K, points)
    pixels, _ = geometry.project_points(pose, intrinsics.K, points)
    expected = (full_pixels - [40.0, 24.0] + 0.5) / [bx, by] - 0.5
    np.testing.assert_allclose(pixels, expected, atol=1e-9)


@pytest.mark.parametrize('roi, binning, fragment', [
    (RegionOfInterest(x_offset=200, y_offset=0, width=64, height=64), (1, 1), 'within'),
    (RegionOfInterest(x_offset=0, y_offset=0, width=0, height=64), (1, 1), 'within'),
    (RegionOfInterest(x_offset=8, y_offset=8, width=63, height=64), (2, 2), 'divisible')])
def test_camera_info_impossible_roi_or_binning_raises(roi, binning, fragment):
    msg = ros_io.intrinsics_to_camera_info(geometry.default_intrinsics(256))
    msg.roi = roi
    msg.binning_x, msg.binning_y = binning
    with pytest.raises(ValueError, match=fragment):
        ros_io.camera_info_to_intrinsics(msg, 1020.0)


def test_camera_info_bad_size_raises():
    msg = ros_io.intrinsics_to_camera_info(geometry.default_intrinsics(64))
    msg.width = 0
    with pytest.raises(ValueError, match='size'):
        ros_io.camera_info_to_intrinsics(msg, 1020.0)


def _example_pose():
    return geometry.carm_pose([10.0, -200.0, 35.0], lao_deg=25.0, cranial_deg=-10.0,
                              inplane_deg=4.0, offset_mm=(3.0, -7.0, 11.0))


def test_transform_is_in_metres_and_round_trips():
    pose = _example_pose()
    header = Header(frame_id='carm')
    msg = ros_io.pose_to_transform_stamped(pose, header, 'ct')
    assert isinstance(msg, TransformStamped)
    assert msg.header.frame_id == 'carm' and msg.child_frame_id == 'ct'
    t = msg.transform.translation
    np.testing.assert_allclose([t.x, t.y, t.z], pose[:3, 3] / 1000.0)
    np.testing.assert_allclose(ros_io.transform_msg_to_pose(msg), pose, atol=1e-9)
    stamped = ros_io.pose_to_pose_stamped(pose, header)
    np.testing.assert_allclose(stamped.pose.position.x, pose[0, 3] / 1000.0)
    np.testing.assert_allclose(ros_io.transform_msg_to_pose(stamped), pose, atol=1e-9)


def test_pose_with_covariance_converts_translation_blocks():
    pose = _example_pose()
    a = RNG.normal(size=(6, 6))
    covariance = a @ a.T
    msg = ros_io.pose_to_pose_with_covariance(pose, covariance, Header(frame_id='carm'))
    out = np.array(msg.pose.covariance).reshape(6, 6)
    np.testing.assert_allclose(out[:3, :3], covariance[:3, :3] * 1e-6)
    np.testing.assert_allclose(out[:3, 3:], covariance[:3, 3:] * 1e-3)
    np.testing.assert_allclose(out[3:, :3], covariance[3:, :3] * 1e-3)
    np.testing.assert_allclose(out[3:, 3:], covariance[3:, 3:])
    np.testing.assert_allclose(ros_io.transform_msg_to_pose(msg), pose, atol=1e-9)


def test_transform_msg_to_pose_rejects_other_messages():
    with pytest.raises(ValueError, match='not a transform'):
        ros_io.transform_msg_to_pose(Header())


def test_stamp_to_ns():
    header = Header()
    header.stamp.sec, header.stamp.nanosec = 3, 5
    assert ros_io.stamp_to_ns(header.stamp) == 3_000_000_005


def test_tf_publisher_uses_tf2_qos(rclpy_context):
    from rclpy.node import Node
    node = Node('tf_qos_probe', context=rclpy_context)
    try:
        broadcaster = ros_io.make_tf_publisher(node)
        assert broadcaster.pub_tf.topic_name == '/tf'
        assert broadcaster.pub_tf.qos_profile.depth == 100
        broadcaster.sendTransform(ros_io.pose_to_transform_stamped(
            _example_pose(), Header(frame_id='carm'), 'ct'))
        ros_io.destroy_tf_publisher(node, broadcaster)
    finally:
        node.destroy_node()


def test_transport_profile_is_selected_for_both_fast_dds_generations(monkeypatch):
    """Unset: both variables name the package's profile; a user's choice stands."""
    for name in ros_io.PROFILE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv('RMW_IMPLEMENTATION', raising=False)
    profile = ros_io.select_transport_profile()
    assert profile.endswith('fastdds_profile.xml')
    assert all(os.environ[name] == profile for name in ros_io.PROFILE_VARIABLES)
    monkeypatch.delenv(ros_io.PROFILE_VARIABLES[0])
    monkeypatch.setenv(ros_io.PROFILE_VARIABLES[1], '/mine.xml')
    assert ros_io.select_transport_profile() == ''
    assert os.environ[ros_io.PROFILE_VARIABLES[1]] == '/mine.xml'


def test_a_binned_roi_readout_looks_like_a_drr_with_its_camera_info_geometry():
    """Image content, not only K: a binned ROI lines up with a DRR of its CameraInfo geometry.

    A 2 x 2 binned ROI of a rendered detector image, against a DRR rendered with the intrinsics
    its CameraInfo gives: to a tenth of a pixel (image_geometry's cx / b is 0.14-0.21 px off).
    """
    import cv2

    from xray_ct_reg import ct, drr, example_data
    projector = drr.DRRProjector(ct.load_ct(example_data.example_dir() / example_data.CT_FILE),
                                 voxel_mm=2.0, step_mm=1.0)
    pose = geometry.carm_pose([0.0, 0.0, 0.0], lao_deg=20.0, cranial_deg=5.0)
    detector = geometry.default_intrinsics(256)
    x0, y0, width, height = 48, 32, 160, 192
    full = projector.render(pose, detector)
    readout = cv2.resize(full[y0:y0 + height, x0:x0 + width], (width // 2, height // 2),
                         interpolation=cv2.INTER_AREA)  # 2 x 2 block means
    msg = ros_io.intrinsics_to_camera_info(detector)
    msg.roi = RegionOfInterest(x_offset=x0, y_offset=y0, width=width, height=height)
    msg.binning_x = msg.binning_y = 2
    rendered = projector.render(pose, ros_io.camera_info_to_intrinsics(msg, detector.sdd_mm))
    assert rendered.shape == readout.shape == (height // 2, width // 2)
    (shift_x, shift_y), _ = cv2.phaseCorrelate(readout.astype(np.float64),
                                               rendered.astype(np.float64))
    assert abs(shift_x) < 0.1 and abs(shift_y) < 0.1, (shift_x, shift_y)
    assert np.corrcoef(readout.ravel(), rendered.ravel())[0, 1] > 0.99


def test_compressed_images_decode_as_image_transport_sends_them():
    """PNG keeps 16 bit exactly; JPEG colour becomes its luminance; bad data is named."""
    import cv2
    from sensor_msgs.msg import CompressedImage
    image = SAMPLES['mono16']
    msg = ros_io.array_to_compressed_image_msg(image, Header(frame_id='carm'))
    assert msg.format == 'mono16; png compressed ' and msg.header.frame_id == 'carm'
    decoded = ros_io.compressed_image_to_array(msg)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, image)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 2] = 200  # red in OpenCV's BGR
    jpeg = CompressedImage(format='bgr8; jpeg compressed bgr8')
    jpeg.data = array.array('B', cv2.imencode('.jpg', colour)[1].tobytes())
    grey = ros_io.compressed_image_to_array(jpeg)
    assert grey.shape == (8, 8) and abs(int(grey.mean()) - round(0.299 * 200)) <= 2
    for data, fmt, match in ((b'', 'png', 'empty'), (b'not a png', 'png', 'could not decode'),
                             (b'\0' * 12, '16UC1; compressedDepth png', 'compressedDepth')):
        bad = CompressedImage(format=fmt)
        bad.data = array.array('B', data)
        with pytest.raises(ValueError, match=match):
            ros_io.compressed_image_to_array(bad)
    with pytest.raises(ValueError, match='PNG needs'):
        ros_io.array_to_compressed_image_msg(np.zeros((4, 4), np.float32))


def test_overrides_the_node_never_declared_are_found(rclpy_context, tmp_path):
    """--params-file entries that apply to the node (by rcl's key rules) and -p, not declared."""
    from rclpy.node import Node
    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n    everywhere: 1\n'
                      'probe:\n  ros__parameters:\n    declared: 2\n    min_nc: 0.9\n'
                      '    nested: {deeper: 3}\n'
                      '/ns/*:\n  ros__parameters:\n    elsewhere: 4\n'
                      'other:\n  ros__parameters:\n    not_mine: 5\n')
    node = Node('probe', context=rclpy_context)
    try:
        node.declare_parameter('declared', 0)
        args = ['prog', '-p', 'outside:=1', '--ros-args', '--params-file', str(params),
                '-p', 'typo:=1', '-p', 'declared:=3', '--', '-p', 'not_ros:=1']
        assert ros_io.undeclared_overrides(node, args) == ['everywhere', 'min_nc',
                                                           'nested.deeper', 'typo']
        assert ros_io.undeclared_overrides(node, ['prog']) == []
    finally:
        node.destroy_node()
