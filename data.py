"""
The data every stage shares: uint8 images (N, H, W, 3) in memory, scaled to [-1, 1] only when
batched. Read from the top: CIFAR-10 (downloaded once, md5-checked, read by a safe unpickler), the
offline `shapes` set, folders of images, batches, pictures.
"""
import json
import math
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from runs import UserError, atomic_save, file_digest

# -----------------------------------------------------------------------------
# Data: uint8 images (N, H, W, 3) in memory, scaled to [-1, 1] only when batched

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
SHAPES_SEED = 0
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# A dataset in memory: images (N, H, W, 3) uint8, labels (N,) int64, class names, a description.
ImageData = namedtuple("ImageData", "images labels class_names description")

def download(url, path, expected_digest, algorithm="md5"):
    """Download url to path through a temp file; refuse a wrong digest (or prefix of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {path.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    bar.update(f.write(chunk))
        if not file_digest(tmp, algorithm).startswith(expected_digest):
            raise UserError(f"the download of {url} has the wrong {algorithm} (expected "
                            f"{expected_digest}): it is corrupt or truncated; try again")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(f"could not download {url} ({e}); download it by hand and put it at {path}")
    finally:
        tmp.unlink(missing_ok=True)
    return path

class BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch and nothing else: dicts, lists, bytes, numbers and plain numpy arrays.
    Any other class (a crafted file's __reduce__ payload: os.system, eval, ...) is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}   # encode: bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)

def load_cifar10(data_dir, split):
    """CIFAR-10 read from the md5-checked archive (downloaded once) by the safe unpickler."""
    archive = Path(data_dir) / "cifar-10-python.tar.gz"
    if not archive.exists():
        download(CIFAR_URL, archive, CIFAR_MD5)
    elif file_digest(archive, "md5") != CIFAR_MD5:
        raise UserError(f"{archive} has the wrong md5 (expected {CIFAR_MD5}): it is corrupt or "
                        f"truncated; delete it and run again to download it")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            def read(name):
                member = tar.extractfile(f"cifar-10-batches-py/{name}")
                return BatchUnpickler(member, encoding="bytes").load()
            batches = [read(n) for n in names]
            meta = read("batches.meta")
        images = np.concatenate([b[b"data"] for b in batches]).astype(np.uint8)
        images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)          # (N, H, W, 3)
        labels = np.concatenate([b[b"labels"] for b in batches]).astype(np.int64)
        classes = [c.decode() for c in meta[b"label_names"]]
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, OSError, KeyError, ValueError,
            TypeError, AttributeError) as e:
        raise UserError(f"{archive} does not hold readable CIFAR-10 batches "
                        f"({e.__class__.__name__}: {e})")
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                     classes, f"cifar10/{split}")

def _regular(n, r=1.0, phase=0.0):
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)

def _heart():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([16 * np.sin(t) ** 3, -y - 2.5], 1) / 16.5

# Each class: polygons around (0, 0) with radius about 1, drawn in order: (points, fill 255 or 0).
SHAPE_POLYGONS = {
    "circle": [(_regular(64), 255)],
    "ring": [(_regular(64), 255), (_regular(64, 0.55), 0)],
    "triangle": [(_regular(3, phase=-np.pi / 2), 255)],
    "square": [(_regular(4, phase=np.pi / 4), 255)],
    "pentagon": [(_regular(5, phase=-np.pi / 2), 255)],
    "star": [(_regular(10, phase=-np.pi / 2) * ([[1], [0.45]] * 5), 255)],
    "cross": [(np.array([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                         (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]), 255)],
    "bar": [(np.array([(-1, -.28), (1, -.28), (1, .28), (-1, .28)]), 255)],
    "arrow": [(np.array([(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22),
                         (-1, .22)]), 255)],
    "heart": [(_heart(), 255)],
}
SHAPES_CLASSES = tuple(SHAPE_POLYGONS)

def make_shapes(n, seed, size=32, supersample=4):
    """A deterministic, class-balanced set of n anti-aliased shapes: (images uint8 NHWC, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    big = size * supersample
    # Per image: radius, centre, rotation, foreground colour and a two-colour gradient background.
    radius = rng.uniform(0.3, 0.48, n) * big
    centre = rng.uniform(0, 1, (n, 2)) * (big - 2 * radius[:, None]) + radius[:, None]
    angle = rng.uniform(0, 2 * np.pi, n)
    bg = rng.uniform(0, 1, (n, 2, 3))
    fg = rng.uniform(0, 1, (n, 3))
    direction = rng.uniform(0, 2 * np.pi, n)
    lum = np.array([0.299, 0.587, 0.114])
    for _ in range(3):  # keep the shape visible: move a colour too close to its background
        low_contrast = np.abs(fg @ lum - bg.mean(1) @ lum) < 0.2
        fg[low_contrast] = (fg[low_contrast] + 0.5) % 1.0
    fg[low_contrast] = np.where(bg.mean(1)[low_contrast] @ lum > 0.5, 0.05, 0.95)[:, None]

    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        c, s = np.cos(angle[i]), np.sin(angle[i])
        rotation = np.array([[c, -s], [s, c]])
        for points, fill in SHAPE_POLYGONS[SHAPES_CLASSES[labels[i]]]:
            xy = points @ rotation.T * radius[i] + centre[i]
            draw.polygon([tuple(p) for p in xy], fill=fill)
        alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float32)
        alpha = alpha[..., None] / 255                                         # (H, W, 1)
        t = (np.cos(direction[i]) * xs + np.sin(direction[i]) * ys)[..., None]
        t = t / np.sqrt(2) + 0.5                                               # (H, W, 1) in [0, 1]
        background = (1 - t) * bg[i, 0] + t * bg[i, 1]
        images[i] = np.round(255 * ((1 - alpha) * background + alpha * fg[i]))
    return images, labels.astype(np.int64)

def load_shapes(data_dir, split):
    """The embedded offline dataset: 50,000 train and 10,000 test images, built once and cached."""
    path = Path(data_dir) / f"shapes-seed{SHAPES_SEED}-v1.npz"
    if not path.exists():
        print(f"building the shapes dataset once into {path} ...", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_x, train_y = make_shapes(50_000, SHAPES_SEED)
        test_x, test_y = make_shapes(10_000, SHAPES_SEED + 1)
        atomic_save(path, lambda tmp: np.savez(tmp, train_x=train_x, train_y=train_y,
                                               test_x=test_x, test_y=test_y))
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f[f"{split}_x"], f[f"{split}_y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):   # damaged: build again
        print(f"{path} is damaged; building it again", file=sys.stderr)
        path.unlink()
        return load_shapes(data_dir, split)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), list(SHAPES_CLASSES),
                     f"shapes/{split}")

def open_rgb(path):
    """An image file as 8-bit RGB: 16-bit greys scaled (not clipped to white), floats refused."""
    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise UserError(f"{path} has floating-point pixels; save it as 8 or 16 bits")
            if im.mode.startswith("I"):   # 16-bit greys: I;16, or I holding 0..65535
                im = Image.fromarray(np.uint8(np.clip(np.asarray(im) / 257, 0, 255).round()))
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read the image {path} ({e.__class__.__name__}); remove it")

def load_image_file(path, image_size):
    """One image, centre-cropped to a square and resized: (H, W, 3) uint8."""
    return np.asarray(ImageOps.fit(open_rgb(path), (image_size,) * 2, Image.Resampling.BICUBIC))

def load_folder(folder, image_size):
    """A folder of images: class sub-folders give labels, a flat folder is one class."""
    folder = Path(folder)
    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(map(is_image, d.rglob("*"))))
    top_level = sorted(filter(is_image, folder.iterdir()))
    if subdirs and top_level:
        raise UserError(f"{folder} mixes images ({top_level[0].name}) with class sub-folders "
                        f"({subdirs[0].name}): put every image in a class sub-folder, or none")
    if subdirs:
        class_names = [d.name for d in subdirs]
        files = [(p, i) for i, d in enumerate(subdirs)
                 for p in sorted(filter(is_image, d.rglob("*")))]
    else:
        class_names = [folder.name]
        files = [(p, 0) for p in top_level]
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images = np.stack([load_image_file(p, image_size)
                       for p, _ in tqdm(files, desc="reading images", disable=len(files) < 1000)])
    labels = np.array([label for _, label in files], np.int64)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), class_names, str(folder))

def load_data(name, data_dir="data", split="train", image_size=32):
    """`cifar10`, `shapes`, or a folder of images (a folder is both its train and test split)."""
    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, not {split}")
    if name == "cifar10":
        return load_cifar10(data_dir, split)
    if name == "shapes":
        return load_shapes(data_dir, split)
    if not Path(name).is_dir():
        raise UserError(f"--data {name} is neither cifar10, shapes nor an existing image folder")
    return load_folder(name, image_size)

def to_model_input(images_uint8):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1

def to_uint8_images(x):
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

def sample_batch(data, batch_size, generator, flip):
    """A random batch (with replacement) as (x, labels); with flip, half of them mirrored."""
    idx = torch.randint(len(data.images), (batch_size,), generator=generator)
    x = to_model_input(data.images[idx])                                       # (N, 3, H, W)
    if flip:
        flipped = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x, data.labels[idx]

def spread_indices(n, num):
    """min(num, n) indices evenly spread from first to last (a folder is sorted by class)."""
    return torch.linspace(0, n - 1, min(num, n)).round().long()


# -----------------------------------------------------------------------------
# Pictures

def save_grid(images, path, nrow, scale=2):
    """Save (N, H, W, 3) uint8 images as one PNG with nrow images a row, upscaled for viewing."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = im
    size = (grid.shape[1] * scale, grid.shape[0] * scale)
    picture = Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)
    atomic_save(path, lambda tmp: picture.save(tmp, format="PNG"))

def save_loss_curve(log_path, path, title, size=(480, 300)):
    """Plot the "loss" of a JSONL training log against its step as a PNG (pillow only): axes with
    ticks and labels, the loss on a log scale when it spans more than a decade."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    points = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    if not points:
        return
    steps, losses = np.array(points, dtype=np.float64).T
    log_scale = losses.min() > 0 and losses.max() / losses.min() > 10
    ys = np.log10(losses) if log_scale else losses
    x0, x1 = 0.0, max(steps.max(), 1.0)
    y0, y1 = ys.min(), ys.max()
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-12 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    width, height = size
    left, right, top, bottom = 64, width - 16, 28, height - 40        # the plot area in pixels
    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    if log_scale:   # a tick at every 1, 2 and 5 times a power of ten inside the range
        ticks = [math.log10(m * 10.0 ** e) for e in range(math.floor(y0), math.ceil(y1) + 1)
                 for m in (1, 2, 5) if y0 <= math.log10(m * 10.0 ** e) <= y1]
        label = lambda v: f"{10 ** v:.3g}"
    else:
        ticks = np.linspace(y0, y1, 5)[1:-1]
        label = lambda v: f"{v:.3g}"
    for v in ticks:
        _, y = px(x0, v)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), label(v), fill="black", anchor="rm")
    for v in np.linspace(x0, x1, 5):
        x, _ = px(v, y0)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), f"{v:,.0f}", fill="black", anchor="ma")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.line([px(x, y) for x, y in zip(steps, ys)] if len(steps) > 1 else [px(steps[0], ys[0])] * 2,
              fill=(31, 119, 180), width=2)
    draw.text(((left + right) / 2, height - 4), "step", fill="black", anchor="md")
    axis_label = Image.new("RGB", (60, 14), "white")
    ImageDraw.Draw(axis_label).text((30, 7), "loss", fill="black", anchor="mm")
    picture.paste(axis_label.rotate(90, expand=True), (2, (top + bottom) // 2 - 30))
    draw.text((width / 2, 6), f"{title}: loss{' (log scale)' if log_scale else ''}", fill="black",
              anchor="ma")
    atomic_save(path, lambda tmp: picture.save(tmp, format="PNG"))
