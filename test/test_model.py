"""Tests of the SCR network, its loss, input preparation and checkpoint I/O (tiny tensors)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xray_ct_reg import geometry
from xray_ct_reg import model as scr

CT_SHA = 'a' * 64


def _tiny_model(depth=2, width=4, seed=0):
    torch.manual_seed(seed)
    network = scr.SCRNet(1, width, depth)
    network.set_normalisation([10.0, -20.0, 30.0], 150.0)
    return network


def _smooth_image(size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, size // 8, size // 8, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode='bilinear', align_corners=False)


def _targets(size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    entry = torch.randn(2, size, size, 3, generator=generator) * 0.5
    exit_ = entry + 0.1
    bone = torch.zeros(2, size, size, dtype=torch.bool)
    bone[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    return entry, exit_, bone


# ----------------------------------------------------------------------------- loss
def test_one_step_lowers_the_loss():
    network = _tiny_model()
    image = _smooth_image(32).repeat(2, 1, 1, 1)
    entry, exit_, bone = _targets(32)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-4)
    before, _ = scr.scr_loss(network(image), entry, exit_, bone)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = scr.scr_loss(network(image), entry, exit_, bone)
    assert float(after) < float(before.detach())


@pytest.mark.parametrize('case', ['huge', 'nan_targets', 'all_background', 'extreme_sigma'])
def test_loss_is_finite_for_extreme_inputs(case):
    output = torch.zeros(2, 8, 16, 16, requires_grad=True)
    entry, exit_, bone = _targets(16)
    if case == 'huge':
        entry = entry * 1e30
        exit_ = torch.full_like(exit_, -float('inf'))
    elif case == 'nan_targets':
        entry = torch.where(bone[..., None], entry, torch.tensor(float('nan')))
        exit_ = torch.full_like(exit_, float('nan'))
    elif case == 'all_background':
        bone = torch.zeros_like(bone)
    raw = output
    if case == 'extreme_sigma':
        raw = output + torch.tensor([0, 0, 0, 1e6, 0, 0, 0, -1e6]).view(1, 8, 1, 1)
    elif case == 'huge':
        raw = output + 1e35
    loss, parts = scr.scr_loss(raw, entry, exit_, bone)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(np.isfinite(value) for value in parts.values())
    assert torch.all(torch.isfinite(output.grad))


def test_background_term_pushes_sigma_up():
    log_sigma = torch.zeros(1, 8, 8, 8)
    log_sigma[:, [3, 7]] = -3.0
    log_sigma.requires_grad_(True)
    entry, exit_, _ = _targets(8)
    loss, _ = scr.scr_loss(log_sigma, entry[:1], exit_[:1], torch.zeros(1, 8, 8, dtype=bool))
    loss.backward()
    assert torch.all(log_sigma.grad[:, [3, 7]] < 0)  # descent raises log sigma


def test_network_log_sigma_is_bounded_and_predict_denormalises():
    network = _tiny_model().eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(100.0)
        output = network(_smooth_image(32))
        prediction = network.predict(_smooth_image(32))
    assert output[:, [3, 7]].min() >= scr.LOG_SIGMA_MIN
    assert output[:, [3, 7]].max() <= scr.LOG_SIGMA_MAX
    expected = output[0, 0:3].permute(1, 2, 0) * 150.0 + torch.tensor([10.0, -20.0, 30.0])
    torch.testing.assert_close(prediction['entry_mm'][0], expected)
    torch.testing.assert_close(prediction['exit_log_sigma'][0], output[0, 7] + np.log(150.0))


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize('size', [64, 96, 128])
def test_fully_convolutional_sizes(size):
    network = scr.SCRNet(1, 4, 4).eval()
    with torch.no_grad():
        output = network(torch.rand(1, 1, size, size + 32))
    assert output.shape == (1, 8, size, size + 32)


def test_size_not_multiple_of_stride_is_refused():
    with pytest.raises(ValueError, match='multiple of 16'):
        scr.SCRNet(1, 4, 4)(torch.rand(1, 1, 100, 96))


def test_crop_of_input_gives_crop_of_output_away_from_borders():
    # ChannelNorm has no spatial statistics, so away from the zero-padded border (beyond the
    # receptive field of a depth-2 net, ~24 px) the crop is exact up to float rounding. With
    # GroupNorm the crop's statistics would change every output pixel.
    network = _tiny_model(depth=2, width=8).eval()
    image = _smooth_image(128)
    with torch.no_grad():
        full = network(image)
        crop = network(image[:, :, 32:96, 48:112])
    margin = 24
    expected = full[:, :, 32:96, 48:112][:, :, margin:-margin, margin:-margin]
    torch.testing.assert_close(crop[:, :, margin:-margin, margin:-margin], expected,
                               atol=1e-4, rtol=1e-4)


def test_count_flops_and_parameters():
    network = scr.SCRNet(1, 4, 2)
    small, large = scr.count_flops(network, 32), scr.count_flops(network, 64)
    assert large['macs'] == 4 * small['macs'] and small['flops'] == 2 * small['macs']
    stem = network.stem[0]
    assert small['macs'] > 32 * 32 * stem.out_channels * 9  # at least the stem conv
    assert scr.count_parameters(network) == sum(p.numel() for p in network.parameters())


# ----------------------------------------------------------------------------- input
@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize('inverted', [False, True])
def test_prepare_input_any_dtype_and_polarity(dtype, inverted):
    rng = np.random.default_rng(0)
    values = rng.uniform(0.1, 0.9, (40, 56))
    if inverted:
        values = 1.0 - values
    scale = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1000.0
    tensor = scr.prepare_input((values * scale).astype(dtype))
    assert tensor.shape == (1, 1, 40, 56) and tensor.dtype == torch.float32
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0
    assert scr.prepare_input(values, size=(32, 16)).shape == (1, 1, 16, 32)


@pytest.mark.parametrize('bad, message', [
    (np.full((8, 8), np.nan), 'NaN or infinite'),
    (np.where(np.eye(8) > 0, np.inf, 1.0), 'NaN or infinite'),
    (np.full((8, 8), 7.0), 'no contrast'),
    (np.zeros((0, 8)), 'expected a 2D'),
    (np.zeros((2, 3, 4, 5)), 'expected a 2D'),
])
def test_prepare_input_refuses_bad_images(bad, message):
    with pytest.raises(ValueError, match=message):
        scr.prepare_input(bad)


def test_resize_for_network_keeps_projection_consistent():
    intrinsics = geometry.default_intrinsics(512)
    image = np.random.default_rng(0).uniform(size=(512, 512)).astype(np.float32)
    resized, small = scr.resize_for_network(image, intrinsics, 128)
    assert resized.shape == (128, 128) and (small.width, small.height) == (128, 128)
    pose = geometry.carm_pose([0.0, 0.0, 0.0], lao_deg=15.0)
    point = np.array([[20.0, -30.0, 10.0]])
    big_px, _ = geometry.project_points(pose, intrinsics.K, point)
    small_px, _ = geometry.project_points(pose, small.K, point)
    np.testing.assert_allclose(small_px, (big_px + 0.5) / 4.0 - 0.5)
    with pytest.raises(ValueError, match='intrinsics are for'):
        scr.resize_for_network(image[:256], intrinsics, 128)


# ----------------------------------------------------------------------------- checkpoints
def _saved(tmp_path, name='model.pt', sha=CT_SHA):
    network = _tiny_model()
    path = scr.save_checkpoint(tmp_path / name, network, {'ct_sha256': sha, 'image_size': [32]})
    return network, path


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    network, path = _saved(tmp_path)
    loaded, metadata = scr.load_checkpoint(path, expected_ct_sha256=CT_SHA)
    with torch.no_grad():  # the file holds fp16 weights: compare with the fp16-rounded model
        for parameter in network.parameters():
            parameter.copy_(parameter.half().float())
    image = _smooth_image(32)
    network.eval()
    torch.testing.assert_close(loaded.predict(image), network.predict(image), rtol=0, atol=0)
    assert metadata['architecture'] == {'in_channels': 1, 'base_width': 4, 'depth': 2}
    assert metadata['normalisation']['bone_radius_mm'] == 150.0
    assert metadata['code_version'].startswith('0.') and 'created' in metadata
    payload = torch.load(path, weights_only=True)
    assert payload['format'] == scr.CHECKPOINT_FORMAT
    assert payload['state_dict']['stem.0.weight'].dtype == torch.float16
    assert payload['state_dict']['bone_centroid'].dtype == torch.float32
    assert not list(tmp_path.glob('.*tmp'))  # atomic write left no temporary file


def test_tampered_checkpoint_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(scr.CheckpointError):
        scr.load_checkpoint(path)


def test_non_torch_and_missing_files_are_refused(tmp_path):
    text = tmp_path / 'notes.pt'
    text.write_text('this is not a checkpoint\n')
    with pytest.raises(scr.CheckpointError, match='not a readable torch checkpoint|safely'):
        scr.load_checkpoint(text)
    with pytest.raises(scr.CheckpointError, match='not found'):
        scr.load_checkpoint(tmp_path / 'missing.pt')
    truncated = tmp_path / 'truncated.pt'
    _, path = _saved(tmp_path)
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(scr.CheckpointError):
        scr.load_checkpoint(truncated)


def test_wrong_format_missing_keys_and_misfit_weights_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    wrong = dict(payload, format='someone.else/3')
    torch.save(wrong, tmp_path / 'wrong.pt')
    with pytest.raises(scr.CheckpointError, match='format'):
        scr.load_checkpoint(tmp_path / 'wrong.pt')
    torch.save({'format': scr.CHECKPOINT_FORMAT}, tmp_path / 'empty.pt')
    with pytest.raises(scr.CheckpointError, match='lacks'):
        scr.load_checkpoint(tmp_path / 'empty.pt')
    misfit = dict(payload, metadata=dict(payload['metadata'],
                                         architecture={'in_channels': 1, 'base_width': 8,
                                                       'depth': 2}))
    torch.save(misfit, tmp_path / 'misfit.pt')
    with pytest.raises(scr.CheckpointError, match='do not fit'):
        scr.load_checkpoint(tmp_path / 'misfit.pt')
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    with pytest.raises(scr.CheckpointError, match='expected a checkpoint dict'):
        scr.load_checkpoint(tmp_path / 'list.pt')


def test_checkpoint_for_another_ct_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    other = 'b' * 64
    with pytest.raises(scr.CheckpointError, match='another CT') as error:
        scr.load_checkpoint(path, expected_ct_sha256=other)
    assert CT_SHA in str(error.value) and other in str(error.value)
    assert isinstance(error.value, ValueError)
