"""
FID exactly as pytorch-fid computes it, with torch and numpy only; and an offline stand-in.

The standard FID: pytorch-fid's InceptionV3 (the FID variant of its blocks) with the weights
`pt_inception-2015-12-05-6726825d.pth`, images bilinearly resized to 299x299 and scaled to [-1, 1],
2048-d average-pool features, float64 mean and covariance, and the Frechet distance
||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

Each source is an npz of uint8 NHWC images (`arr_0`, as sample.py writes, labels in `arr_1`), a
statistics npz (`mu`, `sigma`: pytorch-fid's format), a folder of images, or a dataset name
(`cifar10`, `shapes`, with --split). The FID is the last line printed.

`--features classifier` swaps Inception for a small CNN trained once on the named dataset (as
MNIST papers use a LeNet): for offline workshops and the `shapes` data. It is NOT the standard FID,
and the output says so. It also reports whether each labelled sample shows the class it was asked
for (the class accuracy).

    python fid.py runs/shapes/samples.npz cifar10 --weights pt_inception-2015-12-05-6726825d.pth
    python fid.py runs/shapes/samples.npz shapes --features classifier
    python fid.py cifar10 cifar10_train_stats.npz --save-stats          # pytorch-fid's --save-stats
"""
import argparse
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import IMAGE_EXTENSIONS, download, load_data, open_rgb, sample_batch, to_model_input
from runs import (Progress, UserError, atomic_save, file_digest, pick_device, run_cli,
                  save_checkpoint)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
DATASETS = ("cifar10", "shapes")


# -----------------------------------------------------------------------------
# pytorch-fid's InceptionV3: torchvision's layout, with the FID-specific pooling of the TF graph

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""
    def __init__(self, in_ch, out_ch, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def avg_pool(x):
    """The TF graph's 3x3 average pool does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):
    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):
    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        d3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

class InceptionC(nn.Module):
    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):
    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

class InceptionE(nn.Module):
    """The last blocks; the FID graph pools with an average in Mixed_7b and a max in Mixed_7c."""
    def __init__(self, in_ch, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(pooled)], 1)

class FIDInceptionV3(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, 2048) pool features and (N, 1008) logits."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean((2, 3))                                       # (N, 2048)
        return features, self.fc(features)                              # (N, 1008)

def load_inception(weights=None, device="cpu"):
    """The FID network with the official weights (--weights PATH, or downloaded once and
    sha256-checked) and the start of the weights' sha256, which names the statistics they made."""
    if weights is None:   # where pytorch-fid keeps them
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(FID_WEIGHTS_URL).name
        if not path.exists():
            download(FID_WEIGHTS_URL, path, FID_WEIGHTS_SHA256_PREFIX, "sha256")
        elif not file_digest(path, "sha256").startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise UserError(f"{path} has the wrong sha256 (it must start with "
                            f"{FID_WEIGHTS_SHA256_PREFIX}); delete it to download it again")
        digest = FID_WEIGHTS_SHA256_PREFIX
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights {path} does not exist; get {FID_WEIGHTS_URL}")
        digest = file_digest(path, "sha256")[:8]
        if digest != FID_WEIGHTS_SHA256_PREFIX:
            warnings.warn(f"{path} is not the official FID Inception file: its FIDs are not "
                          f"comparable to published ones")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable weights file ({e.__class__.__name__})")
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UserError(f"{path} does not hold the FID Inception weights (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]})")
    return model.to(device).eval(), digest


# -----------------------------------------------------------------------------
# The offline stand-in: a small CNN classifier trained once on the real training split

class Classifier(nn.Module):
    """(N, 3, 32, 32) images in [-1, 1] -> (N, 256) penultimate features and (N, classes) logits."""
    def __init__(self, num_classes, width=32):
        super().__init__()
        def block(i, o):   # conv, BatchNorm, ReLU, then halve the resolution
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*block(3, width), *block(width, 2 * width),
                                  *block(2 * width, 4 * width), nn.Flatten(),
                                  nn.Linear(4 * width * 4 * 4, 256), nn.ReLU())
        self.head = nn.Linear(256, num_classes)

    def forward(self, x):
        features = self.body(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
                             if x.shape[-1] != 32 else x)
        return features, self.head(features)

def classifier_path(data_name, data_dir, steps, flip):
    """The cache file of a classifier: named by its dataset and by every setting that changes it."""
    flip_tag = "" if flip else "_noflip"
    return Path(data_dir) / f"fid_classifier_{Path(data_name).name}_{steps}steps{flip_tag}.pt"

def load_classifier(data_name, data_dir, device, steps=1500, flip=True, batch_size=128):
    """The classifier of a dataset, trained once (a minute or two on a CPU) and cached beside the
    data; with flip=False (digits, text) it never sees a mirrored image."""
    path = classifier_path(data_name, data_dir, steps, flip)
    if path.exists():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model = Classifier(len(ckpt["class_names"]))
            model.load_state_dict(ckpt["model"])
            return model.to(device).eval(), ckpt
        except Exception as e:
            print(f"{path} is damaged ({e.__class__.__name__}); training the classifier again",
                  file=sys.stderr)
    train = load_data(data_name, data_dir, "train")
    test = load_data(data_name, data_dir, "test")
    torch.manual_seed(0)
    model = Classifier(len(train.class_names)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    progress = Progress(path.with_suffix(".log.jsonl"), steps, 0, batch_size, 100,
                        f"classifier on {data_name}")
    for step in range(steps):
        x, y = sample_batch(train, batch_size, torch.Generator().manual_seed(step), flip=flip)
        loss = F.cross_entropy(model(x.to(device))[1], y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step + 1, loss=loss)
    progress.close()
    model.eval()
    _, logits = extract(model, test.images, device)
    accuracy = (logits.argmax(1) == test.labels.numpy()).mean()
    ckpt = {"model": model.state_dict(), "class_names": train.class_names,
            "test_accuracy": float(accuracy)}
    save_checkpoint(ckpt, path)
    print(f"trained the {data_name} classifier: test accuracy {100 * accuracy:.2f}%, saved to "
          f"{path}", file=sys.stderr)
    return model, ckpt


# -----------------------------------------------------------------------------
# Features, statistics and the Frechet distance

@torch.no_grad()
def extract(model, images, device, batch_size=200):
    """(N, H, W, 3) uint8 images -> float64 (N, D) features and (N, K) logits, in batches."""
    features = []
    logits = []
    inception = isinstance(model, FIDInceptionV3)
    for i in tqdm(range(0, len(images), batch_size), desc="features", leave=False,
                  disable=len(images) <= batch_size):
        x = torch.as_tensor(images[i:i + batch_size])
        # Inception takes [0, 1] (it rescales inside), the classifier [-1, 1]
        x = x.permute(0, 3, 1, 2).float() / 255 if inception else to_model_input(x)
        f, l = model(x.to(device))
        features.append(f.double().cpu())
        logits.append(l.double().cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()

def statistics(features):
    """Mean and covariance (float64, rows are samples), as pytorch-fid computes them."""
    if len(features) < 2:
        raise UserError(f"a covariance needs at least 2 images, but a source has {len(features)}")
    if len(features) < 2048:
        warnings.warn(f"only {len(features)} images: an FID from fewer than 2,048 is biased high "
                      f"and noisy")
    return features.mean(0), np.cov(features, rowvar=False)

def _sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix through its eigen-decomposition."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), where tr((S1 S2)^(1/2)) is computed
    as tr((sqrt(S1) S2 sqrt(S1))^(1/2)): the same eigenvalues, but a symmetric matrix: stable."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) over `splits` parts (fewer with fewer images): (mean, std)."""
    p = torch.from_numpy(logits).softmax(1).numpy()
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# Sources: npz of images, statistics npz, folder of images, dataset name

def read_source(source, args):
    """-> ("stats", (mu, sigma)) or ("images", uint8 NHWC array, labels or None, dataset name or
    None), every mistake found before any network runs."""
    if source in DATASETS:
        data = load_data(source, args.data_dir, args.split)
        return "images", data.images.numpy(), data.labels.numpy(), source
    kind, *rest = read_file_source(Path(source))
    if kind == "images" and len(rest[0]) < 2:
        raise UserError(f"a covariance needs at least 2 images, but {source} holds {len(rest[0])}")
    return kind, *rest

def read_file_source(path):
    """A folder of images or an npz: ("stats", (mu, sigma)) or ("images", images, labels, None)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"{path} holds no images")
        images = []
        for f in tqdm(files, desc=f"reading {path}", leave=False):
            images.append(np.asarray(open_rgb(f)))
        if len({im.shape for im in images}) > 1:
            raise UserError(f"the images in {path} have different sizes; FID needs one size")
        return "images", np.stack(images), None, None
    if path.suffix != ".npz" or not path.is_file():
        raise UserError(f"{path} is neither {' nor '.join(DATASETS)}, a folder of images, nor an "
                        f".npz file")
    try:   # allow_pickle=False: an npz of Python objects could run code
        with np.load(path, allow_pickle=False) as f:
            if "mu" in f and "sigma" in f:
                mu, sigma = f["mu"], f["sigma"]
                if (mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not np.isfinite(mu).all()
                        or not np.isfinite(sigma).all()):
                    raise UserError(f"{path} is not a statistics file: mu must be a finite vector "
                                    f"and sigma a finite square matrix of its size")
                return "stats", (mu, sigma)
            images = f["arr_0"] if "arr_0" in f else None
            if (images is None or images.ndim != 4 or images.shape[-1] != 3
                    or images.dtype != np.uint8):
                raise UserError(f"{path} holds neither mu/sigma statistics nor uint8 NHWC images "
                                f"under arr_0")
            labels = f["arr_1"] if "arr_1" in f else None
            if labels is not None and labels.shape != (len(images),):
                raise UserError(f"{path} holds {len(images)} images but labels (arr_1) of shape "
                                f"{labels.shape}: one label per image")
            return "images", images, labels, None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable npz of images or statistics "
                        f"({e.__class__.__name__})")

def source_statistics(source, model, device, batch_size, cache=None):
    """(mu, sigma, per-image logits or None, labels or None) of a source read by read_source. A
    dataset's statistics are cached at `cache` (a path named by the features that made them: the
    weights' sha256, the classifier's settings); None: computed afresh."""
    kind, *rest = source
    if kind == "stats":
        return (*rest[0], None, None)
    images, labels, dataset = rest
    cache = cache if dataset else None
    if cache is not None and cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return f["mu"], f["sigma"], None, None
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile):
            print(f"{cache} is damaged; computing the statistics again", file=sys.stderr)
    features, logits = extract(model, images, device, batch_size)
    mu, sigma = statistics(features)
    if cache is not None:
        atomic_save(cache, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))
    return mu, sigma, logits, labels

def check_same_features(mu1, mu2):
    if mu1.shape != mu2.shape:
        raise UserError(f"the two sources have features of sizes {len(mu1)} and {len(mu2)}: "
                        f"statistics files must come from the same --features")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sources", nargs=2,
                   help="two of: images .npz, statistics .npz, folder, cifar10, shapes")
    p.add_argument("--features", choices=["inception", "classifier"], default="inception",
                   help="the standard FID, or the offline classifier-feature distance")
    p.add_argument("--weights",
                   help="path of pt_inception-2015-12-05-6726825d.pth (else downloaded once)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="split of a dataset source")
    p.add_argument("--data-dir", default="data",
                   help="where datasets, classifiers and reference statistics live")
    p.add_argument("--classifier-data", help="dataset of the classifier (default: the dataset or "
                   "image folder among the sources)")
    p.add_argument("--classifier-steps", type=int, default=1500,
                   help="training steps of a new classifier")
    p.add_argument("--no-flip", action="store_true",
                   help="train the classifier without horizontal flips (digits, text)")
    p.add_argument("--save-stats", action="store_true",
                   help="write the statistics of the first source to the second path")
    p.add_argument("--is", dest="is_score", action="store_true",
                   help="also print the Inception Score of the first source")
    p.add_argument("--batch-size", type=int, default=200, help="images per forward pass")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run the network")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.classifier_steps < 1:
        raise UserError("--batch-size and --classifier-steps must be positive")
    target = Path(args.sources[1])
    if args.save_stats and (target.suffix != ".npz" or not target.parent.is_dir()):
        raise UserError(f"--save-stats writes to {target}: it must end in .npz, in an existing "
                        f"folder")
    sources = [read_source(s, args) for s in args.sources[:1 if args.save_stats else 2]]
    if len(sources) == 2 and all(kind == "stats" for kind, *_ in sources):   # before any network
        check_same_features(sources[0][1][0], sources[1][1][0])
    device = pick_device(args.device)
    if args.features == "inception":
        model, digest = load_inception(args.weights, device)
        label = "FID (Inception, pytorch-fid compatible)"
        feature_tag = f"inception-{digest}"
    else:
        # the classifier learns the dataset (or image folder) that the samples are compared with
        datasets = [s for s in args.sources if s in DATASETS or Path(s).is_dir()]
        data_name = args.classifier_data or (datasets[0] if datasets else None)
        if data_name is None:
            raise UserError("--features classifier needs a dataset or an image folder: name one as "
                            "a source or with --classifier-data")
        flip = not args.no_flip
        model, ckpt = load_classifier(data_name, args.data_dir, device, args.classifier_steps, flip)
        feature_tag = classifier_path(data_name, "", args.classifier_steps, flip).stem
        label = (f"classifier-feature distance (NOT the standard FID: features of a CNN trained on "
                 f"{data_name}, test accuracy {100 * ckpt['test_accuracy']:.1f}%)")

    def cache(source):   # a dataset's cached statistics; the Inception Score needs the logits
        name = Path(args.data_dir) / f"fid_stats_{source}_{args.split}_{feature_tag}.npz"
        return None if args.is_score and source == args.sources[0] else name

    if args.save_stats:
        mu, sigma, _, _ = source_statistics(sources[0], model, device, args.batch_size,
                                            cache(args.sources[0]))
        atomic_save(args.sources[1], lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))
        print(f"wrote the {args.features} statistics of {args.sources[0]} to {args.sources[1]}")
        return
    mu1, sigma1, logits1, labels1 = source_statistics(sources[0], model, device, args.batch_size,
                                                      cache(args.sources[0]))
    mu2, sigma2, _, _ = source_statistics(sources[1], model, device, args.batch_size,
                                          cache(args.sources[1]))
    if args.is_score and logits1 is not None and args.features == "inception":
        mean, std = inception_score(logits1)
        print(f"Inception Score of {args.sources[0]}: {mean:.3f} +- {std:.3f}")
    if args.features == "classifier" and labels1 is not None and logits1 is not None:
        accuracy = (logits1.argmax(1) == labels1).mean()
        print(f"class accuracy of {args.sources[0]} (each sample shows the class it was asked "
              f"for): {100 * accuracy:.2f}%")
    check_same_features(mu1, mu2)
    print(f"{label}: {frechet_distance(mu1, sigma1, mu2, sigma2):.4f}")


if __name__ == "__main__":
    run_cli(main, "--batch-size")
