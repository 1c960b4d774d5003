"""The model zoo. registry.py holds the registry and the feature points; each family file
registers its models when imported, and this package imports every family, so the registry is
complete on `import kd.models`."""
from kd.models import airbench, default_pair, mobilenet, resnets, shufflenet, vgg  # noqa: F401
from kd.models.airbench import AirbenchGroup, AirbenchNet, airbench94, airbench94_small  # noqa: F401
from kd.models.default_pair import BasicBlock, StudentNet, TeacherNet, conv_bn_relu  # noqa: F401
from kd.models.mobilenet import InvertedResidual, MobileNetV2, mobilenetv2  # noqa: F401
from kd.models.registry import (BN_BEFORE_RELU, MIN_SIZE, MODELS, POINTS, Classifier,  # noqa: F401
                                bn_before_relu, build_model, check_model, feature_points,
                                init_like_reference, model_names, register_model, stage_points)
from kd.models.external import ArchError, is_external, source_sha256  # noqa: F401
from kd.models.resnets import (Bottleneck, BottleneckResNet, CifarResNet,  # noqa: F401
                               ResNetBlock, WideBlock, WideResNet, resnet8, resnet8x4, resnet14,
                               resnet20, resnet32, resnet32x4, resnet44, resnet50, resnet56,
                               resnet110, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)
from kd.models.shufflenet import ShuffleNetV1, ShuffleNetV2, shufflev1, shufflev2  # noqa: F401
from kd.models.sizes import check_image_size, image_size_problem  # noqa: F401
from kd.models.summary import count_macs, count_parameters, model_table  # noqa: F401
from kd.models.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19  # noqa: F401
