"""The reference recipe: the benchmark tables' (RepDistiller train_student.py / mdistiller
engine/cfg.py, CIFAR-100), for comparing with the published numbers."""
from kd.recipes.base import Recipe, register_recipe

# batch 64, lr 0.05 (their MobileNet / ShuffleNet students use 0.01: --lr 0.01), plain momentum
# 0.9, weight decay 5e-4, 240 epochs, lr x 0.1 from epochs 150, 180 and 210 (their 1-based
# "epoch > 150" is the 0-based epoch 150 on)
REFERENCE = register_recipe(Recipe(
    name='reference', epochs=240, batch_size=64, lr=0.05, nesterov=False, schedule='multistep',
    milestones=(150, 180, 210), lr_decay=0.1, teacher_arch='resnet32x4', student_arch='resnet8x4'))
