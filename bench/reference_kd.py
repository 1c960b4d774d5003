"""The reference way of training the students, as one whole process: the baseline that
bench/cli_bench.py times main.py against. A benchmark tool, not a feature of the package.

    python bench/reference_kd.py --teacher-checkpoint best_teacher.pth --out-dir ref \\
        [--data-dir ./data] [--epochs 1] [--subset N] [--seed 0] [--device auto]

It reproduces how the code this project replaces trained the students: fp32, NCHW;
torchvision.datasets.CIFAR10 + PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize) + DataLoader(batch_size=128, shuffle=True, num_workers=2) for training, and
the same without augmentation, in order, for the test set; SGD (lr 0.1, momentum 0.9, weight
decay 5e-4) with cosine annealing over the epochs (stepped once per epoch). First a KD student
is trained for --epochs epochs (teacher forward under torch.no_grad(); loss
alpha*CE + (1-alpha)*T^2*KL with T=4, alpha=0.1), then a baseline student with plain CE. After
every epoch each student is evaluated on the test set and, when its accuracy is the best so far,
saved (the reference selected its checkpoint on the test set), as best_student_kd.pth and
best_student_base.pth in --out-dir. --subset N takes the first N training and the first N test
images (torch.utils.data.Subset). Prints one line per epoch and the total wall time.
"""
import argparse
import os
import sys
import time

START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as transforms  # noqa: E402

from kd.models import StudentNet, TeacherNet  # noqa: E402

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TEMPERATURE = 4.0
ALPHA = 0.1


class CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 without its md5 checks, which refuse re-encoded copies of the python
    release and the tests' tiny files (same format, other bytes). The files must still exist;
    reading, __getitem__ and the PIL transforms are torchvision's."""

    def _check_integrity(self):
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)

    def _load_meta(self):  # the class names are not used here
        self.classes = [str(i) for i in range(10)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default='./data',
                   help='folder holding cifar-10-batches-py (default: ./data)')
    p.add_argument('--out-dir', default='.', help='where best_student_*.pth go (default: .)')
    p.add_argument('--teacher-checkpoint', required=True, help='TeacherNet state_dict')
    p.add_argument('--epochs', type=int, default=1, help='epochs per student (default: 1)')
    p.add_argument('--subset', type=int, default=None, metavar='N',
                   help='first N training and first N test images (default: all)')
    p.add_argument('--seed', type=int, default=0, help='torch.manual_seed (default: 0)')
    p.add_argument('--device', default='auto',
                   help="auto (cuda when available, as the reference did), cpu or cuda "
                        "(default: auto)")
    return p.parse_args(argv)


def loaders(data_dir, subset):
    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    trainset = CIFAR10(root=data_dir, train=True, download=False, transform=train_tf)
    testset = CIFAR10(root=data_dir, train=False, download=False, transform=test_tf)
    if subset:
        trainset = torch.utils.data.Subset(trainset, range(min(subset, len(trainset))))
        testset = torch.utils.data.Subset(testset, range(min(subset, len(testset))))
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=128, shuffle=True,
                                              num_workers=2)
    testloader = torch.utils.data.DataLoader(testset, batch_size=128, shuffle=False,
                                             num_workers=2)
    return trainloader, testloader


def distillation_loss(student_logits, teacher_logits, labels, temperature=TEMPERATURE,
                      alpha=ALPHA):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1),
                    reduction='batchmean') * temperature * temperature
    return alpha * F.cross_entropy(student_logits, labels) + (1 - alpha) * soft


def evaluate(model, testloader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            predicted = model(images).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100.0 * correct / total


def train_student(name, student, teacher, trainloader, testloader, epochs, device, path):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    criterion = nn.CrossEntropyLoss()
    best = -1.0
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        student.train()
        loss_sum = seen = correct = 0
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = student(images)
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(images)
                loss = distillation_loss(outputs, teacher_outputs, labels)
            else:
                loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.size(0)
            seen += labels.size(0)
            correct += (outputs.argmax(1) == labels).sum().item()
        scheduler.step()
        acc = evaluate(student, testloader, device)
        if acc > best:
            best = acc
            torch.save(student.state_dict(), path)
        print(f'[{name}] epoch {epoch}/{epochs}  loss {loss_sum / seen:.4f}  '
              f'train acc {100.0 * correct / seen:6.2f}  test acc {acc:6.2f}  best {best:6.2f}  '
              f'{time.time() - t0:.1f}s', flush=True)
    return best


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu')
                          if args.device == 'auto' else args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    trainloader, testloader = loaders(args.data_dir, args.subset)

    teacher = TeacherNet().to(device)
    state = torch.load(args.teacher_checkpoint, map_location=device, weights_only=True)
    teacher.load_state_dict(state)
    teacher.eval()

    best_kd = train_student('kd', StudentNet().to(device), teacher, trainloader, testloader,
                            args.epochs, device, os.path.join(args.out_dir, 'best_student_kd.pth'))
    best_base = train_student('base', StudentNet().to(device), None, trainloader, testloader,
                              args.epochs, device,
                              os.path.join(args.out_dir, 'best_student_base.pth'))
    print(f'best test acc: KD {best_kd:.2f}, baseline {best_base:.2f}; {len(trainloader.dataset)} '
          f'training / {len(testloader.dataset)} test images on {device}')
    print(f'total wall time {time.time() - START:.1f}s', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
