"""Architecture names, importable without torch (for the CLI's --help)."""

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_v2_s", "mobilenet_v3_large")
TIMM_ARCHS = {"efficientnet_lite0": "tf_efficientnet_lite0"}
ARCHS = TORCHVISION_ARCHS + tuple(TIMM_ARCHS)
