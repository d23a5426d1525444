"""The model zoo: one builder per served model name.

Every model takes normalised NCHW float tensors and returns logits over 10 classes.
"""
import torch
from torch import nn
from torchvision.models import resnet18


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with the modern substitutions: ReLU, max-pooling,
    BatchNorm. 28x28 input padded to 32x32 by the first convolution, as in the paper."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 6x14x14
            nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16x5x5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNetMNIST(nn.Module):
    """AlexNet's shape scaled to 28x28 digits: five 3x3 convolutions (BatchNorm, ReLU),
    three max-pools, and a three-layer classifier with dropout."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(1, 32), nn.MaxPool2d(2),  # 32x14x14
            *conv(32, 64), nn.MaxPool2d(2),  # 64x7x7
            *conv(64, 96), *conv(96, 96), *conv(96, 64), nn.MaxPool2d(2),  # 64x3x3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5), nn.Linear(64 * 3 * 3, 256), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(256, 256), nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32: a 3x3 stride-1 stem and no max-pool."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# served model name -> its builder (its data set: catalog.MODEL_DATASETS)
MODELS = {"mnist_lenet5": LeNet5, "mnist_alexnet": AlexNetMNIST, "cifar10_resnet18": resnet18_cifar}


def build_model(name: str) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]()


def load_weights(name: str, path) -> nn.Module:
    """Build `name` and load a shipped state dict (stored in fp16/bf16 or fp32) as fp32, eval mode."""
    model = build_model(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
