"""Reading X-ray images and intrinsics from files, and the one table of image encodings.

Kept apart from the algorithms: ``register`` works on arrays and ``geometry.Intrinsics``;
this module turns files (and ROS encoding names) into them.

``IMAGE_ENCODINGS`` is the single list of the sensor_msgs/Image encodings a C-arm uses that the
project reads and writes: ``ros_io`` converts messages with it, ``sim_carm`` and ``bag`` write
with it, and the node's parameter description names it. ``COLOUR_ENCODINGS`` are read too, as
their luminance (a frame grabber's copy of the C-arm's monitor arrives in colour).
"""
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


def read_image(path):
    """Read an X-ray from PNG/TIFF/JPEG (mono8/mono16 kept), .npy, or NIfTI/MHA/NRRD (2D)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'image file not found: {path}')
    name = path.name.lower()
    if name.endswith('.npy'):
        image = np.load(path, allow_pickle=False)
    elif name.endswith(('.nii', '.nii.gz', '.mha', '.mhd', '.nrrd')):
        import SimpleITK as sitk
        image = np.squeeze(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    else:
        import cv2
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f'could not read {path} as an image')
        if image.ndim == 3:  # OpenCV reads colour as BGR(A)
            image = to_grey(image, 'bgra8' if image.shape[2] == 4 else 'bgr8')
    if np.asarray(image).ndim != 2:
        raise ValueError(f'{path}: expected a 2D image, got shape {np.asarray(image).shape}')
    return image


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
