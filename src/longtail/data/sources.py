"""Labelled image collections read from the on-disk formats of the supported datasets.

A :class:`Source` only knows how to load image ``i`` and its label; augmentation, subsetting
(long-tail sampling) and batching live elsewhere. Builders are registered in ``DATASETS`` under
the names users type (``cifar10``, ``fashion-mnist``, ``folder``, ...).
"""

from __future__ import annotations

import abc
import gzip
import json
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image

from longtail.errors import DataError, shown
from longtail.registry import Registry

SPLITS = ("train", "val", "test")

# Per-channel statistics in [0, 1] units. CIFAR values are the exact statistics of the training
# sets (the often-copied 0.2023/0.1994/0.2010 "std" is not the per-pixel std); Fashion-MNIST's
# were recomputed from the Debian package's train-images-idx3-ubyte.gz (0.28604, 0.35302).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Where Debian's dataset packages (dataset-fashion-mnist, ...) put their files.
SYSTEM_DATA = "/usr/share/datasets"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
)


class Source(abc.ABC):
    """An indexable labelled image collection, without transforms.

    Attributes:
        targets: Integer labels, shape (N,).
        classes: Class names; the index is the label.
        channels: 1 (grey) or 3 (RGB).
        mean: Per-channel normalisation mean in [0, 1] units.
        std: Per-channel normalisation std in [0, 1] units.
    """

    targets: np.ndarray
    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Symlinked folders that reading the source did not enter ("a/b -> target").
    skipped: list[str] = []  # replaced, never mutated

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @abc.abstractmethod
    def load(self, i: int) -> Image.Image | torch.Tensor:
        """Return image ``i`` (PIL image or uint8 (C, H, W) tensor)."""

    def check_files(self) -> None:  # noqa: B027 (in-memory sources have no files to check)
        """Raise DataError naming the first image that cannot be opened."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, classes={self.num_classes}, "
            f"channels={self.channels})"
        )

    def _check(self) -> None:
        """Validate the shared attributes after a subclass has filled them in."""
        self.targets = np.asarray(self.targets, dtype=np.int64).reshape(-1)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need {self.channels} value(s), one per channel; "
                f"got mean={self.mean}, std={self.std}"
            )
        if len(self.targets) and (
            self.targets.min() < 0 or self.targets.max() >= len(self.classes)
        ):
            raise DataError(
                f"labels must lie in 0..{len(self.classes) - 1} for {len(self.classes)} classes; "
                f"found {int(self.targets.min())}..{int(self.targets.max())}"
            )


class ArraySource(Source):
    """Images held in memory as one uint8 array.

    Args:
        images: uint8 array of shape (N, H, W) (grey) or (N, H, W, 3) (RGB).
        targets: Labels, one per image.
        classes: Class names.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"in-memory images must be uint8; got {images.dtype}")
        if images.ndim == 3:
            self.channels = 1
        elif images.ndim == 4 and images.shape[-1] == 3:
            self.channels = 3
        else:
            raise DataError(
                f"in-memory images must be (N, H, W) or (N, H, W, 3); got {images.shape}"
            )
        # torch refuses to share memory with read-only buffers (np.frombuffer), so own a copy.
        self.images = images if images.flags.writeable else images.copy()
        self.targets = np.asarray(targets)
        if len(self.targets) != len(images):
            raise DataError(f"{len(images)} images but {len(self.targets)} labels")
        self.classes = [str(c) for c in classes]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._check()

    def load(self, i: int) -> torch.Tensor:
        """Return image ``i`` as a uint8 (C, H, W) tensor."""
        img = torch.from_numpy(self.images[i])
        if self.channels == 1:
            return img.unsqueeze(0)
        return img.permute(2, 0, 1).contiguous()


class FileSource(Source):
    """Images stored as individual files, decoded with PIL as RGB.

    Args:
        root: Folder the paths are relative to.
        paths: Image paths relative to ``root``.
        targets: Labels, one per path.
        classes: Class names.
        mean: Per-channel normalisation mean (ImageNet statistics by default).
        std: Per-channel normalisation std (ImageNet statistics by default).
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.targets = np.asarray(targets)
        if len(self.targets) != len(self.paths):
            raise DataError(f"{len(self.paths)} image paths but {len(self.targets)} labels")
        self.classes = [str(c) for c in classes]
        self.channels = 3
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._check()

    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` fully, as RGB (:func:`decode_image`)."""
        return decode_image(self.root / self.paths[i], "RGB")

    def check_files(self) -> None:
        """Open every file's header (a few threads: the time is the disk's), so that a file
        that is no image stops the run before training; truncated files are found when they
        are decoded."""

        def header(rel: str) -> None:
            path = self.root / rel
            try:
                with Image.open(path):
                    pass
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(
                    f"cannot read image {shown(path.resolve())}: {reason}; fix or remove the file"
                ) from None

        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in pool.map(header, self.paths):
                pass


def decode_image(path: Path, mode: str) -> Image.Image:
    """The image file at ``path`` fully decoded, in ``mode`` ("RGB" or "L").

    16-bit images (PNG's ``I;16``, PIL's ``I``) are scaled to 8 bits (PIL's own conversion
    would clip them to white). A missing, corrupt or truncated file, and one over PIL's
    decompression-bomb limit, raise DataError naming it.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":
                scale = 1.0 if im.mode == "F" and float(np.asarray(im).max()) <= 1.0 else 1 / 257
                values = np.asarray(im, dtype=np.float64) * (255.0 if scale == 1.0 else scale)
                im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
            return im.convert(mode)
    except Image.DecompressionBombError as e:  # PIL: "Image size (N pixels) exceeds limit ..."
        size = str(e).split(" could be")[0].rstrip(",. ")
        raise DataError(
            f"cannot read image {shown(path.resolve())}: {size}, PIL's guard against "
            "decompression bombs; resize the image (or raise PIL.Image.MAX_IMAGE_PIXELS if you "
            "trust it)"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            reason = "no such file"
        else:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot read image {shown(path.resolve())}: {reason}; fix or remove the file"
        ) from None


Builder = Callable[..., Source]
DATASETS: Registry[Builder] = Registry("dataset")


def _data_home() -> Path:
    env = os.environ.get("LONGTAIL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longtail"


def system_root(name: str) -> Path:
    """Where a system package would hold dataset ``name``: ``$LONGTAIL_SYSTEM_DATA/<name>``,
    by default ``/usr/share/datasets/<name>`` (Debian's dataset-fashion-mnist)."""
    return Path(os.environ.get("LONGTAIL_SYSTEM_DATA") or SYSTEM_DATA).expanduser() / name


def default_root(name: str) -> Path:
    """Where dataset ``name`` is looked for when no root is given.

    ``$LONGTAIL_DATA/<name>`` if that variable is set, else ``~/.cache/longtail/<name>``;
    when that folder does not exist, the system package's folder (:func:`system_root`) if
    that one does.

    Args:
        name: A registered dataset name.

    Returns:
        The default root folder (which need not exist).
    """
    DATASETS.get(name)  # an unknown name is a ValueError listing the valid ones
    root = _data_home() / name
    if not root.exists() and system_root(name).is_dir():
        return system_root(name)
    return root


def _check_split(name: str, split: str, available: Sequence[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if split not in available:
        raise DataError(f"{name} has no {split!r} split; available: {', '.join(available)}")


def load_source(name: str, root: str | Path | None, split: str, **options: Any) -> Source:
    """Build the :class:`Source` for one split of a registered dataset.

    Args:
        name: Registered dataset name (see ``DATASETS.names()``).
        root: Dataset folder; None uses :func:`default_root` where the dataset has one.
        split: "train", "val" or "test".
        **options: Dataset-specific options (``files``, ``num_classes`` for list/json).

    Returns:
        The source for that split.
    """
    builder = DATASETS.get(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    path = Path(root).expanduser() if root is not None else None
    return builder(path, split, **options)


def subset(source: Source, indices: np.ndarray) -> Source:
    """Images ``indices`` of ``source`` as a source of their own (same classes)."""
    indices = np.asarray(indices, dtype=np.int64)
    targets = source.targets[indices]
    if isinstance(source, ArraySource):
        return ArraySource(source.images[indices], targets, source.classes, source.mean,
                           source.std)  # fmt: skip
    if isinstance(source, FileSource):
        paths = [source.paths[i] for i in indices]
        return FileSource(source.root, paths, targets, source.classes, source.mean, source.std)
    raise TypeError(f"cannot take a subset of a {type(source).__name__}")


def select_classes(source: Source, classes: Sequence[int | str] | None) -> Source:
    """The images of ``classes`` only (names or indices of ``source``'s classes), labelled
    0.. in the order given; ``source`` itself for None.

    Raises:
        ValueError: Naming a class the source does not have, or one given twice.
    """
    if classes is None:
        return source
    index = {name: i for i, name in enumerate(source.classes)}
    chosen = []
    for c in classes:
        i = c if isinstance(c, int) else index.get(c, -1)
        if not 0 <= i < source.num_classes:
            raise ValueError(
                f"classes: no class {c!r}; give names or indices 0..{source.num_classes - 1} "
                f"of {', '.join(source.classes[:5])}{', ...' if source.num_classes > 5 else ''}"
            )
        chosen.append(i)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"classes: a class is given twice in {list(classes)}")
    relabel = np.full(source.num_classes, -1, dtype=np.int64)
    relabel[chosen] = np.arange(len(chosen))
    keep = np.flatnonzero(relabel[source.targets] >= 0)
    targets, names = relabel[source.targets[keep]], [source.classes[i] for i in chosen]
    if isinstance(source, ArraySource):
        return ArraySource(source.images[keep], targets, names, source.mean, source.std)
    if isinstance(source, FileSource):
        paths = [source.paths[i] for i in keep]
        return FileSource(source.root, paths, targets, names, source.mean, source.std)
    raise TypeError(f"cannot select classes of a {type(source).__name__}")


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"dataset {name!r} takes no options; got {', '.join(sorted(options))}")


# --- CIFAR -----------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler limited to what the CIFAR python archives contain (dicts, lists, numpy arrays).

    The archives are pickles, so this refuses any other global rather than run arbitrary code
    from a file placed under the data root.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            # The real archives were written by Python 2; "bytes" keeps their str keys as bytes.
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(
            f"cannot read CIFAR batch {shown(path)}: {e}; re-download the dataset"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {shown(path)} is not a dict; re-download the dataset")
    return obj


def _field(batch: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"CIFAR batch {shown(path)} lacks the {key!r} entry; re-download the dataset")


def _cifar_dir(name: str, root: Path | None, folder: str, marker: str) -> Path:
    root = root if root is not None else default_root(name)
    for cand in (root / folder, root):
        if (cand / marker).is_file():
            return cand
    raise DataError(
        f"{name} not found under {shown(root)} (expected {shown(folder)}/{marker}); run "
        f"`longtail data download {name} --root {shown(root)}` or extract the python-version "
        f"archive's {shown(folder)}/ folder there"
    )


def _cifar_source(
    name: str,
    folder: Path,
    files: list[str],
    meta: str,
    names_key: str,
    labels_key: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ArraySource:
    datas, labels = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DataError(
                f"missing CIFAR file {shown(path)}; run `longtail data download {name} "
                f"--root {folder.parent}` or re-extract the archive"
            )
        batch = _read_pickle(path)
        data = np.asarray(_field(batch, "data", path), dtype=np.uint8)
        lab = np.asarray(_field(batch, labels_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
            raise DataError(
                f"CIFAR batch {shown(path)} has data of shape {data.shape} and {len(lab)} labels; "
                "expected N x 3072 and N labels"
            )
        datas.append(data)
        labels.append(lab)
    meta_path = folder / meta
    if not meta_path.is_file():
        raise DataError(f"missing CIFAR file {meta_path}; re-extract the archive")
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _field(_read_pickle(meta_path), names_key, meta_path)
    ]
    # Rows are channel-major (1024 R, then G, then B, each row-major 32x32); store as NHWC.
    images = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArraySource(np.ascontiguousarray(images), np.concatenate(labels), names, mean, std)


@DATASETS.register("cifar10")
def _cifar10(root: Path | None, split: str, **options: Any) -> Source:
    _no_options("cifar10", options)
    _check_split("cifar10", split, ("train", "test"))
    folder = _cifar_dir("cifar10", root, "cifar-10-batches-py", "batches.meta")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar_source(
        "cifar10", folder, files, "batches.meta", "label_names", "labels", CIFAR10_MEAN, CIFAR10_STD
    )


@DATASETS.register("cifar100")
def _cifar100(root: Path | None, split: str, **options: Any) -> Source:
    _no_options("cifar100", options)
    _check_split("cifar100", split, ("train", "test"))
    folder = _cifar_dir("cifar100", root, "cifar-100-python", "meta")
    return _cifar_source(
        "cifar100",
        folder,
        [split],
        "meta",
        "fine_label_names",
        "fine_labels",
        CIFAR100_MEAN,
        CIFAR100_STD,
    )


# --- Fashion-MNIST ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip-compressed.

    Args:
        path: The ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        The array with the shape stored in the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(
            f"cannot read idx file {shown(path)}: {e}; re-download the dataset"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{shown(path)} is not an idx file (bad header); re-download the dataset")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"idx file {shown(path)} is truncated or corrupt; re-download the dataset")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find_idx(dirs: Sequence[Path], stem: str) -> Path | None:
    for d in dirs:
        for cand in (d / stem, d / f"{stem}.gz"):
            if cand.is_file():
                return cand
    return None


@DATASETS.register("fashion-mnist")
def _fashion_mnist(root: Path | None, split: str, **options: Any) -> Source:
    _no_options("fashion-mnist", options)
    _check_split("fashion-mnist", split, ("train", "test"))
    root = root if root is not None else default_root("fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    # Accept the plain layout (Debian package, original release) and torchvision's.
    dirs = [root, root / "FashionMNIST" / "raw"]
    images_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise DataError(
            f"Fashion-MNIST {split} files not found under {shown(root)}; run "
            "`apt-get install dataset-fashion-mnist` or "
            f"`longtail data download fashion-mnist --root {shown(root)}`"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path} / {labels_path} do not hold N x H x W images and N labels")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; re-download the dataset"
        )
    return ArraySource(
        images,
        labels.astype(np.int64),
        FASHION_MNIST_CLASSES,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
    )


# --- Image files -----------------------------------------------------------------------------


# Kernel views that look like folders: walking them reads no images and may never end.
SPECIAL_TREES = ("/proc", "/sys", "/dev")


def check_plain_tree(folder: Path) -> None:
    """Refuse a folder that is a view of the kernel rather than of files (``/proc/self``)."""
    real = str(folder.resolve())
    if any(real == t or real.startswith(t + "/") for t in SPECIAL_TREES):
        raise DataError(
            f"{shown(folder)} is not a folder of image files (it lies in {real.split('/')[1]!r}, "
            "a view of the system); give the folder of your images"
        )


def walk_images(folder: Path, extensions: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Image files under ``folder`` (sorted) and the symlinked folders skipped.

    A folder inside the tree that is a symbolic link is not entered: one that points back
    into the tree (``c0/up -> ..``) would repeat its images, relabelled, forever; one that
    points out of it takes images from elsewhere. Symlinked files are read.
    """
    exts = {e.lower() for e in extensions}
    files: list[Path] = []
    skipped: list[str] = []
    for here, dirs, names in os.walk(folder, followlinks=False):
        base = Path(here)
        for d in sorted(dirs):
            if (base / d).is_symlink():
                skipped.append(f"{(base / d).relative_to(folder)} -> {os.readlink(base / d)}")
        dirs[:] = sorted(d for d in dirs if not (base / d).is_symlink())
        files += [
            base / n for n in names if Path(n).suffix.lower() in exts and (base / n).is_file()
        ]
    return sorted(files), skipped


def _class_dirs(folder: Path) -> list[str]:
    """Class folders: the real (not symlinked) folders of ``folder``."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


def _image_folder(root: Path, folder: Path, classes: list[str]) -> FileSource:
    """ImageFolder layout: ``folder/<class>/**/<image>``; paths are stored relative to root."""
    found: list[tuple[Path, int]] = []
    skipped = [
        f"{p.relative_to(root)} -> {os.readlink(p)}"
        for p in sorted(folder.iterdir())
        if p.is_symlink() and p.is_dir()
    ]
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            files, links = walk_images(folder / name, IMAGE_EXTENSIONS)
            found += [(f, label) for f in files]
            skipped += [f"{(folder / name).relative_to(root)}/{x}" for x in links]
    if not found:
        raise DataError(
            f"no images found in {shown(folder)}; expected {shown(folder)}/<class_name>/<image> "
            "files with "
            f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    paths = [Path(p).relative_to(root).as_posix() for p, _ in found]
    targets = np.asarray([label for _, label in found], dtype=np.int64)
    source = FileSource(root, paths, targets, classes)
    source.skipped = skipped
    return source


@DATASETS.register("folder")
def _folder(root: Path | None, split: str, **options: Any) -> Source:
    """``root/<split>/<class>/**/<image>``; a tree with no split folder is the train split."""
    _no_options("folder", options)
    if root is None:
        raise ValueError("dataset 'folder' needs root: the folder holding train/<class>/<image>")
    if not root.is_dir():
        raise DataError(
            f"image folder {shown(root)} does not exist; give the folder of your images"
        )
    check_plain_tree(root)
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:  # a plain <class>/<image> tree: one split, the training set
        if not _class_dirs(root):
            raise DataError(
                f"{shown(root)} has no class folders; arrange images as "
                f"{shown(root)}/train/<class_name>/"
                "<image> (and test/<class_name>/<image> for evaluation)"
            )
        _check_split(f"folder {root}", split, ["train"])
        return _image_folder(root, root, _class_dirs(root))
    _check_split(f"folder {root}", split, present)
    # Union over splits so that a class missing from one split keeps the same label everywhere.
    classes = sorted({c for s in present for c in _class_dirs(root / s)})
    return _image_folder(root, root / split, classes)


def _resolve_file(path: str | Path, root: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None and (root / p).is_file():
        return root / p
    return p


def _split_file(name: str, files: Any, split: str, root: Path | None) -> Path:
    if not isinstance(files, dict) or not files:
        raise ValueError(
            f"dataset {name!r} needs option files={{split: path}}, e.g. "
            f"files={{'train': 'ImageNet_LT_train.txt', 'test': 'ImageNet_LT_test.txt'}}"
        )
    _check_split(name, split, [s for s in SPLITS if s in files])
    path = _resolve_file(files[split], root)
    if not path.is_file():
        tried = f"{root / path} nor {path}" if root is not None and not path.is_absolute() else path
        raise DataError(
            f"the {split} file of dataset {name!r} does not exist (neither {tried}); "
            "check data.files and data.root"
        )
    return path


def _num_classes(labels: np.ndarray, given: int | None, declared: int | None, path: Path) -> int:
    top = int(labels.max()) + 1 if len(labels) else 0
    k = given if given is not None else declared if declared is not None else top
    if top > k:
        whose = "the file's own" if given is None else "that of the train split"
        raise DataError(
            f"{shown(path)} has label {top - 1} but num_classes is {k} ({whose}); fix the label, "
            "or "
            "add training images of that class"
        )
    return int(k)


def read_list_file(path: str | Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Parse a ``relative/path label`` list file (ImageNet-LT / Places-LT style).

    Args:
        path: The text file.

    Returns:
        The image paths, their integer labels and the line number of each.
    """
    path = Path(path)
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read list file {shown(path)}: {e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # paths may contain spaces; the label is the last field
        try:
            label = int(parts[1])
            if label < 0:
                raise ValueError
        except (IndexError, ValueError):
            raise DataError(
                f"{shown(path)}:{lineno}: expected 'relative/path label' with a label >= 0, got "
                f"{line!r}"
            ) from None
        paths.append(parts[0])
        labels.append(label)
        lines.append(lineno)
    return paths, np.asarray(labels, dtype=np.int64), lines


def _check_listed_files(root: Path, paths: Sequence[str], where: Callable[[int], str]) -> None:
    """Every listed image must exist, once: fail before training, naming the entry."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        if p in first:
            raise DataError(
                f"{where(i)}: {shown(p)} is listed twice (also {where(first[p])}); remove one entry"
            )
        first[p] = i
        if not (root / p).is_file():
            raise DataError(
                f"{where(i)}: image {shown(p)} not found under {shown(root)}; fix the entry or "
                "the data root"
            )


@DATASETS.register("list")
def _list(
    root: Path | None,
    split: str,
    *,
    files: dict[str, str] | None = None,
    num_classes: int | None = None,
) -> Source:
    path = _split_file("list", files, split, root)
    paths, labels, lines = read_list_file(path)
    k = _num_classes(labels, num_classes, None, path)
    base = root if root is not None else path.parent
    _check_listed_files(base, paths, lambda i: f"{path}:{lines[i]}")
    return FileSource(base, paths, labels, [str(i) for i in range(k)])


def read_json_annotations(path: str | Path) -> tuple[list[str], np.ndarray, int | None, dict]:
    """Parse a JSON annotation file ``{"annotations": [{"fpath", "category_id"}], ...}``.

    Args:
        path: The JSON file.

    Returns:
        Image paths, labels, the declared ``num_classes`` (or None) and ``{id: name}`` from an
        optional ``categories`` list.
    """
    path = Path(path)

    def whole(value: Any, what: str) -> int:
        """A JSON integer (1.0 too), else a DataError naming the field: 1.7 is no class."""
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not float(value).is_integer():
            raise DataError(f"{shown(path)}: {what} must be an integer, got {value!r}")
        return int(value)

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        anns = doc["annotations"]
        paths = [str(a["fpath"]) for a in anns]
        labels = np.asarray(
            [whole(a["category_id"], f"annotation {i}'s category_id") for i, a in enumerate(anns)],
            dtype=np.int64,
        )
        declared = doc.get("num_classes")
        if declared is not None:
            declared = whole(declared, "num_classes")
        names = {
            whole(c["id"], "a category's id"): str(c["name"])
            for c in doc.get("categories", [])
            if "name" in c
        }
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read annotation file {shown(path)}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{shown(path)} is not an annotation file: expected {{'annotations': "
            f"[{{'fpath': ..., 'category_id': ...}}], 'num_classes': K}} (missing {e})"
        ) from None
    if len(labels) and labels.min() < 0:
        raise DataError(f"{shown(path)} has a negative category_id; labels must be 0..K-1")
    return paths, labels, declared, names


@DATASETS.register("json")
def _json(
    root: Path | None,
    split: str,
    *,
    files: dict[str, str] | None = None,
    num_classes: int | None = None,
) -> Source:
    path = _split_file("json", files, split, root)
    paths, labels, declared, names = read_json_annotations(path)
    k = _num_classes(labels, num_classes, declared, path)
    base = root if root is not None else path.parent
    _check_listed_files(base, paths, lambda i: f"{path} annotation {i}")
    return FileSource(base, paths, labels, [names.get(i, str(i)) for i in range(k)])


def dataset_for_path(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """The dataset settings that read the images at ``path`` (for ``longtail data stats PATH``).

    Args:
        path: An image folder (``<split>/<class>/`` or ``<class>/`` inside), a ``.txt`` list
            file or a ``.json`` annotation file; the file becomes the train split.
        root: Folder that image paths in list/JSON files are relative to (default: the
            file's folder).

    Returns:
        ``{"dataset", "root", "files"}``, the keys of the config's ``data`` section.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        check_plain_tree(p)
        return {"dataset": "folder", "root": str(p), "files": {}}
    if not p.exists():
        raise DataError(
            f"{shown(p)} does not exist; give an image folder, a .txt list or a .json file"
        )
    kind = {".txt": "list", ".json": "json"}.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"cannot tell the format of {shown(p)}; give an image folder, a .txt or a .json file"
        )
    base = Path(root).expanduser() if root is not None else p.parent
    return {"dataset": kind, "root": str(base), "files": {"train": str(p)}}


_DOWNLOADERS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "fashion-mnist": "FashionMNIST"}
#: Datasets that :func:`download` can fetch.
DOWNLOADABLE = tuple(sorted(_DOWNLOADERS))


def download(name: str, root: str | Path) -> Path:
    """Download a dataset with ``torchvision.datasets`` into ``root`` (needs internet).

    Args:
        name: One of cifar10, cifar100, fashion-mnist.
        root: Target folder; created if missing.

    Returns:
        The root, ready to pass to :func:`load_source`.
    """
    if name not in _DOWNLOADERS:
        raise ValueError(f"cannot download {name!r}; downloadable: {', '.join(DOWNLOADABLE)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, _DOWNLOADERS[name])
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"downloading {name} into {shown(root)} failed: {reason}") from None
    return root
