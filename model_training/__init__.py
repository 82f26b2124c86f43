"""Training, evaluation, explanation and export of HER2 tile classifiers (the ``[train]`` extra).

Only this package imports torch; the worker runs the exported ONNX model.
"""

#: The tiny default CNN and the six torchvision architectures of the seeds' studies.
ARCHITECTURES = ("tiny", "alexnet", "vgg16", "resnet34", "densenet121", "inception_v3", "swin_t")
