"""ament_python / pip setup for xray_ct_reg."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'xray_ct_reg'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml') + glob('config/*.xml')),
        ('share/' + PACKAGE + '/models', glob('models/*')),
    ],
    package_data={PACKAGE: ['py.typed', 'tube_spectra.json']},
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='xray_ct_reg developers',
    maintainer_email='xray-ct-reg@example.org',
    description='X-ray to CT rigid registration by scene coordinate regression, as a ROS 2 node.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'xray-ct-reg = xray_ct_reg.cli:main',
            'xray_ct_reg_node = xray_ct_reg.node:main',
            'simulated_carm = xray_ct_reg.sim_carm:main',
        ],
    },
)
