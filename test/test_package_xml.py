"""package.xml must be a valid format-3 ament_python manifest."""
from pathlib import Path
import xml.etree.ElementTree as ET

REPO = Path(__file__).resolve().parent.parent


def _root():
    return ET.parse(REPO / 'package.xml').getroot()


def test_format_3_and_name():
    root = _root()
    assert root.tag == 'package'
    assert root.get('format') == '3'
    assert root.findtext('name') == 'xray_ct_reg'
    assert (REPO / 'resource' / 'xray_ct_reg').is_file()
    for tag in ('version', 'description', 'maintainer', 'license'):
        assert (root.findtext(tag) or '').strip(), f'<{tag}> missing or empty'


def test_build_type_is_ament_python():
    assert _root().findtext('export/build_type') == 'ament_python'


def test_exec_depends_are_names():
    depends = _root().findall('exec_depend')
    assert depends, 'no <exec_depend> at all'
    for dep in depends:
        name = (dep.text or '').strip()
        assert name and ' ' not in name, f'bad <exec_depend>: {dep.text!r}'
    assert 'rclpy' in {d.text.strip() for d in depends}
