"""resnet-deploy: train, convert and benchmark Keras ResNets on CIFAR-10 for deployment.

Importing the package is cheap on purpose: TensorFlow, Keras and the runtimes are imported
inside the functions that need them, so ``resnet-deploy --help`` answers instantly.
"""

__version__ = "0.1.0"
