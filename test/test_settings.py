"""One source per setting: dataclass fields make parameters, YAML comments, --params-file."""
import argparse
import subprocess
import sys

from conftest import REPO
import pytest

from xray_ct_reg import settings
from xray_ct_reg.register import RegistrationConfig, cli_config
from xray_ct_reg.stream import NodeConfig

PARAMS = REPO / 'config' / 'registration.yaml'


def test_every_setting_describes_itself():
    all_specs = settings.node_specs()
    names = [spec.name for spec in all_specs]
    assert len(names) == len(set(names)), 'a name is used by two settings'
    for spec in all_specs:
        assert spec.description and spec.kind in (bool, int, float, str), spec
        settings.check_value(spec, spec.default)  # each default satisfies its own limits
    assert {spec.name for spec in all_specs if not spec.live} >= {
        'model_path', 'ct_path', 'image_topic', 'image_qos', 'intensity_refine'}


@pytest.mark.parametrize('name, value, fragment', [
    ('polarity', 'sideways', 'must be one of'),
    ('image_qos', 'fast', 'must be one of'),
    ('min_ncc', 1.5, 'outside'),
    ('min_inliers', 2.5, 'integer'),
    ('autostart', 'yes', 'true or false'),
])
def test_bad_values_are_refused_with_a_reason(name, value, fragment):
    spec = {s.name: s for s in settings.node_specs()}[name]
    with pytest.raises(ValueError, match=fragment):
        settings.check_value(spec, value)
    config_class = NodeConfig if name in {s.name for s in settings.specs(NodeConfig)} \
        else RegistrationConfig
    with pytest.raises(ValueError, match=fragment):
        settings.build(config_class, {name: value})


def test_committed_params_file_is_generated_from_the_settings():
    """Comments come from the descriptions; every parameter is listed (set or commented)."""
    values = settings.read_params_file(PARAMS)
    text = PARAMS.read_text()
    assert settings.render_params_yaml(settings.node_specs(), values,
                                       settings.PARAMS_FILE_HEADER) == text, \
        'config/registration.yaml is stale: run xray-ct-reg params --from ' \
        'config/registration.yaml --write config/registration.yaml'
    for spec in settings.node_specs():
        assert f'    {spec.name}: ' in text or f'    # {spec.name}: ' in text, spec.name


def test_params_cli_writes_what_it_reads(tmp_path):
    out = tmp_path / 'copy.yaml'
    command = [sys.executable, '-m', 'xray_ct_reg.cli', 'params', '--from', str(PARAMS),
               '--write', str(out)]
    subprocess.run(command, check=True, timeout=60)
    assert out.read_text() == PARAMS.read_text()
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**:\n  ros__parameters:\n    min_ncc: 7.0\n')
    result = subprocess.run(command[:5] + [str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and 'min_ncc' in result.stdout


def test_read_params_file_errors(tmp_path):
    with pytest.raises(ValueError, match='not found'):
        settings.read_params_file(tmp_path / 'missing.yaml')
    broken = tmp_path / 'broken.yaml'
    broken.write_text('a: [unclosed')
    with pytest.raises(ValueError, match='not valid YAML'):
        settings.read_params_file(broken)
    other = tmp_path / 'other.yaml'
    other.write_text('some_other_node:\n  ros__parameters:\n    x: 1\n')
    with pytest.raises(ValueError, match='no ros__parameters'):
        settings.read_params_file(other)


def test_node_specific_entries_override_the_wildcard(tmp_path):
    path = tmp_path / 'two.yaml'
    path.write_text('/**:\n  ros__parameters:\n    min_ncc: 0.5\n    min_inliers: 50\n'
                    'xray_ct_reg_node:\n  ros__parameters:\n    min_ncc: 0.7\n')
    values = settings.read_params_file(path)
    assert values == {'min_ncc': 0.7, 'min_inliers': 50}


def test_cli_config_reads_the_node_yaml():
    parser = argparse.ArgumentParser()
    parser.add_argument('--ct')
    parser.add_argument('--refine', action='store_true')
    settings.add_params_file_argument(parser)
    config, ct_path, _ = cli_config(parser.parse_args(['--params-file', str(PARAMS)]))
    node_values = settings.read_params_file(PARAMS)
    assert config.intensity_refine == node_values['intensity_refine']
    assert config.min_ncc == node_values['min_ncc'] and ct_path == node_values['ct_path']
    config, ct_path, _ = cli_config(parser.parse_args(['--ct', 'other.nii', '--refine']))
    assert config == RegistrationConfig(intensity_refine=True) and ct_path == 'other.nii'


def test_cli_config_refuses_a_parameter_the_node_does_not_have(tmp_path):
    """A removed or misspelled setting in --params-file is an error, not silently ignored."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--ct')
    parser.add_argument('--refine', action='store_true')
    settings.add_params_file_argument(parser)
    old = tmp_path / 'old.yaml'
    old.write_text('/**:\n  ros__parameters:\n    min_ncc: 0.6\n    min_points: 400\n')
    with pytest.raises(ValueError, match='unknown parameter.*min_points'):
        cli_config(parser.parse_args(['--params-file', str(old)]))
    old.write_text('/**:\n  ros__parameters:\n    min_ncc: 0.6\n')
    config, _, _ = cli_config(parser.parse_args(['--params-file', str(old)]))
    assert config.min_ncc == 0.6
