"""Real data, read offline: Fashion-MNIST (IDX files of Debian's ``dataset-fashion-mnist``) for
classification, the photographs inside scikit-image for x2 super-resolution, and the user's own
image folders for either.

- :mod:`repq_fx.app.data.fashion_mnist`: :func:`~repq_fx.app.data.fashion_mnist.read_idx`,
  :func:`~repq_fx.app.data.fashion_mnist.load_fashion_mnist`, the
  :class:`~repq_fx.app.data.fashion_mnist.FashionMNIST` dataset and
  :func:`~repq_fx.app.data.fashion_mnist.fashion_mnist_loader`.
- :mod:`repq_fx.app.data.sr`: bicubic degradation, Y-channel PSNR, random training patches and whole
  test images (:func:`~repq_fx.app.data.sr.sr_loader`).
- the user's own folders: :mod:`repq_fx.app.data.imagefolder` (``imagefolder:DIR``, torchvision's
  ``ImageFolder`` layout and timm's basic transforms) and :mod:`repq_fx.app.data.srfolder`
  (``srfolder:DIR``, photographs for super-resolution), read by :mod:`repq_fx.app.data.folders`
  (one-line errors naming the file, also from ``DataLoader`` workers).
- :mod:`repq_fx.app.data.kinds`: the table of what ``--data`` may name, each kind's datasets and loaders.

Nothing here downloads anything; a missing data set raises
:class:`repq_fx.errors.DatasetNotFoundError` with the command that installs it (or the folder it looked for).
"""
