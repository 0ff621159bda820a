"""Launch xray_ct_reg_node (a lifecycle node) with config/registration.yaml.

    ros2 launch xray_ct_reg registration.launch.py model:=/path/model.pt ct:=/path/ct.nii.gz

Arguments: model (checkpoint) and ct (the CT the model was trained for; 'example' is the
embedded chest CT), each when given overriding model_path / ct_path of params_file (whose
defaults are the committed example model and its CT), namespace, params_file (default the installed
config/registration.yaml), autostart (configure + activate at start; default true),
transport_profile (Fast DDS XML profile for full-size frames; default
$FASTRTPS_DEFAULT_PROFILES_FILE, else the installed config/fastdds_profile.xml; the C-arm driver
should load the same profile).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

PROFILE_VARIABLE = 'FASTRTPS_DEFAULT_PROFILES_FILE'  # Fast DDS 2.x (Jazzy)
PROFILE_VARIABLE_3X = 'FASTDDS_DEFAULT_PROFILES_FILE'  # Fast DDS 3.x (Kilted and later)
# launch argument -> node parameter it sets when given (empty: the parameter file's value stands)
PATH_ARGUMENTS = {'model': 'model_path', 'ct': 'ct_path'}


def _node(context):
    """The node with the parameter file, then the non-empty path arguments over it."""
    overrides = {'autostart': ParameterValue(LaunchConfiguration('autostart'), value_type=bool)}
    for argument, parameter in PATH_ARGUMENTS.items():
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[parameter] = value
    return [LifecycleNode(package='xray_ct_reg', executable='xray_ct_reg_node',
                          name='xray_ct_reg_node', namespace=LaunchConfiguration('namespace'),
                          output='screen',
                          parameters=[LaunchConfiguration('params_file'), overrides])]


def generate_launch_description():
    """Declare the arguments and start the node with the parameter file and overrides."""
    share = get_package_share_directory('xray_ct_reg')
    return LaunchDescription([
        DeclareLaunchArgument('model', default_value='',
                              description='checkpoint (.pt); empty: model_path of params_file'),
        DeclareLaunchArgument('ct', default_value='',
                              description='CT the model was trained for; empty: ct_path of '
                              'params_file'),
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'registration.yaml'),
                              description='parameter file'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='configure and activate at start'),
        DeclareLaunchArgument(
            'transport_profile',
            default_value=EnvironmentVariable(PROFILE_VARIABLE, default_value=EnvironmentVariable(
                PROFILE_VARIABLE_3X,
                default_value=os.path.join(share, 'config', 'fastdds_profile.xml'))),
            description='Fast DDS XML profile (shared memory for full-size frames)'),
        SetEnvironmentVariable(PROFILE_VARIABLE, LaunchConfiguration('transport_profile')),
        SetEnvironmentVariable(PROFILE_VARIABLE_3X, LaunchConfiguration('transport_profile')),
        OpaqueFunction(function=_node),
    ])
