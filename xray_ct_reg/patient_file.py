"""One preprocessed file per patient for online training: volumes, bones and physics tables.

``write_patient_file`` (needs SimpleITK, Open3D and xraydb: run it where the project is installed)
turns a loaded :class:`ct.Patient` into a compressed ``.npz`` that ``read_patient_file`` loads with
numpy alone, so the online simulator (``online_sim``) and the training run on any machine with
torch, e.g. a GPU node without the project's other dependencies. It holds:

* ``materials`` (3, z, y, x) float16 on a ~2 mm grid: water-equivalent soft tissue, bone mineral
  (hydroxyapatite, inside the dilated bone mask) and iodinated contrast (the excess over soft
  tissue outside the bones: IV contrast, calcifications), as fractions of full density, with the
  CT couch and everything outside the body removed;
* ``bone_field`` (z, y, x) uint8 on the mesh's grid (voxels of at least
  ``ct.DEFAULT_MESH_VOXEL_MM``, 1.5 mm, per axis): :func:`ct.bone_field` x 255, whose 0.5 level
  is the bone surface the scene coordinates are defined on;
* for both grids the map from CT mm (LPS) to continuous voxel index (x, y, z);
* bone vertices (pose sampling), centroid and radius, targets, the CT's SHA-256;
* attenuation tables (1/mm at full density, ``xray_physics.mu_per_mm``, NIST data via xraydb)
  and tube spectra (``tube_spectra.json``, tabulated from SpekPy) on the same energy bins.
"""
from dataclasses import dataclass
import json
from pathlib import Path

import numpy as np

from xray_ct_reg import atomic_file

PATIENT_FILE_FORMAT = 'xray_ct_reg.patient/1'
MATERIAL_CHANNELS = ('water', 'bone_mineral', 'iodine')
TABLE_MATERIALS = MATERIAL_CHANNELS + ('aluminium', 'copper', 'titanium', 'steel',
                                       'carbon_fibre')
MATERIAL_VOXEL_MM = 2.0
BODY_THRESHOLD_HU = -500.0        # the body is the largest connected region above this
BONE_DILATION_MM = 2.0            # bone mineral is taken inside the bone mask grown this much
IODINE_HU_PER_MG_ML = 27.0        # CT number per mg/ml of iodine near 120 kVp
MAX_VERTICES = 20000
SPECTRA_FILE = Path(__file__).resolve().parent / 'tube_spectra.json'


@dataclass
class Grid:
    """A volume on a regular grid and the affine from CT mm to its continuous (x, y, z) index."""

    values: np.ndarray            # (C, z, y, x) or (z, y, x)
    mm_to_index: np.ndarray       # (3, 3): index = mm_to_index @ (p - origin_mm)
    origin_mm: np.ndarray         # (3,) CT mm of voxel index (0, 0, 0)


@dataclass
class PatientVolumes:
    """Everything the online simulator needs about one patient (numpy arrays)."""

    ct_sha256: str
    materials: Grid               # (3, z, y, x) fractions of full density, MATERIAL_CHANNELS
    bone_field: Grid              # (z, y, x) occupancy in [0, 1]
    vertices: np.ndarray          # (N, 3) bone surface points, CT mm
    bone_centroid: np.ndarray     # (3,) CT mm
    bone_radius: float            # mm
    targets: np.ndarray           # (T, 3) CT mm
    posterior_mm: float           # largest LPS y of the body (its back), mm
    energies_kev: np.ndarray      # (E,)
    mu_per_mm: dict               # material -> (E,) attenuation at full density, 1/mm
    spectra_kvp: np.ndarray       # (K,) tube voltages of the spectrum table
    spectra: np.ndarray           # (K, E) unfiltered photon fluence per bin (rows sum to 1)


def _grid_affine(image):
    """(mm_to_index, origin) of a SimpleITK image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.diag(1.0 / np.array(image.GetSpacing())) @ direction.T, np.array(image.GetOrigin())


def _crop(values, keep, margin=1):
    """``values`` cropped (last three axes) to the box of ``keep``; its low corner (x, y, z)."""
    found = np.argwhere(keep)
    low = np.maximum(found.min(axis=0) - margin, 0)
    high = np.minimum(found.max(axis=0) + margin + 1, keep.shape)
    window = (Ellipsis, slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2]))
    return np.ascontiguousarray(values[window]), low[::-1].astype(float)


def body_only(ct):
    """The CT with everything outside the body (couch, air, blankets) set to -1000 HU."""
    import SimpleITK as sitk

    above = sitk.BinaryThreshold(ct, BODY_THRESHOLD_HU, 1e9, 1, 0)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(above)) == 1
    body = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(largest, [2, 2, 1]))
    return sitk.Mask(ct, body, outsideValue=-1000.0)


def write_patient_file(patient, path):
    """Preprocess ``patient`` (a :class:`ct.Patient`) into ``path`` (.npz); return its size."""
    import SimpleITK as sitk

    from xray_ct_reg import ct as ct_module
    from xray_ct_reg import drr, xray_physics

    params = patient.mask_params
    labels = (ct_module.load_labels(patient.labels_path, patient.ct)
              if patient.labels_path is not None else None)
    threshold_hu = params.get('threshold_hu')  # None with a label map
    mask = ct_module.bone_mask(
        patient.ct, ct_module.DEFAULT_BONE_THRESHOLD_HU if threshold_hu is None else threshold_hu,
        labels, params.get('label_ids'))
    # materials on a ~2 mm grid
    body = body_only(sitk.Cast(patient.ct, sitk.sitkFloat32))
    grid = drr.resample_to_voxels(body, MATERIAL_VOXEL_MM, -1000.0)
    hu = sitk.GetArrayFromImage(grid)
    dilated = sitk.BinaryDilate(mask, [max(1, int(round(BONE_DILATION_MM / s)))
                                       for s in mask.GetSpacing()])
    in_bone = sitk.GetArrayFromImage(sitk.Resample(
        sitk.Cast(dilated, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0))
    soft, excess_mineral = xray_physics.material_densities(hu)
    excess_hu = excess_mineral * xray_physics.HU_PER_HA_DENSITY * xray_physics.HA_DENSITY
    iodine_density = excess_hu / IODINE_HU_PER_MG_ML / 1000.0      # g/cm^3
    iodine = iodine_density / xray_physics.MATERIALS['iodine'][1] * (1.0 - in_bone)
    materials = np.stack([soft, excess_mineral * in_bone, iodine])
    materials, low = _crop(materials, materials[0] > 1e-3)
    mm_to_index, origin = _grid_affine(grid)
    origin = origin + np.linalg.solve(mm_to_index, low)
    body_y = sitk.GetArrayFromImage(body) > BODY_THRESHOLD_HU
    z, y, x = np.nonzero(body_y)
    corners = ct_module.index_to_physical(patient.ct, np.stack([x, y, z], axis=1)[::97])
    # bone field on the mesh's grid
    field_image = ct_module.bone_field(mask)
    field = sitk.GetArrayFromImage(field_image)
    field, field_low = _crop(field, field > 0.01)
    field_to_index, field_origin = _grid_affine(field_image)
    field_origin = field_origin + np.linalg.solve(field_to_index, field_low)
    vertices = np.asarray(patient.mesh.vertices)
    vertices = vertices[::-(-len(vertices) // MAX_VERTICES)]
    spectra = json.loads(SPECTRA_FILE.read_text())
    energies = np.asarray(spectra['energies_kev'], dtype=float)
    arrays = {
        'format': np.array(PATIENT_FILE_FORMAT), 'ct_sha256': np.array(patient.ct_sha256),
        'materials': materials.astype(np.float16),
        'materials_mm_to_index': mm_to_index, 'materials_origin_mm': origin,
        'bone_field': np.round(np.clip(field, 0.0, 1.0) * 255).astype(np.uint8),
        'bone_field_mm_to_index': field_to_index, 'bone_field_origin_mm': field_origin,
        'vertices': vertices.astype(np.float32),
        'bone_centroid': np.asarray(patient.bone_centroid, dtype=float),
        'bone_radius': np.array(float(patient.bone_radius)),
        'targets': np.asarray(patient.targets, dtype=float),
        'posterior_mm': np.array(float(corners[:, 1].max())),
        'energies_kev': energies,
        'spectra_kvp': np.asarray(spectra['kvp'], dtype=float),
        'spectra': np.asarray(spectra['fluence'], dtype=float),
    }
    for material in TABLE_MATERIALS:
        arrays[f'mu_{material}'] = xray_physics.mu_per_mm(material, energies)
    path = Path(path)
    with atomic_file.replaced_on_success(path) as temporary, open(temporary, 'wb') as handle:
        np.savez_compressed(handle, **arrays)
    return path.stat().st_size


def read_patient_file(path):
    """Load a patient file written by :func:`write_patient_file` (numpy only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'patient file not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f'corrupt patient file {path}: {error}') from None
    if str(arrays.get('format')) != PATIENT_FILE_FORMAT:
        raise ValueError(f'{path} is not a {PATIENT_FILE_FORMAT} patient file')
    return PatientVolumes(
        ct_sha256=str(arrays['ct_sha256']),
        materials=Grid(arrays['materials'].astype(np.float32), arrays['materials_mm_to_index'],
                       arrays['materials_origin_mm']),
        bone_field=Grid(arrays['bone_field'].astype(np.float32) / 255.0,
                        arrays['bone_field_mm_to_index'], arrays['bone_field_origin_mm']),
        vertices=arrays['vertices'].astype(float), bone_centroid=arrays['bone_centroid'],
        bone_radius=float(arrays['bone_radius']), targets=arrays['targets'],
        posterior_mm=float(arrays['posterior_mm']), energies_kev=arrays['energies_kev'],
        mu_per_mm={material: arrays[f'mu_{material}'] for material in TABLE_MATERIALS},
        spectra_kvp=arrays['spectra_kvp'], spectra=arrays['spectra'])
