"""Files written whole or not at all (``atomic_file``), on the real filesystem."""
import os

import pytest

from xray_ct_reg import atomic_file


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'model.pt'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError, match='interrupted'):
        with atomic_file.replaced_on_success(target) as temporary:
            temporary.write_bytes(b'half of a new fi')
            raise RuntimeError('interrupted')
    assert target.read_bytes() == b'old'
    assert sorted(os.listdir(tmp_path)) == ['model.pt']


def test_a_successful_write_replaces_the_file_and_keeps_its_extension(tmp_path):
    target = tmp_path / 'new' / 'mesh.ply'  # the folder is created
    with atomic_file.replaced_on_success(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.endswith('mesh.ply')
        assert temporary.name.startswith('.')  # hidden while it is incomplete
        temporary.write_text('ply')
    atomic_file.write_text(tmp_path / 'a.yaml', 'x: 1\n')
    atomic_file.write_bytes(tmp_path / 'a.yaml', b'x: 2\n')
    assert target.read_text() == 'ply' and (tmp_path / 'a.yaml').read_text() == 'x: 2\n'
    assert sorted(os.listdir(target.parent)) == ['mesh.ply']
