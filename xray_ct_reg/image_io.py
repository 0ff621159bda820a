"""Reading X-ray images and intrinsics from files, and the one table of image encodings.

Kept apart from the algorithms: ``register`` works on arrays and ``geometry.Intrinsics``;
this module turns files (and ROS encoding names) into them.

``IMAGE_ENCODINGS`` is the single list of the sensor_msgs/Image encodings a C-arm uses that the
project reads and writes: ``ros_io`` converts messages with it, ``sim_carm`` and ``bag`` write
with it, and the node's parameter description names it. ``COLOUR_ENCODINGS`` are read too, as
their luminance (a frame grabber's copy of the C-arm's monitor arrives in colour).
"""
from dataclasses import dataclass
import json
from pathlib import Path

import numpy as np

from xray_ct_reg import geometry

# ROS encoding -> (numpy dtype, value of full scale: a [0, 1] image is multiplied by it)
IMAGE_ENCODINGS = {
    'mono8': (np.uint8, 255.0),
    '8UC1': (np.uint8, 255.0),
    'mono16': (np.uint16, 65535.0),
    '16UC1': (np.uint16, 65535.0),
    '32FC1': (np.float32, 1.0),
}
# the encoding written for each dtype (the mono* names where there are two)
WRITE_ENCODINGS = ('mono8', 'mono16', '32FC1')
# colour encodings read as their luminance -> (numpy dtype, channels, OpenCV conversion to grey)
COLOUR_ENCODINGS = {
    'rgb8': (np.uint8, 3, 'COLOR_RGB2GRAY'), 'bgr8': (np.uint8, 3, 'COLOR_BGR2GRAY'),
    'rgba8': (np.uint8, 4, 'COLOR_RGBA2GRAY'), 'bgra8': (np.uint8, 4, 'COLOR_BGRA2GRAY'),
    'rgb16': (np.uint16, 3, 'COLOR_RGB2GRAY'), 'bgr16': (np.uint16, 3, 'COLOR_BGR2GRAY'),
    'rgba16': (np.uint16, 4, 'COLOR_RGBA2GRAY'), 'bgra16': (np.uint16, 4, 'COLOR_BGRA2GRAY'),
}
READ_ENCODINGS = tuple(IMAGE_ENCODINGS) + tuple(COLOUR_ENCODINGS)


def encoding_dtype(encoding):
    """Numpy dtype of an encoding; ValueError naming the supported ones otherwise."""
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding '{encoding}' "
                         f"(supported: {', '.join(IMAGE_ENCODINGS)})")
    return np.dtype(IMAGE_ENCODINGS[encoding][0])


def read_layout(encoding):
    """(numpy dtype, channels) of an encoding that is read; ValueError naming them otherwise."""
    if encoding in COLOUR_ENCODINGS:
        dtype, channels, _ = COLOUR_ENCODINGS[encoding]
        return np.dtype(dtype), channels
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unsupported image encoding '{encoding}' "
                         f"(supported: {', '.join(READ_ENCODINGS)})")
    return encoding_dtype(encoding), 1


def to_grey(pixels, encoding):
    """A frame of ``encoding`` as a 2D image of its dtype: colour (H, W, C) by its luminance."""
    if encoding not in COLOUR_ENCODINGS:
        return pixels
    import cv2
    conversion = getattr(cv2, COLOUR_ENCODINGS[encoding][2])
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def decoded_to_grey(pixels):
    """An image as OpenCV decodes a file: 2D as it is, colour (BGR or BGRA) by its luminance."""
    if pixels.ndim != 3:
        return pixels
    return to_grey(pixels, 'bgra8' if pixels.shape[2] == 4 else 'bgr8')


def encoding_for(image):
    """The encoding to write a 2D array with: mono8, mono16 or 32FC1 by its dtype."""
    dtype = np.asarray(image).dtype
    for encoding in WRITE_ENCODINGS:
        if dtype == encoding_dtype(encoding):
            return encoding
    return '32FC1'


def to_encoding(image01, encoding):
    """Scale a [0, 1] image to the value range of ``encoding`` and cast it to its dtype."""
    dtype = encoding_dtype(encoding)
    scaled = np.clip(np.asarray(image01, dtype=np.float64), 0.0, 1.0) * IMAGE_ENCODINGS[
        encoding][1]
    if np.issubdtype(dtype, np.integer):
        scaled = np.round(scaled)
    return scaled.astype(dtype)


ALL_FRAMES = 'all'  # read_images: every frame of a DICOM run
# DICOM tags (group|element, as SimpleITK names them) of a projection X-ray's geometry
DICOM_SDD_TAG = '0018|1110'            # DistanceSourceToDetector (mm)
DICOM_IMAGER_SPACING_TAG = '0018|1164'  # ImagerPixelSpacing: row, column spacing (mm) at the
                                        # detector (PixelSpacing may be at the patient)
DICOM_FRAME_TIME_TAG = '0018|1063'         # FrameTime: ms between the frames of a run
DICOM_FRAME_TIME_VECTOR_TAG = '0018|1065'  # FrameTimeVector: ms since the previous frame, each


@dataclass(frozen=True)
class DetectorTags:
    """Detector geometry an image file states (None: not stated; only DICOM states it)."""

    sdd_mm: float | None = None                             # source-to-detector distance
    pixel_spacing_mm: tuple[float, float] | None = None     # (horizontal, vertical) at detector


def is_dicom(path):
    """True for a DICOM file: a .dcm/.dicom name or the 'DICM' marker after its preamble."""
    path = Path(path)
    if path.suffix.lower() in ('.dcm', '.dicom'):
        return True
    with open(path, 'rb') as handle:
        return handle.read(132)[128:] == b'DICM'


def _dicom_reader(path):
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetImageIO('GDCMImageIO')
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f'could not read {path} as DICOM: {str(error).splitlines()[-1]}') from None
    return reader


def _dicom_numbers(reader, tag, path, zero_allowed=False):
    """The backslash-separated numbers of a DICOM tag (None when absent); ValueError if bad.

    Each must be positive (``zero_allowed``: or zero).
    """
    if not reader.HasMetaDataKey(tag):
        return None
    text = reader.GetMetaData(tag).strip()
    try:
        numbers = [float(part) for part in text.split('\\')]
    except ValueError:
        raise ValueError(f'{path}: DICOM tag ({tag.replace("|", ",")}) is {text!r}, not numbers'
                         ) from None
    if not all(np.isfinite(numbers)) or min(numbers) < 0 or (min(numbers) == 0
                                                              and not zero_allowed):
        raise ValueError(f'{path}: DICOM tag ({tag.replace("|", ",")}) is {text!r}, not '
                         f"{'zero or ' if zero_allowed else ''}positive")
    return numbers


def read_detector_tags(path):
    """The source-to-detector distance and detector pixel spacing a file states (DICOM only)."""
    if not is_dicom(path):
        return DetectorTags()
    reader = _dicom_reader(path)
    sdd = _dicom_numbers(reader, DICOM_SDD_TAG, path)
    spacing = _dicom_numbers(reader, DICOM_IMAGER_SPACING_TAG, path)
    if spacing is not None and len(spacing) != 2:
        raise ValueError(f'{path}: ImagerPixelSpacing has {len(spacing)} values, not 2')
    return DetectorTags(sdd_mm=None if sdd is None else sdd[0],
                        pixel_spacing_mm=None if spacing is None else (spacing[1], spacing[0]))


def read_frame_times(path, count):
    """When each of a file's ``count`` frames was taken, in s after its first, or None.

    From a DICOM run's FrameTimeVector (0018,1065), else its FrameTime (0018,1063); None for
    other files and runs that state neither. ValueError when the tags are malformed.
    """
    if not is_dicom(path):
        return None
    reader = _dicom_reader(path)
    increments = _dicom_numbers(reader, DICOM_FRAME_TIME_VECTOR_TAG, path, zero_allowed=True)
    if increments is not None:
        if len(increments) != count:
            raise ValueError(f'{path}: FrameTimeVector has {len(increments)} values for '
                             f'{count} frames')
        return [1e-3 * float(ms) for ms in np.cumsum(increments) - increments[0]]
    frame_time = _dicom_numbers(reader, DICOM_FRAME_TIME_TAG, path)
    if frame_time is None:
        return None
    return [index * frame_time[0] * 1e-3 for index in range(count)]


def _read_dicom_frames(path):
    """Every frame of a DICOM X-ray, (frames, height, width), as MONOCHROME2 (GDCM inverts)."""
    import SimpleITK as sitk
    pixels = sitk.GetArrayFromImage(_dicom_reader(path).Execute())
    return pixels.reshape(-1, *pixels.shape[-2:])


def read_images(path, frame=None):
    """The X-ray frames of a file that ``frame`` selects, as a list of 2D arrays.

    Files: PNG/TIFF/JPEG (mono8/mono16 kept), .npy, NIfTI/MHA/NRRD (2D) or DICOM. ``frame``
    (DICOM only): None for a file of one image (a multi-frame DICOM, a fluoroscopy run, needs a
    choice), a frame's index, or ``ALL_FRAMES`` for every frame in order.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'image file not found: {path}')
    dicom = is_dicom(path)
    if frame is not None and not dicom:
        raise ValueError(f'{path}: a frame can be chosen in a multi-frame DICOM file only')
    name = path.name.lower()
    if dicom:
        frames = _read_dicom_frames(path)
        if frame == ALL_FRAMES:
            return list(frames)
        if frame is None and len(frames) > 1:
            raise ValueError(f'{path} holds {len(frames)} frames: choose one (--frame 0 to '
                             f'{len(frames) - 1}, or {ALL_FRAMES})')
        if not 0 <= (frame or 0) < len(frames):
            raise ValueError(f'{path} holds {len(frames)} frame(s): no frame {frame}')
        image = frames[frame or 0]
    elif name.endswith('.npy'):
        image = np.load(path, allow_pickle=False)
    elif name.endswith(('.nii', '.nii.gz', '.mha', '.mhd', '.nrrd')):
        import SimpleITK as sitk
        image = np.squeeze(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    else:
        import cv2
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f'could not read {path} as an image')
        image = decoded_to_grey(image)
    if np.asarray(image).ndim != 2:
        raise ValueError(f'{path}: expected a 2D image, got shape {np.asarray(image).shape}')
    return [image]


def read_image(path, frame=None):
    """One X-ray image from a file (``read_images``; ``frame``: a DICOM frame's index)."""
    if frame == ALL_FRAMES:
        raise ValueError(f'read_image reads one frame; use read_images for {ALL_FRAMES!r}')
    return read_images(path, frame)[0]


def read_intrinsics(path, width, height):
    """Intrinsics from JSON: {"K": 3x3 or 9 values, "width", "height", optional "sdd_mm"}.

    ``width``/``height`` default to the image size when the file omits them. Raises
    ValueError, naming the file, for a missing, unreadable or malformed one.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'intrinsics file not found: {path}')
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError('not a JSON object')
        K = data.get('K', data.get('k'))
        if K is None:
            raise ValueError('no "K"')
        return geometry.Intrinsics(np.asarray(K, dtype=float).reshape(3, 3),
                                   int(data.get('width', width)), int(data.get('height', height)),
                                   float(data.get('sdd_mm', geometry.CIOS_FUSION_SDD_MM)))
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as error:
        raise ValueError(f'{path}: invalid intrinsics file ({error})') from None
