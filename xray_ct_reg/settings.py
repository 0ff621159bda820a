"""One source for every setting: dataclass fields carrying their own description and limits.

A setting is declared once, as a dataclass field made by :func:`setting` (default, one-line
description, numeric range or allowed choices, and whether a running node may change it). From
that one declaration come:

* the node's ROS parameters (descriptions, ranges, ``read_only`` for the settings that only take
  effect at configure) and the validation of live changes (:func:`check_value`);
* the comments of ``config/registration.yaml`` (:func:`render_params_yaml`; a test keeps the
  committed file in step);
* ``--params-file`` of the command-line tools (:func:`read_params_file`, :func:`build`), so the
  CLI, replay and evaluation run with exactly the node's configuration.

ROS-free: the node turns :func:`specs` into ``declare_parameter`` calls.
"""
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
import re

from xray_ct_reg import atomic_file

NODE_NAME = 'xray_ct_reg_node'


def setting(default, description, *, limits=None, choices=None, live=False):
    """A dataclass field that describes itself.

    ``default``: the value; ``description``: one line for humans (parameter description and YAML
    comment); ``limits``: (low, high) for numbers; ``choices``: allowed strings; ``live``: a
    running node applies a change at once (otherwise the parameter is read-only after start and
    takes effect at configure).
    """
    return field(default=default, metadata={'description': description, 'limits': limits,
                                            'choices': choices, 'live': live})


@dataclass(frozen=True)
class Spec:
    """What one setting is: name, default, type, description, limits, choices, live."""

    name: str
    default: object
    kind: type
    description: str
    limits: tuple | None
    choices: tuple | None
    live: bool
    section: str


def specs(*config_classes):
    """The :class:`Spec` of every field of the given setting dataclasses, in declaration order."""
    result = []
    for config_class in config_classes:
        for item in fields(config_class):
            if 'description' not in item.metadata:
                raise TypeError(f'{config_class.__name__}.{item.name} is not made by setting()')
            default = item.default if item.default is not MISSING else item.default_factory()
            result.append(Spec(item.name, default, type(default), item.metadata['description'],
                               item.metadata['limits'], item.metadata['choices'],
                               item.metadata['live'], config_class.__doc__.splitlines()[0]))
    return result


def check_value(spec, value):
    """Return ``value`` converted to the setting's type, or raise ValueError saying why not."""
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f'{spec.name} must be true or false, got {value!r}')
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f'{spec.name} must be a number, got {value!r}')
        value = float(value)
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'{spec.name} must be an integer, got {value!r}')
    elif not isinstance(value, spec.kind):
        raise ValueError(f'{spec.name} must be a {spec.kind.__name__}, got {value!r}')
    if spec.limits is not None and not spec.limits[0] <= value <= spec.limits[1]:
        raise ValueError(f'{spec.name} = {value} is outside [{spec.limits[0]}, {spec.limits[1]}]')
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{spec.name} must be one of {', '.join(spec.choices)}, got {value!r}")
    return value


def _checked(config_class, values):
    """The entries of ``values`` that are settings of ``config_class``, each checked."""
    by_name = {spec.name: spec for spec in specs(config_class)}
    return {name: check_value(by_name[name], value)
            for name, value in values.items() if name in by_name}


def build(config_class, values):
    """An instance of ``config_class`` from a dict (unknown keys ignored; each value checked)."""
    return config_class(**_checked(config_class, values))


def update(config, values):
    """A copy of ``config`` with ``values`` applied (each checked; unknown keys ignored)."""
    return replace(config, **_checked(type(config), values))


def node_key_matches(key, full_name):
    """Whether a parameter file's node key applies to the node ``full_name`` ('/ns/name').

    rcl's rules: a key without a leading '/' is in the root namespace, '*' stands for one name,
    '**' for any part of the path ('/**': every node).
    """
    key = key if key.startswith('/') else '/' + key
    parts = (re.escape(part).replace(r'\*', '[^/]*') for part in key.split('**'))
    return re.fullmatch('.*'.join(parts), full_name) is not None


def node_parameters(document, full_name):
    """The ``ros__parameters`` mappings of a loaded parameter file that apply to ``full_name``.

    Wildcard entries come first, so the node's own entries override them when applied in order.
    """
    sections = [(str(key), entry['ros__parameters']) for key, entry in document.items()
                if isinstance(entry, dict) and isinstance(entry.get('ros__parameters'), dict)
                and node_key_matches(str(key), full_name)]
    return [values for _, values in sorted(sections, key=lambda section: '*' not in section[0])]


def read_params_file(path, node_name=NODE_NAME):
    """The ``ros__parameters`` of ``node_name`` (root namespace) in a ROS 2 parameter YAML file.

    Raises ValueError when the file is missing, is not YAML, or has no parameters for the node.
    """
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'parameter file not found: {path}')
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f'{path} is not valid YAML: {error}') from error
    if not isinstance(document, dict):
        raise ValueError(f'{path}: expected a mapping of node names to ros__parameters')
    values = {}
    for section in node_parameters(document, '/' + node_name):
        values.update(section)
    if not values:
        raise ValueError(f'{path} has no ros__parameters for /** or {node_name}')
    return values


def _yaml_scalar(value):
    """A value written as YAML (strings quoted only when YAML would misread them)."""
    import yaml
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('\n...').strip()


def _comment(spec):
    """The YAML comment lines of one setting, from its description, limits and choices."""
    text = spec.description
    if spec.limits is not None:
        text += f' [{spec.limits[0]}, {spec.limits[1]}]'
    if spec.choices is not None:
        text += f" ({' | '.join(spec.choices)})"
    text += '.' if spec.live else '. Read-only after start.'
    lines, line = [], '#'
    for word in text.split():
        if len(line) + 1 + len(word) > 96:
            lines.append(line)
            line = '#'
        line += ' ' + word
    return [*lines, line]


def render_params_yaml(all_specs, values, header):
    """The parameter file text: ``header`` comment lines, then each setting's comment and value.

    ``values`` gives the value of each setting (a missing one is written commented out with its
    default: the node's default then applies).
    """
    lines = [f'# {line}'.rstrip() for line in header] + ['/**:', '  ros__parameters:']
    section = None
    for spec in all_specs:
        if spec.section != section:
            section = spec.section
            lines.append(f'    # --- {section} ---')
        lines += ['    ' + line for line in _comment(spec)]
        if spec.name in values:
            lines.append(f'    {spec.name}: {_yaml_scalar(values[spec.name])}')
        else:
            lines.append(f'    # {spec.name}: {_yaml_scalar(spec.default)}')
    return '\n'.join(lines) + '\n'


def add_params_file_argument(parser):
    """``--params-file``: read settings from a node parameter file (e.g. the node's YAML)."""
    parser.add_argument('--params-file', default=None,
                        help='ROS 2 parameter YAML of xray_ct_reg_node (e.g. '
                             'config/registration.yaml): registration settings and ct_path '
                             'as the node uses them; command-line flags override it')


PARAMS_FILE_HEADER = (
    'Parameters of xray_ct_reg_node (X-ray to CT registration by scene coordinate regression).',
    'Generated from the settings dataclasses (stream.NodeConfig, register.RegistrationConfig):',
    'edit values here, descriptions there, then: xray-ct-reg params --from THIS_FILE --write '
    'THIS_FILE',
    'Use with: xray_ct_reg_node --ros-args --params-file config/registration.yaml',
    '      or: xray-ct-reg register|replay|evaluate --params-file config/registration.yaml',
    'A commented-out setting keeps its default. Units: mm, deg, s, px as named.',
)


def node_specs():
    """The :class:`Spec` of every node parameter: node settings, then registration settings."""
    from xray_ct_reg.register import RegistrationConfig
    from xray_ct_reg.stream import NodeConfig
    return specs(NodeConfig, RegistrationConfig)


def add_params_arguments(parser):
    """Arguments of ``xray-ct-reg params``."""
    parser.add_argument('--from', dest='source', default=None,
                        help='take the values from this parameter file (default: the defaults)')
    parser.add_argument('--write', default=None, help='write the file here instead of printing')


def checked_node_values(values):
    """``values`` of a node parameter file, each checked (:func:`check_value`).

    Raises ValueError naming any that is not a node setting (misspelled, or removed since the
    file was written): a setting the file means to change must not be ignored silently.
    """
    known = {spec.name: spec for spec in node_specs()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)} (not settings of "
                         f'{NODE_NAME}: misspelled, or removed; see config/registration.yaml)')
    return {name: check_value(known[name], value) for name, value in values.items()}


def read_node_values(path):
    """The checked values (:func:`checked_node_values`) of the node parameter file ``path``.

    ``path`` None: no file, ``{}``. ValueError for a bad file or an unknown setting.
    """
    return checked_node_values(read_params_file(path)) if path else {}


def run_params(args):
    """Print or write the node's parameter file, comments generated from the settings."""
    all_specs = node_specs()
    try:
        values = (read_params_file(args.source) if args.source
                  else {spec.name: spec.default for spec in all_specs})
        checked_node_values(values)
    except ValueError as error:
        print(f'error: {error}')
        return 1
    text = render_params_yaml(all_specs, values, PARAMS_FILE_HEADER)
    if args.write:
        atomic_file.write_text(args.write, text)
    else:
        print(text, end='')
    return 0
