"""X-ray files read from disk: DICOM with its detector geometry (real files, SimpleITK/GDCM)."""
import argparse

import numpy as np
import pytest
import SimpleITK as sitk

from xray_ct_reg import image_io
from xray_ct_reg.register import cli_intrinsics


def _write_dicom(path, pixels, spacing_xy=(0.3, 0.25), sdd='1100', tags=None):
    """A DICOM X-ray (XA) as GDCM writes it: ImagerPixelSpacing from the image spacing.

    ``tags``: further tags ('gggg|eeee' -> text), e.g. a run's frame times.
    """
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing(tuple(spacing_xy) + ((1.0,) if pixels.ndim == 3 else ()))
    image.SetMetaData('0008|0060', 'XA')
    if sdd is not None:
        image.SetMetaData(image_io.DICOM_SDD_TAG, sdd)
    for tag, text in (tags or {}).items():
        image.SetMetaData(tag, text)
    sitk.WriteImage(image, str(path))
    return path


def _cli_args(**flags):
    return argparse.Namespace(**{'intrinsics': None, 'sdd': None, 'pixel_spacing': None,
                                 **flags})


def test_a_dicom_xray_brings_its_detector_geometry(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (48, 64)).astype(np.uint16)
    path = _write_dicom(tmp_path / 'shot.dcm', pixels)
    np.testing.assert_array_equal(image_io.read_image(path), pixels)
    tags = image_io.read_detector_tags(path)
    assert tags.sdd_mm == 1100.0 and tags.pixel_spacing_mm == pytest.approx((0.3, 0.25))
    intrinsics, source = cli_intrinsics(_cli_args(), pixels, tags)  # non-square: fine
    assert source == ('SDD 1100 mm (DICOM DistanceSourceToDetector), pixel spacing 0.3 mm '
                      '(DICOM ImagerPixelSpacing)')
    np.testing.assert_allclose(intrinsics.K, [[1100 / 0.3, 0, 31.5], [0, 1100 / 0.25, 23.5],
                                              [0, 0, 1]])
    assert intrinsics.sdd_mm == 1100.0 and (intrinsics.width, intrinsics.height) == (64, 48)
    flagged, source = cli_intrinsics(_cli_args(sdd=1000.0, pixel_spacing=0.5), pixels, tags)
    assert '(--sdd)' in source and '(--pixel-spacing)' in source
    _, source = cli_intrinsics(_cli_args(), np.zeros((32, 32)))  # a PNG says nothing
    assert source.startswith('SDD 1020 mm (Cios Fusion default)') and 'resized' in source
    assert flagged.K[0, 0] == flagged.K[1, 1] == pytest.approx(2000.0)  # flags win
    assert image_io.read_detector_tags(tmp_path / 'shot.dcm') == tags
    png = tmp_path / 'shot.png'
    import cv2
    cv2.imwrite(str(png), pixels)
    assert image_io.read_detector_tags(png) == image_io.DetectorTags()  # none stated


def test_dicom_is_recognised_by_its_marker_and_monochrome1_is_inverted(tmp_path):
    """A file named without an extension (as PACS exports are); MONOCHROME1 shown as 2."""
    pixels = np.random.default_rng(1).integers(0, 60000, (32, 32)).astype(np.uint16)
    path = _write_dicom(tmp_path / 'shot.dcm', pixels)
    data = path.read_bytes()
    assert data.count(b'MONOCHROME2 ') == 1
    exported = tmp_path / 'IM0001'
    exported.write_bytes(data.replace(b'MONOCHROME2 ', b'MONOCHROME1 '))
    assert image_io.is_dicom(exported) and not image_io.is_dicom(_png(tmp_path))
    np.testing.assert_array_equal(image_io.read_image(exported), 65535 - pixels)


def _png(folder):
    import cv2
    path = folder / 'plain.png'
    cv2.imwrite(str(path), np.zeros((4, 4), np.uint8))
    return path


def test_a_fluoroscopy_run_needs_a_frame_and_bad_tags_are_named(tmp_path):
    run = np.stack([np.full((16, 24), value, np.uint16) for value in (10, 20, 30)])
    path = _write_dicom(tmp_path / 'run.dcm', run)
    with pytest.raises(ValueError, match='holds 3 frames'):
        image_io.read_image(path)
    np.testing.assert_array_equal(image_io.read_image(path, frame=2), run[2])
    with pytest.raises(ValueError, match='no frame 3'):
        image_io.read_image(path, frame=3)
    with pytest.raises(ValueError, match='multi-frame DICOM file only'):
        image_io.read_image(_png(tmp_path), frame=0)
    bad = _write_dicom(tmp_path / 'bad.dcm', run[0], sdd='-5')
    with pytest.raises(ValueError, match=r'\(0018,1110\).*not positive'):
        image_io.read_detector_tags(bad)
    missing = _write_dicom(tmp_path / 'nosdd.dcm', run[0], sdd=None)
    assert image_io.read_detector_tags(missing).sdd_mm is None
    broken = tmp_path / 'broken.dcm'
    broken.write_bytes(b'\0' * 128 + b'DICM' + b'\1' * 20)
    with pytest.raises(ValueError, match='could not read .* as DICOM'):
        image_io.read_image(broken)


def test_a_fluoroscopy_run_states_when_its_frames_were_taken(tmp_path):
    """FrameTimeVector (ms since the previous frame) wins over FrameTime (ms between frames)."""
    run = np.stack([np.full((16, 24), value, np.uint16) for value in (10, 20, 30)])
    vector, frame_time = image_io.DICOM_FRAME_TIME_VECTOR_TAG, image_io.DICOM_FRAME_TIME_TAG
    steady = _write_dicom(tmp_path / 'steady.dcm', run, tags={frame_time: '66.5'})
    assert image_io.read_frame_times(steady, 3) == pytest.approx([0.0, 0.0665, 0.133])
    uneven = _write_dicom(tmp_path / 'uneven.dcm', run,
                          tags={frame_time: '66.5', vector: '0\\100\\2500'})
    assert image_io.read_frame_times(uneven, 3) == pytest.approx([0.0, 0.1, 2.6])
    silent = _write_dicom(tmp_path / 'silent.dcm', run)
    assert image_io.read_frame_times(silent, 3) is None
    assert image_io.read_frame_times(_png(tmp_path), 1) is None
    short = _write_dicom(tmp_path / 'short.dcm', run, tags={vector: '0\\100'})
    with pytest.raises(ValueError, match='FrameTimeVector has 2 values for 3 frames'):
        image_io.read_frame_times(short, 3)
    backwards = _write_dicom(tmp_path / 'backwards.dcm', run, tags={vector: '0\\-5\\10'})
    with pytest.raises(ValueError, match=r'\(0018,1065\).*not zero or positive'):
        image_io.read_frame_times(backwards, 3)
    still = _write_dicom(tmp_path / 'still.dcm', run, tags={frame_time: '0'})
    with pytest.raises(ValueError, match=r'\(0018,1063\).*not positive'):
        image_io.read_frame_times(still, 3)
