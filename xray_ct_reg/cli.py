"""The `xray-ct-reg` command line: one entry point, one sub-command per job.

Each sub-command lives in the module that does the job. That module exposes
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (dashes in the
name become underscores). Modules are imported only when their sub-command runs,
so ``xray-ct-reg --help`` stays fast.
"""
import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
SUBCOMMANDS = {
    'selfcheck': ('xray_ct_reg.geometry', 'check the geometry conventions on this machine'),
    'simulate': ('xray_ct_reg.simulate', 'simulate C-arm training data from a CT'),
    'train': ('xray_ct_reg.train', 'train the scene coordinate regression network'),
    'prepare': ('xray_ct_reg.train', 'CT to model in one step: simulate, then train'),
    'export-patient': ('xray_ct_reg.train', 'write the patient file for online training'),
    'register': ('xray_ct_reg.register', 'register one X-ray image to the CT'),
    'evaluate': ('xray_ct_reg.evaluate', 'measure registration accuracy on simulated views'),
    'bag-record-sim': ('xray_ct_reg.bag', 'write a rosbag2 of simulated C-arm frames'),
    'replay': ('xray_ct_reg.bag', 'feed a rosbag2 through the registrar and report'),
    'demo': ('xray_ct_reg.demo', 'simulated C-arm + registration node, end to end'),
    'params': ('xray_ct_reg.settings', "print or write the node's parameter file (YAML)"),
}


def _function(name, pattern):
    """Return the function ``pattern.format(name)`` from the sub-command's module."""
    module_name, _ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, pattern.format(name.replace('-', '_')))


def main(argv=None):
    """Run the sub-command named on the command line; return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog='xray-ct-reg', description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _function(name, 'add_{}_arguments')(sub)
    args = parser.parse_args(argv)
    try:
        return int(_function(args.command, 'run_{}')(args) or 0)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
