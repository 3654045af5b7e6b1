"""The paper's networks: pre-act ResNet-110/164, WRN-16-8/22-10/28-10, pre-act ResNet-50."""
from .networks import PreActBasicBlock, PreActBottleneck, PreActResNet, preact_resnet, preact_resnet50, wide_resnet

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "preact_resnet", "preact_resnet50",
           "wide_resnet"]
