"""Real data, read offline: Fashion-MNIST (IDX files of Debian's ``dataset-fashion-mnist``) for
classification, and the photographs inside scikit-image for x2 super-resolution.

- :mod:`repq_fx.data.fashion_mnist`: :func:`~repq_fx.data.fashion_mnist.read_idx`,
  :func:`~repq_fx.data.fashion_mnist.load_fashion_mnist`, the
  :class:`~repq_fx.data.fashion_mnist.FashionMNIST` dataset and
  :func:`~repq_fx.data.fashion_mnist.fashion_mnist_loader`.
- :mod:`repq_fx.data.sr`: bicubic degradation, Y-channel PSNR, random training patches and whole
  test images (:func:`~repq_fx.data.sr.sr_loader`).

Nothing here downloads anything; a missing data set raises
:class:`repq_fx.errors.DatasetNotFoundError` with the command that installs it.
"""
