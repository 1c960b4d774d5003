"""CIFAR-10 loaders and the distillation loss, under the names notebooks import:

    from utils import get_cifar10_loaders, kd_loss
    train_loader, test_loader = get_cifar10_loaders(batch_size=128, data_dir='./data')

kd_loss = alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)), the KL averaged
per sample: alpha weights the hard labels. The readers live in kd/data/, the loss with the other
methods in kd/methods/.
"""
from kd.data.datasets import DataError  # noqa: F401
from kd.data.loader import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, FOLDER, TEST_FILES,  # noqa: F401
                            Batch, CifarLoader, ensure_cifar10, find_cifar10_folder,
                            get_cifar10_loaders, load_cifar10, make_loaders, read_cifar_batch,
                            TRAIN_FILES, split_train_val)
from kd.methods.plain_kd import kd_loss, kd_loss_terms  # noqa: F401
