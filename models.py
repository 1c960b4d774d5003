"""The models, by name: TeacherNet ('resnet18', a ResNet-18 for 32x32 images) and StudentNet
('cnn', a compact CNN), with the model registry's public names.

    from models import TeacherNet, StudentNet, build_model
    model = build_model('resnet8x4', num_classes=100)

The zoo lives in kd/models/ (registry.py, a file per family); `register_model(name, points=...)`
adds a model of your own, and registry.py's docstring says how feature points are named.
"""
from kd.models import (BN_BEFORE_RELU, MODELS, POINTS, AirbenchNet, BasicBlock,  # noqa: F401
                       Classifier, CifarResNet, MobileNetV2, ShuffleNetV1, ShuffleNetV2,
                       StudentNet, TeacherNet, VGG, WideResNet, airbench94, airbench94_small,
                       bn_before_relu, build_model, count_macs, count_parameters,
                       feature_points, mobilenetv2, model_names, model_table, register_model,
                       resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                       resnet50, resnet56, resnet110, shufflev1, shufflev2, vgg8, vgg11, vgg13,
                       vgg16, vgg19, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)
