"""Launch xray_ct_reg_node (a lifecycle node) with config/registration.yaml.

    ros2 launch xray_ct_reg registration.launch.py model:=/path/model.pt ct:=/path/ct.nii.gz

Arguments: model (checkpoint; default the committed example), ct (CT to check the model
against; default none), namespace, params_file (default the installed
config/registration.yaml), autostart (configure + activate at start; default true),
transport_profile (Fast DDS XML profile for full-size frames; default
$FASTRTPS_DEFAULT_PROFILES_FILE, else the installed config/fastdds_profile.xml; the C-arm driver
should load the same profile).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PythonExpression
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

PROFILE_VARIABLE = 'FASTRTPS_DEFAULT_PROFILES_FILE'


def generate_launch_description():
    """Declare the arguments and start the node with the parameter file and overrides."""
    share = get_package_share_directory('xray_ct_reg')
    model = LaunchConfiguration('model')
    overrides = {
        'ct_path': LaunchConfiguration('ct'),
        'autostart': ParameterValue(LaunchConfiguration('autostart'), value_type=bool),
    }
    arguments = [
        DeclareLaunchArgument('model', default_value='',
                              description='checkpoint (.pt); empty: committed example model'),
        DeclareLaunchArgument('ct', default_value='', description='CT the model was trained for'),
        DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
        DeclareLaunchArgument('params_file',
                              default_value=os.path.join(share, 'config', 'registration.yaml'),
                              description='parameter file'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='configure and activate at start'),
        DeclareLaunchArgument(
            'transport_profile',
            default_value=EnvironmentVariable(
                PROFILE_VARIABLE,
                default_value=os.path.join(share, 'config', 'fastdds_profile.xml')),
            description='Fast DDS XML profile (shared memory for full-size frames)'),
        SetEnvironmentVariable(PROFILE_VARIABLE, LaunchConfiguration('transport_profile')),
    ]
    node_kwargs = dict(package='xray_ct_reg', executable='xray_ct_reg_node',
                       name='xray_ct_reg_node', namespace=LaunchConfiguration('namespace'),
                       output='screen')
    with_model = LifecycleNode(
        **node_kwargs, parameters=[LaunchConfiguration('params_file'),
                                   dict(overrides, model_path=model)],
        condition=IfCondition(PythonExpression(["'", model, "' != ''"])))
    default_model = LifecycleNode(
        **node_kwargs, parameters=[LaunchConfiguration('params_file'), overrides],
        condition=IfCondition(PythonExpression(["'", model, "' == ''"])))
    return LaunchDescription(arguments + [with_model, default_model])
