"""airbench94's network (Jordan, arXiv 2404.00498), the fast recipe's teacher and student."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.models.registry import Classifier, register_model, stage_points

# airbench94's network (Jordan, arXiv 2404.00498): a patch-whitening 2x2 convolution, then three
# groups of two 3x3 convolutions with max-pooling between the first convolution and its BatchNorm,
# GELU, and a bias-free classifier whose logits are scaled by 1/9. Trained by the `fast` recipe,
# which initialises the whitening layer from data (init_whitening) and freezes the BatchNorm
# scales (freeze_norm_scales); under any other recipe they train as ordinary layers.

# the 2x2 whitening takes one pixel off, then three max-pools of 2 halve it: 9 -> 8 -> 1x1
AIRBENCH_MIN_SIZE = 9


def fast_batchnorm(num_features, momentum=0.4, eps=1e-12):
    """A BatchNorm2d with fast running statistics: each batch moves them by 40% (momentum 0.4 in
    PyTorch's convention), so the few hundred steps of a short run end with statistics of the
    final weights. (A plain BatchNorm2d: it folds into its convolution and converts to
    SyncBatchNorm as any.) The fast recipe also freezes its scale (freeze_norm_scales)."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


class AirbenchGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU; both convolutions start
    as the identity on their first in_channels filters (dirac), the rest as PyTorch's default."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = fast_batchnorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = fast_batchnorm(out_channels)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94's network; `widths` are the three groups' channels (64, 256, 256 in the paper).

    32x32 input -> whitening 2x2 conv (24 channels, no padding: 31x31) -> GELU -> groups at
    31x31, 15x15, 7x7 -> global max-pool (3x3 here) -> linear (no bias) -> logits / 9.
    """

    WHITENING_EPS = 5e-4  # added to the patch covariance's eigenvalues (noise-free directions)

    def __init__(self, num_classes=10, widths=(64, 256, 256)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2 x (3 channels x 2 x 2 patch values)
        groups, in_channels = [], 24
        for width in widths:
            groups.append(AirbenchGroup(in_channels, width))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.classifier = Classifier(in_channels, num_classes, bias=False)
        self.logit_scale = 1 / 9

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        # scaling the features is scaling the logits (no bias), and the classifier's output
        # stays the logits, computed in float32
        # the paper's max-pool 3 takes the whole 3x3 map of a 32x32 input; the global maximum
        # is the same there and runs at any size
        return self.classifier(F.adaptive_max_pool2d(x, 1).flatten(1) * self.logit_scale)

    def feature_points(self):
        groups = [f'groups.{i}' for i in range(len(self.groups))]
        return stage_points(groups, [f'{g}.norm2' for g in groups], 'groups.0:in',
                            'classifier:in')

    def bn_before_relu(self):
        # the pre-activation points are these BNs; the activation after them is a GELU, which
        # OFD's margins (the mean of the negative side a ReLU zeroes) only approximate
        return {f'stage{i}_pre': f'groups.{i - 1}.norm2' for i in range(1, len(self.groups) + 1)}

    def freeze_norm_scales(self):
        """Keep every BatchNorm's scale at its value (1 from the start): only the biases train,
        as in airbench94 (the fast recipe calls this; the parameter groups then give those
        biases their own learning rate)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)

    @torch.no_grad()
    def init_whitening(self, images, chunk=500):
        """Make the first layer whiten 2x2 patches of `images` (N x 3 x 32 x 32, normalized) and
        freeze its filters (its bias stays trainable).

        With Sigma the covariance of the images' 2x2 patches (12 values) and Sigma = V diag(l) V^T,
        the 12 filters V^T / sqrt(l + eps) map the patches to coordinates whose covariance is the
        identity (up to eps); the other 12 filters are their negatives, so the GELU that follows
        passes both signs.
        """
        total = torch.zeros(12, dtype=torch.float64)
        outer = torch.zeros(12, 12, dtype=torch.float64)
        count = 0
        for start in range(0, len(images), chunk):
            patches = F.unfold(images[start:start + chunk].float(), 2)  # N x 12 x 31*31
            flat = patches.transpose(1, 2).reshape(-1, 12).double().cpu()
            total += flat.sum(0)
            outer += flat.T @ flat
            count += len(flat)
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / torch.sqrt(eigenvalues + self.WHITENING_EPS)).T
        weight = torch.cat([filters, -filters]).reshape(self.whiten.weight.shape)
        self.whiten.weight.copy_(weight.to(self.whiten.weight.dtype))
        self.whiten.weight.requires_grad_(False)


@register_model('airbench94', min_size=AIRBENCH_MIN_SIZE)
def airbench94(num_classes=10):
    """airbench94's network (64/256/256 channels), the fast recipe's teacher: 1.97M parameters."""
    return AirbenchNet(num_classes, (64, 256, 256))


@register_model('airbench94_small', min_size=AIRBENCH_MIN_SIZE)
def airbench94_small(num_classes=10):
    """The same family at 32/64/64 channels, the fast recipe's student."""
    return AirbenchNet(num_classes, (32, 64, 64))

