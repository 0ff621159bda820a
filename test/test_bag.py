"""rosbag2 record (sqlite3, mcap) and offline replay against the Registrar run directly."""
import argparse
import json

from conftest import REPO
import numpy as np
import pytest
from std_msgs.msg import Header

from xray_ct_reg import bag, geometry, ros_io

MODEL = REPO / 'models' / 'chest_example.pt'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """The committed model, or an untrained network of the example CT (same code path)."""
    if MODEL.is_file():
        return MODEL
    from xray_ct_reg import ct, model
    patient = ct.load_patient('example')
    network = model.SCRNet()
    network.set_normalisation(patient.bone_centroid, patient.bone_radius)
    path = tmp_path_factory.mktemp('models') / 'untrained.pt'
    model.save_checkpoint(path, network, {'ct_sha256': patient.ct_sha256, 'image_size': 128})
    return path


def _parse(add_arguments, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_record_and_replay_offline(tmp_path, storage, checkpoint):
    from xray_ct_reg.register import Registrar
    recorded = tmp_path / f'sim_{storage}'
    args = _parse(bag.add_bag_record_sim_arguments,
                  ['--out', str(recorded), '-n', '2', '--storage', storage, '--size', '128'])
    assert bag.run_bag_record_sim(args) == 0
    frames = bag.read_frames(recorded)
    assert len(frames) == 2
    for frame in frames:
        assert frame['image'].dtype == np.uint16 and frame['image'].shape == (128, 128)
        assert frame['camera_info'] is not None and frame['true_pose'] is not None
        assert geometry.is_rigid(frame['true_pose'], tolerance=1e-6)

    out_json, out_bag = tmp_path / 'replay.json', tmp_path / 'replay_bag'
    args = _parse(bag.add_replay_arguments,
                  [str(recorded), '--model', str(checkpoint), '--out-json', str(out_json),
                   '--out-bag', str(out_bag), '--storage', storage])
    assert bag.run_replay(args) == 0
    report = json.loads(out_json.read_text())
    assert report['mode'] == 'offline' and len(report['frames']) == 2

    registrar = Registrar.from_checkpoint(checkpoint)
    for record, frame in zip(report['frames'], frames, strict=True):
        intrinsics = geometry.Intrinsics.from_camera_info(
            frame['camera_info'].k, frame['camera_info'].width, frame['camera_info'].height)
        direct = registrar.register(frame['image'], intrinsics).to_dict()
        assert record['accepted'] == direct['accepted']
        assert record['reason'] == direct['reason']
        assert record['stamp_ns'] == frame['stamp_ns']
        if direct['pose'] is None:
            assert record['pose'] is None
        else:
            np.testing.assert_allclose(record['pose'], direct['pose'], atol=1e-9)
            assert 'translation_error_mm' in record
    tf_written = bag.read_frames(out_bag)  # results bag carries no images
    assert tf_written == []
    accepted = sum(r['accepted'] for r in report['frames'])
    from rosbags.rosbag2 import Reader
    with Reader(out_bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts.get('/tf', 0) == accepted and counts.get(bag.TRUE_POSE_TOPIC) == 2


def test_replay_reports_bad_inputs_without_a_traceback(tmp_path, checkpoint, capsys):
    """A missing or broken bag, CT or checkpoint: exit status 2 and one clear line, no output."""
    garbage = tmp_path / 'garbage'
    garbage.mkdir()
    (garbage / 'metadata.yaml').write_text('rosbag2_bagfile_information: [')
    broken_model = tmp_path / 'broken.pt'
    broken_model.write_bytes(b'not a checkpoint')
    out_json = tmp_path / 'out.json'
    cases = (([str(tmp_path / 'missing')], 'does not exist'),
             ([str(garbage)], 'not a readable rosbag2'),
             ([str(garbage), '--ct', str(tmp_path / 'no_ct.nii.gz')], 'no_ct'),
             ([str(garbage), '--refine'], 'needs --ct'))
    for argv, message in cases:
        args = _parse(bag.add_replay_arguments,
                      argv + ['--model', str(checkpoint), '--out-json', str(out_json)])
        assert bag.run_replay(args) == 2, argv
        assert message in capsys.readouterr().err, argv
    recorded = tmp_path / 'sim'
    assert bag.run_bag_record_sim(_parse(bag.add_bag_record_sim_arguments,
                                         ['--out', str(recorded), '-n', '1', '--size', '64'])) == 0
    args = _parse(bag.add_replay_arguments, [str(recorded), '--model', str(broken_model)])
    assert bag.run_replay(args) == 2
    assert 'error:' in capsys.readouterr().err
    assert not out_json.exists()
    args = _parse(bag.add_bag_record_sim_arguments,
                  ['--out', str(tmp_path / 'never'), '--ct', str(tmp_path / 'no_ct.nii.gz')])
    assert bag.run_bag_record_sim(args) == 2 and not (tmp_path / 'never').exists()


def test_offline_replay_tracks_a_recorded_sequence_as_the_node_does(tmp_path, capsys):
    """A recorded C-arm orbit, replayed offline, is tracked by the node's rule and settings.

    At 0.1 s a frame, each frame after the first starts from the last accepted pose; a parameter
    file that turns tracking off registers every frame the whole way.
    """
    if not MODEL.is_file():
        pytest.skip(f'committed model {MODEL} does not exist yet')
    recorded = tmp_path / 'orbit'
    assert bag.run_bag_record_sim(_parse(
        bag.add_bag_record_sim_arguments,
        ['--out', str(recorded), '-n', '3', '--size', '128', '--motion', 'rotation'])) == 0
    frames = bag.read_frames(recorded)
    assert np.diff([frame['stamp_ns'] for frame in frames]).tolist() == [100_000_000] * 2
    params = tmp_path / 'no_tracking.yaml'
    params.write_text('/**:\n  ros__parameters:\n    tracking: false\n')
    for extra, tracked in (([], [False, True, True]),
                           (['--params-file', str(params)], [False, False, False])):
        out_json = tmp_path / 'replay.json'
        assert bag.run_replay(_parse(bag.add_replay_arguments,
                                     [str(recorded), '--model', str(MODEL), '--ct', 'example',
                                      '--refine', '--out-json', str(out_json)] + extra)) == 0
        records = json.loads(out_json.read_text())['frames']
        assert [record['result']['tracked'] for record in records] == tracked
        assert capsys.readouterr().out.count('accepted (tracked)') == sum(tracked)
        assert all(record['accepted'] and record['mtre_mm'] < 2.0 for record in records)


def test_replay_through_the_node_judges_every_frame_and_shuts_down_cleanly(tmp_path, checkpoint,
                                                                            capsys):
    """The real node in this process: a verdict per frame as offline, and a clean shutdown.

    A callback still running on the executor when the nodes are destroyed makes rclpy print
    'The following exception was never retrieved' once its task is collected.
    """
    import gc
    recorded = tmp_path / 'sim'
    assert bag.run_bag_record_sim(_parse(bag.add_bag_record_sim_arguments,
                                         ['--out', str(recorded), '-n', '3', '--size', '64'])) == 0
    reports = {}
    for mode in ('offline', 'node'):
        out_json = tmp_path / f'{mode}.json'
        argv = [str(recorded), '--model', str(checkpoint), '--out-json', str(out_json)]
        assert bag.run_replay(_parse(bag.add_replay_arguments,
                                     argv + (['--through-node'] if mode == 'node' else []))) == 0
        reports[mode] = json.loads(out_json.read_text())
    gc.collect()
    assert 'never retrieved' not in capsys.readouterr().err
    assert reports['node']['mode'] == 'node' and len(reports['node']['frames']) == 3
    for through_node, offline in zip(reports['node']['frames'], reports['offline']['frames'],
                                     strict=True):
        assert through_node['stamp_ns'] == offline['stamp_ns']
        assert through_node['reason'] == offline['reason']


def test_compressed_frames_in_a_bag_read_as_the_raw_ones(tmp_path):
    """image_transport's compressed topic (PNG) gives the same 16-bit frames as the raw one."""
    recorded = tmp_path / 'raw'
    assert bag.run_bag_record_sim(_parse(bag.add_bag_record_sim_arguments,
                                         ['--out', str(recorded), '-n', '2', '--size', '64'])) == 0
    raw_frames = bag.read_frames(recorded)
    compressed = tmp_path / 'compressed'
    with bag.BagWriter(compressed) as writer:
        for frame in raw_frames:
            header = Header(frame_id=frame['frame_id'])
            header.stamp.sec, header.stamp.nanosec = divmod(frame['stamp_ns'], 1_000_000_000)
            writer.write(bag.COMPRESSED_IMAGE_TOPIC,
                         ros_io.array_to_compressed_image_msg(frame['image'], header),
                         frame['stamp_ns'])
            info = frame['camera_info']
            writer.write(bag.CAMERA_INFO_TOPIC, ros_io.intrinsics_to_camera_info(
                geometry.Intrinsics.from_camera_info(info.k, info.width, info.height), header),
                frame['stamp_ns'])
    frames = bag.read_frames(compressed)
    assert [f['stamp_ns'] for f in frames] == [f['stamp_ns'] for f in raw_frames]
    for frame, raw in zip(frames, raw_frames, strict=True):
        assert frame['image'].dtype == np.uint16 and not frame['error']
        np.testing.assert_array_equal(frame['image'], raw['image'])
        assert list(frame['camera_info'].k) == list(raw['camera_info'].k)
