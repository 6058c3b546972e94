"""Paired image + segmentation-mask datasets for SimGen, in and out. In reading order:
- one pair: decoding an image and its mask (EXIF-turned, as viewers show them), resizing both;
- a dataset folder: PairedFolder (the pairs of a split as uint8 tensors, cached), the class
  lists and their matching by mask value, the subsets and merges of segment, eval's two sets;
- writing dataset folders: folder locks, sample's atomic output folders, masks in the dataset's
  own values (palette PNGs too), COCO annotations;
- pictures of pairs: the training grids and sample's trajectory picture;
- the built-in synthetic dataset ("synthetic", "synthetic:K") and its alignment score.

Folder layout (Kvasir-SEG is the example):
    root/images/<stem>.<ext>   ext: jpg jpeg png bmp tif tiff, any case
    root/masks/<stem>.<ext>    same stems; each mask has its image's pixel size
    root/classes.json          optional; names the classes in id order, values all grey or all RGB:
                               {"background": 0, "polyp": 255} or
                               {"tissue": [0, 0, 0], "tool": [255, 0, 0]}
    root/train.txt, val.txt, test.txt   optional split files, one stem per line; without them
                               the last round(0.12 N) stems in sorted order are val, the rest train
JPEG masks are binary (channel mean >= 128 is foreground, as Kvasir-SEG prescribes). Lossless
masks hold grey levels or RGB colours, palette ("P") masks class indices (a VOC-style label PNG:
read by index, its palette kept for writing masks back as such); the distinct values over the
whole dataset become the contiguous class ids 0..K-1, and `classes` keeps each id's value for
writing masks back. Files whose names start with "." (macOS "._" companions too) are skipped.
Each file is decoded once per image_size and the uint8 tensors are cached with torch.save in
$SIMGEN_CACHE (default ~/.cache/simgen), never inside the dataset folder, which may be read-only.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import signal
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test", "all")
VAL_FRACTION = 0.12  # SimGen Table 1: Kvasir-SEG 880 train / 120 val
CACHE_VERSION = 3  # bump whenever decoding or the synthetic generator changes
GREY = 0x010101  # a mask value is held as the code r << 16 | g << 8 | b; grey level v is v * GREY


class DataError(Exception):
    """Bad input data. The message is one line, "path: problem", printed to the user as is."""


# ---------------------------------------------------------------------------- one image/mask pair


def _open(path):
    """Open and fully decode an image file, so that a truncated file fails here; turned as its
    EXIF orientation says (a phone's photos), as every viewer shows it."""
    try:
        im = Image.open(path)
        im.load()
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})".replace("\n", " ")) from None


def _to_rgb(im):
    """Any PIL mode -> RGB. 16-bit grey is scaled to 8 bit (65535 -> 255); PIL would clip it."""
    if im.mode.startswith("I"):  # I;16, I;16B and I: how PIL opens 16-bit PNG and TIFF
        im = Image.fromarray(
            np.round(np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8)
        )
    return im.convert("RGB")  # L, LA, 1, P (through its palette), RGBA (alpha dropped), CMYK


def _mask_codes(im, path):
    """Mask image -> uint32 (H, W) value codes (see GREY)."""
    if im.mode == "P":  # a palette mask holds class indices: its palette only colours them
        a, colours = np.asarray(im), len(im.getpalette() or []) // 3
        if a.max() >= colours:
            raise DataError(f"{path}: palette index {a.max()} past its {colours}-colour palette")
        return a.astype(np.uint32) * GREY  # read as grey levels: the values are the indices
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # lossy masks are binary plus compression noise: threshold the channel mean at 128
        a = np.asarray(im.convert("RGB"), np.uint16)
        return (a[..., 0] + a[..., 1] + a[..., 2] >= 3 * 128) * np.uint32(255 * GREY)
    # 16-bit index masks hold class values, not intensities: kept as they are, so must fit 8 bits
    if im.mode.startswith("I") and not 0 <= np.asarray(im).min() <= np.asarray(im).max() <= 255:
        raise DataError(f"{path}: 16-bit mask values outside 0-255 are not supported")
    a = np.asarray(im.convert("RGB")).astype(np.uint32)
    codes = a[..., 0] << 16 | a[..., 1] << 8 | a[..., 2]
    if "A" in im.getbands() and (codes == codes.flat[0]).all():  # alpha is dropped: then one
        alpha = np.unique(np.asarray(im.getchannel("A")))  # class, unless it is one class
        if len(alpha) > 1:
            raise DataError(
                f"{path}: one colour, its {len(alpha)} alpha levels telling the classes apart; "
                "classes are read from the colours: save them as grey levels or colours"
            )
    return codes


def _geometry(w, h, size):
    """Shorter side -> size, then centre crop: -> the resized (w, h) and the crop's (left, top)."""
    scale = size / min(w, h)
    nw = max(size, round(w * scale))  # max: rounding must not undershoot
    nh = max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def _fit_image(im, size):
    """PIL RGB image -> uint8 (S, S, 3). PIL's BICUBIC widens its kernel when shrinking:
    antialiased."""
    nw, nh, left, top = _geometry(*im.size, size)
    return np.asarray(im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size)))


def _fit_mask(a, size):
    """Nearest-neighbour _fit_image of an (H, W) array: it samples the same pixel centres."""
    h, w = a.shape
    nw, nh, left, top = _geometry(w, h, size)
    # output pixel centre i + 0.5 lies at (i + 0.5) * h / nh in the source, as in PIL's resize
    rows = ((np.arange(top, top + size) + 0.5) * h / nh).astype(np.int64)
    cols = ((np.arange(left, left + size) + 0.5) * w / nw).astype(np.int64)
    return a[rows[:, None], cols]


def _decode_pair(job):
    """(image path, mask path, S) -> image uint8 (S, S, 3), the mask's sorted value codes (n,),
    the mask as indices into those codes, uint8 (S, S), and a palette mask's palette ([r, g, b,
    ...], else None). Runs in the worker processes."""
    image_path, mask_path, size = job
    im, mk = _open(image_path), _open(mask_path)
    if im.size != mk.size:
        raise DataError(
            f"{mask_path}: mask is {mk.size[0]}x{mk.size[1]} but its image is "
            f"{im.size[0]}x{im.size[1]}"
        )
    full = _mask_codes(mk, mask_path)
    # Note: values are collected at full size, so the classes do not depend on image_size
    codes = np.unique(full)  # without return_inverse, which argsorts and is 10x slower
    if len(codes) > 256:
        raise DataError(f"{mask_path}: {len(codes)} distinct mask values, more than 256 classes")
    local = np.searchsorted(codes, _fit_mask(full, size)).astype(np.uint8)
    palette = mk.getpalette() if mk.mode == "P" else None
    return _fit_image(_to_rgb(im), size), codes, local, palette


# ---------------------------------------------------------------------------- a dataset folder


def _files(folder):
    """{stem: path} of the image files in folder."""
    if not folder.is_dir():
        raise DataError(f"{folder}: missing; a dataset has an images/ and a masks/ folder")
    paths = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in EXTENSIONS]
    paths = [p for p in paths if not p.name.startswith(".")]  # hidden, macOS "._NAME" companions
    if not paths:
        raise DataError(f"{folder}: no {'/'.join(e[1:] for e in EXTENSIONS)} files")
    files = {p.stem: p for p in paths}
    if len(files) < len(paths):  # a.jpg next to a.png: which one is meant is anybody's guess
        twice = sorted({p.stem for p in paths if files[p.stem] != p})
        both = ", ".join(p.name for p in paths if p.stem == twice[0])
        raise DataError(f"{folder}: {len(twice)} stems have two files (e.g. {both})")
    return files


def _pairs(root):
    """Pair images with masks by stem: [(stem, image path, mask path)] in sorted stem order."""
    check_root(root)
    images, masks = _files(root / "images"), _files(root / "masks")
    for have, lack, what, where in (
        (images, masks, "images", "masks"),
        (masks, images, "masks", "images"),
    ):
        lonely = sorted(set(have) - set(lack))
        if lonely:  # a few of each: the two naming schemes side by side
            extra = [lack[s].name for s in sorted(set(lack) - set(have))[:3]]
            holds = f"; {where}/ holds e.g. {', '.join(extra)}" if extra else ""
            raise DataError(
                f"{root / where}: nothing for {len(lonely)} of {len(have)} {what} "
                f"(e.g. {', '.join(have[s].name for s in lonely[:3])}{holds})"
            )
    return [(s, images[s], masks[s]) for s in sorted(images)]


def _classes_json(path):
    """classes.json -> ({name: value code} in id order, grey?), or (None, None) when absent."""
    if not path.exists():
        return None, None
    try:
        spec = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write
        grey = all(type(v) is int for v in spec.values())  # else every value must be [r, g, b]
        rgb = [[v] * 3 if grey else v for v in spec.values()]
        codes = [
            v[0] << 16 | v[1] << 8 | v[2]
            for v in rgb
            if type(v) is list and len(v) == 3 and all(type(c) is int and 0 <= c <= 255 for c in v)
        ]
    except (ValueError, AttributeError):  # not JSON, or not an object
        codes = None
    if codes is None or not 0 < len(codes) == len(set(codes)) == len(spec) <= 256:
        raise DataError(
            f'{path}: expected {{"name": grey 0-255, ...}} or {{"name": [r, g, b], ...}}, '
            "at most 256 distinct values"
        )
    return dict(zip(spec, codes)), grey


def _code(value):
    """A class's value, grey level or [r, g, b] -> its code (see GREY)."""
    return value * GREY if isinstance(value, int) else value[0] << 16 | value[1] << 8 | value[2]


def _class_list(named, grey):
    """{name: value code} in id order -> the classes list [{"id", "name", "value"}]."""
    return [
        {"id": i, "name": n, "value": _value(c, grey)} for i, (n, c) in enumerate(named.items())
    ]


def _value(code, grey):
    """Value code -> the dataset's own value: a grey level or [r, g, b]."""
    return code // GREY if grey else [code >> 16, code >> 8 & 255, code & 255]


def _worker_signals():
    """A decoding process leaves Ctrl-C to its parent and dies quietly when the pool ends it (the
    parent's kill handler, simgen.main's, would print a traceback per process, or hang the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_folder(root, pairs, size):
    """Decode every pair once and turn mask values into class ids: the dataset dict, cached."""
    named, grey = _classes_json(root / "classes.json")  # before the slow part: fail fast
    jobs = [(image, mask, size) for _, image, mask in pairs]
    if len(jobs) >= 64:  # 2 processes: the first start is bound by JPEG decoding
        with Pool(2, _worker_signals) as pool:
            out = pool.map(_decode_pair, jobs, chunksize=8)
    else:  # starting a pool costs more than it saves on small datasets
        out = [_decode_pair(job) for job in jobs]
    palette = _palette(pairs, out)  # of palette masks, else None
    if named is None:  # the values found, sorted; JPEG masks are binary even if a class is absent
        lossy = (
            [0, 255 * GREY]
            if any(m.suffix.lower() in (".jpg", ".jpeg") for _, _, m in pairs)
            else []
        )
        table = np.unique(
            np.concatenate([codes for _, codes, *_ in out] + [np.array(lossy, np.uint32)])
        ).tolist()
        if len(table) > 256:
            raise DataError(
                f"{root / 'masks'}: {len(table)} distinct mask values in all, more than 256 classes"
            )
        grey = all(c == (c & 255) * GREY for c in table)
        named = {"background" if c == 0 else f"class_{i}": c for i, c in enumerate(table)}
    index = {c: i for i, c in enumerate(named.values())}
    masks = []
    for (_, _, mask_path), (_, codes, local, _) in zip(pairs, out):
        unknown = [_value(c, c == (c & 255) * GREY) for c in codes.tolist() if c not in index]
        if unknown:
            raise DataError(
                f"{mask_path}: mask values {unknown[:5]} are not in {root / 'classes.json'}"
            )
        # file's index -> class id
        masks.append(np.array([index[c] for c in codes.tolist()], np.uint8)[local])
    classes = _class_list(named, grey)
    images, stems = [image for image, *_ in out], [s for s, _, _ in pairs]
    return _pack(images, masks, stems, classes, palette)


def _palette(pairs, decoded):
    """The one palette of a folder of palette masks ([r, g, b, ...] for indices 0..255), each used
    index in the colour every mask using it gives it, the rest from the first mask's palette;
    None without palette masks. A one-line DataError if palette masks and others are mixed, or
    two masks colour a used index differently."""
    kinds = [p is not None for *_, p in decoded]
    if not any(kinds):
        return None
    if not all(kinds):  # one file of each kind, named
        paletted, other = (pairs[kinds.index(k)][2] for k in (True, False))
        raise DataError(
            f"{other.parent}: palette masks (e.g. {paletted.name}) beside masks without a palette "
            f"(e.g. {other.name}); make them all of one kind"
        )
    first = decoded[0][3]
    palette = (first + [0] * 768)[:768]  # 256 colours: every index a mask may hold
    where = {}  # index -> the first mask that uses it
    for (_, _, mask_path), (_, codes, _, pal) in zip(pairs, decoded):
        for i in (codes // GREY).tolist():
            colour = pal[3 * i : 3 * i + 3]
            if i not in where:
                where[i], palette[3 * i : 3 * i + 3] = mask_path, colour
            elif palette[3 * i : 3 * i + 3] != colour:
                raise DataError(
                    f"{mask_path}: its palette colours index {i} {tuple(colour)}, but "
                    f"{where[i].name}'s {tuple(palette[3 * i : 3 * i + 3])}; give every mask one "
                    "palette"
                )
    return palette


def _pack(images, masks, stems, classes, palette=None):
    """Lists of (S, S, 3) images and (S, S) masks -> the dataset dict of uint8 tensors."""
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    masks = torch.from_numpy(np.stack(masks))
    return dict(images=images, masks=masks, stems=stems, classes=classes, palette=palette)


def cache_file(name, key, suffix):
    """cache_folder/<name>-<hash of key><suffix>: in $SIMGEN_CACHE (default ~/.cache/simgen), never
    inside a dataset folder, which may be read-only. name says what the file holds."""
    folder = Path(os.environ.get("SIMGEN_CACHE") or Path.home() / ".cache" / "simgen")
    return folder / f"{name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}{suffix}"


_cache_warned = []  # the folders already warned about: one warning each per process


def save_cache(path, save):
    """save(temp path), then rename it to path: atomic, so a concurrent reader sees the old file or
    the whole new one. Older files of the same name (another key) are deleted. -> True if cached.

    A cache is optional: a folder that cannot be written (read-only, another user's, a path through
    a regular file) is warned about once, and the caller carries on uncached.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(tmp)
        os.replace(tmp, path)
    except Exception as e:  # OSError from open, RuntimeError from torch.save's writer alike
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        if path.parent not in _cache_warned:
            _cache_warned.append(path.parent)
            print(
                f"warning: {path.parent}: cache not writable ({reason}); carrying on uncached "
                "(set SIMGEN_CACHE to a writable folder)"
            )
        if tmp.exists():
            tmp.unlink(missing_ok=True)
        return False
    name, suffix = path.name[: -len(path.suffix) - 17], path.suffix  # strip "-<16 hex><suffix>"
    for old in set(path.parent.glob(glob.escape(name) + "-" + "?" * 16 + suffix)) - {path}:
        old.unlink(missing_ok=True)
    return True


def cached(name, key, build):
    """The dict for key from the cache, else build() it and cache it -> (dict, its source).
    The dict holds what torch.load(weights_only=True) reads: tensors, lists, numbers, strings."""
    path = cache_file(name, key, ".pt")
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
            if isinstance(data, dict):
                return data, f"loaded {path}"
        except Exception:  # truncated or foreign: a cache is rebuilt, never fatal
            pass
        print(f"{path}: unreadable cache, rebuilding it")
    data = build()
    cached = save_cache(path, lambda tmp: torch.save(data, tmp))
    return data, f"decoded, cached in {path}" if cached else "decoded, not cached"


def _split(root, stems, split):
    """Indices into the sorted stems: from root/<split>.txt if root has split files, else by
    position."""
    if split not in SPLITS:
        raise DataError(f"{split}: unknown split, use one of {', '.join(SPLITS)}")
    files = (
        {s: Path(root) / f"{s}.txt" for s in SPLITS[:3]} if synthetic_classes(root) is None else {}
    )
    if split == "all":
        return list(range(len(stems)))
    if any(p.exists() for p in files.values()):
        if not files[split].exists():
            raise DataError(f"{files[split]}: missing, but the dataset has other split files")
        wanted = {line.strip() for line in files[split].read_text().splitlines() if line.strip()}
        unknown = sorted(wanted - set(stems))
        if unknown:
            raise DataError(
                f"{files[split]}: {len(unknown)} stems have no pair (e.g. {', '.join(unknown[:3])})"
            )
        return [i for i, s in enumerate(stems) if s in wanted]
    if split == "test":
        raise DataError(f"{root}: no test split (no test.txt); use train, val or all")
    # the last stems, so adding files later moves few pairs
    n_val = round(VAL_FRACTION * len(stems))
    return (
        list(range(len(stems) - n_val))
        if split == "train"
        else list(range(len(stems) - n_val, len(stems)))
    )


class PairedFolder(torch.utils.data.Dataset):
    """The image/mask pairs of one split, held in memory as uint8 tensors.

    :param root: dataset folder (layout in the module docstring), "synthetic" or "synthetic:K"
    :param image_size: S; the shorter side is resized to S, then the centre S x S is cropped
    :param split: "train", "val", "test" (only from a test.txt) or "all"
    Attributes: images uint8 (N, 3, S, S), masks uint8 (N, S, S) class ids, classes
    [{"id", "name", "value"}], num_classes, stems, root, split, palette (of palette masks).
    """

    def __init__(self, root, image_size, split="train"):
        start, self.root, self.split = time.time(), str(root), split
        k = synthetic_classes(self.root)
        if k is not None:  # the built-in set, 5 classes or synthetic:K
            stems = [f"{i:04d}" for i in range(SYNTHETIC_SIZE)]
            name = f"synthetic-{image_size}" if k == 5 else f"synthetic{k}-{image_size}"
            key = (
                ("synthetic", CACHE_VERSION, image_size)
                if k == 5
                else ("synthetic", k, CACHE_VERSION, image_size)
            )
            build = partial(_synthetic, image_size, k)
        else:
            folder = Path(root)
            pairs = _pairs(folder)
            stems = [s for s, _, _ in pairs]
            # The key is the files' content, not their size and mtime, which a same-size copy
            # with kept times (cp -p, rsync -t) leaves alone: hashing Kvasir-SEG's 2000 files,
            # 55 MB, takes 0.07-0.33 s, against 10 s to decode them.
            content = [
                (f"{p.parent.name}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest())
                for _, image, mask in pairs
                for p in (image, mask)
            ]
            spec = (
                (folder / "classes.json").read_bytes()
                if (folder / "classes.json").exists()
                else None
            )
            real = folder.resolve()
            key = (CACHE_VERSION, image_size, spec, content)
            # the name tells folders of the same name apart, and sizes, for deleting stale files
            name = f"{real.name}-{hashlib.sha256(str(real).encode()).hexdigest()[:8]}-{image_size}"
            build = partial(_decode_folder, folder, pairs, image_size)
        # a bad split fails fast
        index = torch.tensor(_split(self.root, stems, split), dtype=torch.long)
        if not len(index):
            raise DataError(
                f"{self.root}: no pairs in its {split} split ({len(stems)} pairs in all)"
            )
        data, source = cached(name, key, build)
        self.images, self.masks = data["images"][index], data["masks"][index]
        self.stems = [data["stems"][i] for i in index.tolist()]
        self.classes, self.num_classes = data["classes"], len(data["classes"])
        self.palette = data["palette"]  # palette masks': [r, g, b, ...] by index, else None
        print(
            f"{self.root} [{split}]: {len(self)} of {len(stems)} pairs at {image_size}x"
            f"{image_size}, {source} ({time.time() - start:.1f}s); {self.num_classes} classes: "
            + ", ".join(f"{c['id']}={c['name']}({c['value']})" for c in self.classes)
        )
        if k is None and not (folder / "classes.json").exists():
            _warn_rare_colours(folder / "masks", data)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        """-> image float32 (3, S, S) in [-1, 1], mask long (S, S). Flips: per batch, flip()."""
        return to_unit(self.images[i]), self.masks[i].long()


def _warn_rare_colours(where, data):
    """Colour masks whose colours make many classes, or rare ones, are likely anti-aliased or
    lossy (each blended edge colour a class): one warning line with the rarest colours."""
    classes = data["classes"]
    if not isinstance(classes[0]["value"], list):  # grey levels and indices are meant as given
        return
    share = torch.bincount(data["masks"].flatten().long(), minlength=len(classes)).double()
    share /= share.sum()
    rare = int((share < 0.001).sum())
    if len(classes) > 10 or rare:
        rarest = ", ".join(f"{classes[i]['value']} {share[i]:.3%}" for i in share.argsort()[:3])
        print(
            f"warning: {where}: {len(classes)} classes from the masks' colours, {rare} of them "
            f"under 0.1 % of the pixels (rarest: {rarest}): likely anti-aliased edges or lossy "
            "compression; list the real classes in classes.json to have other colours refused"
        )


def to_unit(images):
    """uint8 [0, 255] -> float32 [-1, 1]: how images enter the networks."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255], rounded and clipped: to_unit's inverse on its range."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def flip(images, masks, generator=None):
    """Random horizontal flip of a batch, the same for each image and its mask, on any device.

    :param images: (B, C, H, W), any dtype; masks: (B, H, W)
    :param generator: optional torch.Generator; the coins are drawn on its device
    """
    device = generator.device if generator is not None else images.device
    # drawn where the generator lives, then moved: one seed, the same flips on any device
    coin = (torch.rand(images.shape[0], generator=generator, device=device) < 0.5).to(images.device)
    return (
        torch.where(coin[:, None, None, None], images.flip(-1), images),
        torch.where(coin[:, None, None], masks.flip(-1), masks),
    )


def match_classes(classes, target, where, reference="the reference set"):
    """Lookup table from the class ids of `classes` to the ids in `target` of the same mask value.

    :param classes, target: PairedFolder.classes lists; where, reference: named in the error
    :return: long tensor (len(classes),): target_ids = table[ids]
    """

    def rgb(v):  # ids follow each folder's own sorted values: classes are matched by value
        return (v,) * 3 if isinstance(v, int) else tuple(v)

    same = {rgb(c["value"]): c for c in target}
    unknown = [f"{c['name']} ({c['value']})" for c in classes if rgb(c["value"]) not in same]
    if unknown:
        raise DataError(
            f"{where}: classes {', '.join(unknown)} have no class of that mask value in {reference}"
        )
    # Same value, other name: maybe another dataset's classes (synthetic tissue as background).
    pairs = [(c, same[rgb(c["value"])]) for c in classes]
    pairs = [(c, t) for c, t in pairs if c["name"] != t["name"]]
    renamed = [f"{c['name']} as {t['name']} ({c['value']})" for c, t in pairs]
    if renamed:
        print(
            f"warning: {where}: classes matched by mask value but named differently: "
            f"{', '.join(renamed)}; check that both folders hold the same classes"
        )
    return torch.tensor([same[rgb(c["value"])]["id"] for c in classes])


def gather(roots, splits, test, fraction=1.0, generator=None, merge=""):
    """The pairs of dataset folders (one split for all, or one each) as one training set for the
    PairedFolder test, in its size and class ids (matched by mask value). Of the first folder's
    pairs, `fraction` keeps a random subset drawn by generator, merge ("fat=tissue,...") merges
    classes. A folder that overlaps test's split is warned about.
    -> images uint8 (N, 3, S, S), masks uint8 (N, S, S), [dict(root, split, pairs, of)]"""
    if len(splits) not in (1, len(roots)):
        raise DataError(f"--train-split {','.join(splits)}: give one, or one per TRAIN folder")
    images, masks, used = [], [], []
    relabel = merge_lookup(merge, test.classes)
    splits = list(splits) * len(roots) if len(splits) == 1 else splits
    for i, (root, split) in enumerate(zip(roots, splits)):
        ds = PairedFolder(root, test.images.shape[-1], split)
        same = Path(str(root)).resolve() == Path(test.root).resolve()
        if same and (split == test.split or "all" in (split, test.split)):
            print(f"warning: {root} [{split}] overlaps the test split: the IoU is no test score")
        of = len(ds)
        if i == 0:  # the same subset for a generator, whatever the other folders are
            keep_fraction(ds, fraction, generator)
        ids = match_classes(ds.classes, test.classes, root)[ds.masks.long()]
        images.append(ds.images)
        masks.append(relabel[ids] if i == 0 and relabel is not None else ids)
        used.append(dict(root=str(root), split=split, pairs=len(ds), of=of))
    return torch.cat(images), torch.cat(masks).to(torch.uint8), used


def keep_fraction(ds, fraction, generator):
    """Keep a random `fraction` of the PairedFolder ds's pairs, drawn by generator: at one seed,
    the same pairs in segment (its real folder) and in train (Fig. 15's generator of a fraction)."""
    if fraction == 1:
        return
    keep = torch.randperm(len(ds), generator=generator)[: round(fraction * len(ds))]  # 4.5 -> 4
    if not len(keep):
        raise DataError(f"{ds.root}: --real-fraction {fraction} leaves no pair")
    keep = keep.sort().values
    ds.images, ds.masks, ds.stems = ds.images[keep], ds.masks[keep], [ds.stems[i] for i in keep]
    print(f"{ds.root} [{ds.split}]: {len(ds)} of them kept (--real-fraction {fraction})")


def merge_lookup(merge, classes):
    """--merge "fat=tissue,tool_tip=tool_shaft" -> (K,) long: each class id after the merge, for
    real pairs labelled with fewer classes than classes (Fig. 16); None for ""."""
    if not merge:
        return None
    ids, names = torch.arange(len(classes)), {c["name"]: c["id"] for c in classes}
    for pair in merge.split(","):
        old, sep, new = pair.partition("=")
        if not sep:
            raise DataError(f"--merge {pair}: use OLD=NEW, e.g. fat=tissue")
        for name in [n for n in (old, new) if n not in names]:
            raise DataError(f"--merge {pair}: {name!r} is none of the test classes {list(names)}")
        ids[ids == names[old]] = ids[names[new]]  # what was merged into old follows it
    return ids


def declared_classes(root):
    """The classes root/classes.json names, [{"id", "name", "value"}], known before any file is
    decoded; None without one (the values are then found by decoding every mask)."""
    named, grey = _classes_json(Path(str(root)) / "classes.json")
    if named is None or synthetic_classes(root) is not None:
        return None
    return _class_list(named, grey)


def folder_image_size(root):
    """S when every image of root/images is S pixels on its shorter side and all share one size,
    else None ("synthetic" and folders without images/ too)."""
    folder, sizes = Path(str(root)) / "images", set()
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.suffix.lower() in EXTENSIONS:
            with Image.open(p) as im:  # reads the header only
                sizes.add(im.size)
    return min(sizes.pop()) if len(sizes) == 1 else None


def check_root(root):
    """A one-line DataError unless root is a dataset folder (images/ and masks/ in it) or names the
    built-in set: the check every command makes before any work or folder of its own."""
    if synthetic_classes(root) is None and not Path(root).is_dir():
        why = "a file, not a dataset folder" if Path(root).exists() else "dataset folder not found"
        raise DataError(f"{root}: {why}")
    for sub in ("images", "masks") if synthetic_classes(root) is None else ():
        if not (Path(root) / sub).is_dir():
            raise DataError(
                f"{Path(root) / sub}: missing; a dataset has an images/ and a masks/ folder"
            )


def eval_sets(real, fake, size=None, real_split="all", fake_split="all"):
    """eval's REAL and FAKE pairs at one size, checked before any feature is computed (they take
    minutes): -> their PairedFolders and FAKE's masks in REAL's class ids (matched by value).
    size None: FAKE's own image size (256 if its sizes differ). Real images get the training's
    resize and crop; fake ones at their own size stay as they are. FAKE first: it fails first."""
    for root in (real, fake):
        check_root(root)
    size = size or folder_image_size(fake)
    if size is None:
        size = 256
        print(f"{fake}: no single image size; evaluating at 256x256 (set --image-size)")
    if size < 16:
        print(f"warning: --image-size {size}: too few pixels for the Inception to tell apart")
    fake_ds, real_ds = PairedFolder(fake, size, fake_split), PairedFolder(real, size, real_split)
    for ds in (fake_ds, real_ds):
        if len(ds) < 2:
            raise DataError(f"{ds.root} [{ds.split}]: 1 pair; FID and KID need at least 2")
    if Path(str(real)).resolve() == Path(str(fake)).resolve() and fake_split == real_split:
        print(f"warning: REAL and FAKE are the same images ({real}): their FID of 0 says nothing")
    return (
        real_ds,
        fake_ds,
        match_classes(fake_ds.classes, real_ds.classes, fake)[fake_ds.masks.long()],
    )


# ------------------------------------------------------------------------ writing dataset folders

LOCK_FILE = ".simgen.lock"  # in a run or output folder while a process writes there; its PID
SAMPLE_MANIFEST = ".simgen-sample.json"  # in a sample folder: every file sample writes there
SAMPLE_FOLDERS = ("images", "masks", "masks_color")


@contextlib.contextmanager
def folder_lock(folder, beside=False, scratch=()):
    """Hold an exclusive lock on folder while the `with` block runs; its lock file holds the PID.

    The lock file is inside the folder (a run folder, made if absent), or beside it
    (".<name>.simgen.lock", for a folder that may not be SimGen's). It is removed when the block
    ends, so nothing is left behind: nor are the files named in scratch (a set the caller adds
    a name to once it wrote the file: a run's log.csv) if the folder holds nothing else then,
    nor the folder if this made it and it is empty. A second
    process is refused in one line; flock is dropped by the kernel when the holder ends, however
    it ends, so a killed run never blocks the next (kill -9 leaves its files: no code runs).
    """
    if not beside and folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder; a run needs a folder of its own")
    made = not beside and not folder.exists()
    path = folder.parent / f".{folder.name}.simgen.lock" if beside else folder / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise DataError(
                f"{folder}: in use by another simgen process (PID {holder}); "
                "wait for it to end, or choose another folder"
            ) from None
        try:  # the file locked must still be the one at path: its holder may have removed it
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        try:  # the PID, unbuffered: a full disk fails here, once, not again as the file closes
            os.ftruncate(f.fileno(), 0)  # "a+" appends: the PID is now the whole file
            os.write(f.fileno(), f"{os.getpid()}\n".encode())
        except OSError as e:
            raise DataError(f"{folder}: cannot write its lock file ({e.strerror})") from None
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one can take it in between
        f.close()
        rest = {p.name for p in folder.iterdir()} if not beside and folder.is_dir() else {"-"}
        if rest and rest <= set(scratch):  # a run stopped before its first checkpoint
            for name in rest:
                (folder / name).unlink()
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _sample_files(out, force):
    """The files an earlier sample left in out, [] if out is absent or empty; a one-line
    DataError if out is not a folder, holds anything sample did not write, or (without force)
    holds an earlier sample."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    present = [p for p in present if p != SAMPLE_MANIFEST] if out.is_dir() else []
    if not present:
        return []
    try:
        written = set(json.loads((out / SAMPLE_MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{out}: not empty, and not written by sample (no readable {SAMPLE_MANIFEST}); "
            "choose a new or empty folder"
        ) from None
    foreign = [p for p in present if p not in written]
    if foreign:
        raise DataError(
            f"{out}: holds {len(foreign)} files sample did not write (e.g. {foreign[0]}); "
            "not touched, even with --force: choose another folder"
        )
    if not force:
        raise DataError(f"{out}: holds an earlier sample; pass --force to replace it")
    return present


def _remove_sample(folder, files):
    """Remove a sample folder: the listed files, its manifest, and the folders left empty."""
    for p in [*files, SAMPLE_MANIFEST]:
        (folder / p).unlink(missing_ok=True)
    for sub in [*SAMPLE_FOLDERS, "."]:
        with contextlib.suppress(OSError):  # not empty: something not ours stays
            (folder / sub).rmdir()


@contextlib.contextmanager
def new_sample(out, stems, classes, force):
    """-> a folder to write a sample of pairs named by stems into (write_pairs, grid.png,
    annotations.json; classes.json is written here), which replaces out when the block ends without
    an error.

    out must be absent, empty, or hold an earlier sample (every file listed in the manifest that
    sample left; replaced only with force): anything else is refused before a file is written.
    The pairs go to ".<name>.simgen-partial" beside out, which is renamed to out once complete,
    the way a checkpoint is written: until then an earlier sample stays whole, and a failed or
    interrupted sample leaves nothing behind. Hold folder_lock(out, beside=True) around it.
    """
    _sample_files(out, force)
    files = [f"{sub}/{stem}.png" for sub in SAMPLE_FOLDERS for stem in stems]
    files += ["grid.png", "annotations.json", "classes.json", "trajectory.png"]
    partial, old = (out.parent / f".{out.name}.simgen-{k}" for k in ("partial", "old"))
    for folder in (partial, old):  # a killed sample's: its own files only
        if folder.is_dir():
            _remove_sample(folder, _sample_files(folder, force=True))
    for sub in SAMPLE_FOLDERS:
        (partial / sub).mkdir(parents=True, exist_ok=True)
    (partial / SAMPLE_MANIFEST).write_text(json.dumps({"files": sorted(files)}))
    # every class, present or not, so that PairedFolder(out) keeps the training's class ids
    (partial / "classes.json").write_text(json.dumps({c["name"]: c["value"] for c in classes}))
    try:
        yield partial
        earlier = _sample_files(out, force)  # again: what is there now
        if out.exists():
            out.rename(old)
        partial.rename(out)
    except BaseException:
        if old.exists() and not out.exists():  # the earlier sample back where it was
            old.rename(out)
        _remove_sample(partial, files)
        raise
    if old.exists():
        _remove_sample(old, earlier)


def check_writable(path, flag, made=False):
    """A one-line DataError now, before any work, if the file path (given by flag) could not be
    written at the end: it is a folder (or, made, already there), or its folder is missing or
    not writable; made: its folders are made as needed."""
    if path.is_dir() or (made and path.exists()):
        why = "is a folder" if path.is_dir() else "exists"
        raise DataError(f"{path}: {why}; choose another {flag}")
    parent = path.parent
    while made and not parent.exists():  # the folders that would be made
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise DataError(f"{path}: cannot be written ({parent} is no writable folder)")


def write_file(path, write):
    """write(path), with an OSError (a full disk, a read-only folder) as a DataError naming path."""
    try:
        write(path)
    except OSError as e:
        raise DataError(f"{path}: not written ({e.strerror or e})") from None


def write_json(path, obj):
    """obj as JSON in path, as write_file writes."""
    write_file(path, lambda p: p.write_text(json.dumps(obj)))


def write_pairs(out, stems, pairs, classes, palette=None):
    """Write pairs into new_sample's folder, as lossless PNG: images/<stem>.png,
    masks/<stem>.png in the dataset's own values (a drop-in dataset) and masks_color/<stem>.png.

    :param pairs: images uint8 (B, 3, S, S), masks (B, S, S) class ids, colours uint8 (B, S, S, 3)
    :param palette: a palette dataset's (PairedFolder.palette): masks are written as "P" PNGs
        with it, their values the indices, as the dataset's own masks are
    """
    for stem, image, mask, colour in zip(stems, *pairs):
        arrays = image.permute(1, 2, 0), mask_to_values(mask, classes), colour  # (S, S, 3), ...
        pictures = [Image.fromarray(np.asarray(a)) for a in arrays]
        if palette is not None:  # mode L -> P, the same pixel values: the indices
            pictures[1].putpalette(palette)
        for sub, picture in zip(SAMPLE_FOLDERS, pictures):  # images/, masks/, masks_color/
            write_file(out / sub / f"{stem}.png", picture.save)


def palette_colours(masks, classes, palette):
    """Class ids (B, S, S) -> uint8 (B, S, S, 3): each pixel in its index's palette colour."""
    rgb = torch.tensor((list(palette) + [0] * 768)[:768], dtype=torch.uint8).view(-1, 3)  # 256
    return rgb[torch.tensor([c["value"] for c in classes])][masks.long()]


def mask_to_values(mask_ids, classes):
    """Class ids (H, W) -> np.uint8 (H, W) grey or (H, W, 3) colour in the dataset's own values."""
    table = np.array([c["value"] for c in classes], np.uint8)  # (K,) or (K, 3)
    return table[mask_ids.cpu().numpy() if torch.is_tensor(mask_ids) else np.asarray(mask_ids)]


def regions(mask):
    """The 4-connected regions of each class of a mask: the paper's "coordinate extraction".

    :param mask: (H, W) class ids, tensor or numpy
    :return: labels int64 (H, W), each pixel's region named by the index of its first pixel in
        raster order, and those first pixels, sorted
    """
    m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    h, w = m.shape
    begins = np.ones((h, w), bool)  # a run of one class along a row begins at each change
    begins[:, 1:] = m[:, 1:] != m[:, :-1]
    run = np.cumsum(begins.ravel()).reshape(h, w) - 1  # each pixel's run
    first = np.flatnonzero(begins)  # each run's first pixel, in raster order
    same = m[1:] == m[:-1]  # runs with pixels of one class above each other are one region
    pairs = np.unique(run[1:][same] * len(first) + run[:-1][same])
    below, above = np.divmod(pairs, len(first))
    label = np.arange(len(first))
    while True:
        # each run takes the smallest label of itself and the runs it touches ...
        new = label.copy()
        np.minimum.at(new, below, label[above])
        np.minimum.at(new, above, label[below])
        new = new[new]  # ... then its label's label, which halves long chains
        if np.array_equal(new, label):
            return first[label][run], np.unique(first[label])  # named by their first pixel
        label = new


def coco(masks, files, classes, background="background"):
    """COCO's instances format for masks of class ids, which detectron2, mmdetection and the
    YOLO converters read: images, categories and one annotation per 4-connected region of a
    class, with its bbox [x, y, w, h], area in pixels, iscrowd 0 and its segmentation as
    uncompressed RLE (column-major run lengths, the first of 0s: {"counts", "size": [H, W]}).

    :param masks: (H, W) class ids each, tensors or arrays; files: their images' file names
    :param classes: [{"id", "name", "value"}]; category ids are class ids + 1 (COCO's from 1)
    :param background: the name of a class left out, as detection datasets do ("" keeps all)
    :return: the dict to json.dump
    """
    kept = [c for c in classes if c["name"] != background]
    categories = [dict(id=c["id"] + 1, name=c["name"], value=c["value"]) for c in kept]
    out = dict(images=[], categories=categories, annotations=[])
    ids = {c["id"] for c in kept}
    for image_id, (mask, file) in enumerate(zip(masks, files), 1):
        m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        h, w = m.shape
        out["images"].append(dict(id=image_id, file_name=file, width=w, height=h))
        label, firsts = regions(m)
        column_major = label.T.ravel()
        for first in firsts:
            if int(m.flat[first]) not in ids:
                continue
            inside = column_major == first
            ends = np.flatnonzero(np.diff(inside, prepend=False, append=False))  # run bounds
            counts = np.diff(ends, prepend=0).tolist() + [int(inside.size - ends[-1])]
            counts = counts[:-1] if counts[-1] == 0 else counts  # no empty run at the end
            xs, ys = np.divmod(np.flatnonzero(inside), h)  # column-major: x = index // H
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1)]
            box.append(int(ys.max() - ys.min() + 1))
            rle = dict(counts=counts, size=[h, w])
            ann = dict(image_id=image_id, category_id=int(m.flat[first]) + 1, bbox=box)
            ann |= dict(area=int(inside.sum()), iscrowd=0, segmentation=rle)
            out["annotations"].append(dict(id=len(out["annotations"]) + 1, **ann))
    return out


def write_coco(root, path, background="background"):
    """COCO annotations (coco()) of a dataset folder's masks at their files' own size, into path
    (never over an existing file), so that real and generated sets are read alike."""
    if Path(path).exists():
        raise DataError(f"{path}: exists; choose another path")
    classes = PairedFolder(root, 8, "all").classes  # the class ids of the mask values
    ids = {_code(c["value"]): c["id"] for c in classes}
    masks, files = [], []
    for _, image, mask in _pairs(Path(root)):
        codes = _mask_codes(_open(mask), mask)
        found, where = np.unique(codes, return_inverse=True)
        masks.append(np.array([ids[c] for c in found.tolist()])[where.reshape(codes.shape)])
        files.append(f"images/{image.name}")
    write_json(Path(path), coco(masks, files, classes, background))


# ------------------------------------------------------------------------------ pictures of pairs


def triplets(images, colours):
    """Pairs as image | coloured mask | overlay, side by side: how every picture of pairs here is
    drawn. images uint8 (B, 3, S, S), colours uint8 (B, S, S, 3) -> uint8 (B, S, 3S, 3)"""
    images = images.permute(0, 2, 3, 1)  # (B, S, S, 3)
    overlay = ((images.float() + colours.float()) / 2).round().to(torch.uint8)
    return torch.cat([images, colours, overlay], 2)


def _tile(cells, cols, zoom, pad=2):
    """uint8 cells (N, h, w, 3) in rows of cols with white pad-pixel gaps, each pixel zoom x zoom
    -> uint8 (H, W, 3)"""
    n, h, w = cells.shape[:3]
    rows = math.ceil(n / cols)
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for k in range(n):
        y, x = pad + k // cols * (h + pad), pad + k % cols * (w + pad)
        canvas[y : y + h, x : x + w] = cells[k]
    return canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def grid(images, colours):
    """A picture of pairs, each as image | coloured mask | overlay, in a near-square layout.

    :param images: uint8 (B, 3, S, S); colours: uint8 (B, S, S, 3), e.g. cfl.colorize's
    :return: PIL.Image; small samples are enlarged (nearest) to be seen
    """
    cells = triplets(images, colours)
    zoom = max(1, 128 // cells.shape[1])
    return Image.fromarray(_tile(cells, math.ceil(math.sqrt(len(cells))), zoom).numpy())


def trajectory(frames, final, decode, given=None, forward=None):
    """The picture of the joint denoising (sample --trajectory): a column per recorded step t,
    from T down, the sampled pairs last; per pair three rows: x_t (its image channels, its mask
    code as colour), the x_0 it implies, and that x_0's code decoded; above them, forward: a
    real pair noised at the same steps.

    :param frames: {t: (x_t, x_0)}, each float (B, 6, S, S) in about [-1, 1], codes last; code t
        is the paper's t + 1
    :param final: the sampled pairs, images uint8 (B, 3, S, S) and colours uint8 (B, S, S, 3)
    :param decode: code (N, 3, S, S) -> the colours of the classes it decodes to (N, S, S, 3)
    :param given: conditional sampling's (x (B, 6, S, S), keep (1, 6, 1, 1) bool): shown as given
    :param forward: float (C + 1, 6, S, S): the real pair's x_t at the C steps, then its x_0
    :return: PIL.Image
    """
    ts = sorted(frames, reverse=True)
    x, x0 = (torch.stack([frames[t][j] for t in ts], 1) for j in (0, 1))  # (B, C, 6, S, S)
    if given is not None:
        x, x0 = (torch.where(given[1], given[0][:, None], v) for v in (x, x0))
    labels = [f"t = {t + 1}" for t in ts] + ["x_0"]

    def row(v, colours, last):  # (C, 6, S, S) -> a row of triplets, with last at its end
        return torch.cat([to_uint8(v[:, :3]), last[0]]), torch.cat([colours, last[1]])

    def code(v):  # the code channels as a picture
        return to_uint8(v[:, 3:]).permute(0, 2, 3, 1)

    rows, names = [], []
    if forward is not None:
        last = to_uint8(forward[-1:, :3]), code(forward[-1:])
        rows += [row(forward[:-1], code(forward[:-1]), last)]
        rows += [row(forward[:-1], decode(forward[:-1, 3:]), (last[0], decode(forward[-1:, 3:])))]
        names += ["real pair x_t", "decoded"]
    for p in range(len(x)):
        last = final[0][p : p + 1], final[1][p : p + 1]
        rows += [row(x[p], code(x[p]), last), row(x0[p], code(x0[p]), last)]
        rows += [row(x0[p], decode(x0[p][:, 3:]), last)]
        names += [f"pair {p + 1}: x_t", "x_0 guess", "decoded"]
    cells = torch.cat([triplets(images, colours) for images, colours in rows])
    s, zoom = cells.shape[1], max(1, 64 // cells.shape[1])
    body = Image.fromarray(_tile(cells, len(labels), zoom).numpy())
    left, top, step = 6 * max(map(len, names)) + 8, 16, (3 * s + 2) * zoom  # the text's margins
    picture = Image.new("RGB", (body.width + left, body.height + top), "white")
    picture.paste(body, (left, top))
    draw = ImageDraw.Draw(picture)  # PIL's built-in bitmap font: no font files needed
    for c, label in enumerate(labels):
        draw.text((left + 2 * zoom + c * step, 3), label, fill="black")
    for r, name in enumerate(names):
        draw.text((4, top + r * (s + 2) * zoom + (s + 2) * zoom // 2 - 5), name, fill="black")
    return picture


def chart(series, x_label, y_label, marks=(), size=(720, 440)):
    """A line chart drawn with PIL alone (no plotting library): series {name: [(x, y), ...]},
    one colour each, dots at the points, a legend; axes from 0 (x) and from the lowest y, each
    with 5 labelled ticks; marks: y values drawn as grey lines across. -> PIL.Image (RGB)"""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    colours += [(23, 190, 207), (140, 86, 75), (127, 127, 127)]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h, left, bottom, top, right = *size, 70, 50, 20, 190  # the plot box's margins
    points = [p for line in series.values() for p in line]
    x_max = max(x for x, _ in points) or 1
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    y_min, y_max = min([y_min, *marks]), max([y_max, *marks])
    y_max = y_max if y_max > y_min else y_min + 1

    def at(x, y):  # data -> pixel
        px = left + x / x_max * (w - left - right)
        return px, h - bottom - (y - y_min) / (y_max - y_min) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):  # ticks and their values
        x, y = x_max * k / 4, y_min + (y_max - y_min) * k / 4
        px, py = at(x, y)
        draw.line([px, h - bottom, px, h - bottom + 4], fill="black")
        draw.text((px - 12, h - bottom + 8), f"{x:.4g}", fill="black")
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((6, py - 6), f"{y:.3g}", fill="black")
    for y in marks:
        _, py = at(0, y)
        draw.line([left, py, w - right, py], fill=(170, 170, 170))
        draw.text((w - right - 40, py - 12), f"{y:g}", fill=(120, 120, 120))
    draw.text(((w - right + left) / 2 - 30, h - 18), x_label, fill="black")
    draw.text((6, 4), y_label, fill="black")
    for i, (name, line) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        xy = [at(x, y) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 10 + 18 * i  # the legend, right of the plot box
        draw.line([w - right + 10, ly + 6, w - right + 30, ly + 6], fill=colour, width=3)
        draw.text((w - right + 36, ly), name[:24], fill="black")
    return image


# ------------------------------------------------------------------------- built-in synthetic data

SYNTHETIC_CLASSES = ("tissue", "organ", "fat", "tool_shaft", "tool_tip")
# mean colour of each class, RGB 0-255, far apart; the textures below are luminance, about 0-mean
SYNTHETIC_RGB = np.array(
    [[205, 110, 105], [120, 35, 50], [230, 195, 85], [160, 170, 185], [40, 45, 60]], np.float64
)
SYNTHETIC_SIZE = 1000


def synthetic_pair(index, size):
    """Procedural surgical-like scene number index -> image uint8 (S, S, 3), mask uint8 (S, S).

    Shapes are drawn first, from a generator seeded by index alone, in continuous coordinates,
    so a scene is the same at every size; only the pixel noise, drawn last, depends on size.
    """
    rng = np.random.default_rng([2024, index])
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres in [0, 1]; v down, u right
    mask = np.zeros((size, size), np.uint8)
    tool = np.zeros((2, size, size))  # tool coordinates: (across, along)
    # organs (large) and fat (small): smooth blobs of radius r(θ) = r0 (1 + Σ_k a_k cos(kθ + φ_k))
    for cls, count, (r_lo, r_hi) in (
        (1, rng.integers(1, 4), (0.18, 0.32)),
        (2, rng.integers(0, 3), (0.08, 0.16)),
    ):
        for _ in range(count):
            cx, cy, r0 = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(r_lo, r_hi)
            a, phase = rng.uniform(0, 0.15, 3), rng.uniform(0, 2 * np.pi, 3)
            theta = np.arctan2(v - cy, u - cx)
            r = r0 * (1 + sum(a[k] * np.cos((k + 2) * theta + phase[k]) for k in range(3)))
            mask[np.hypot(u - cx, v - cy) < r] = cls
    # tools: straight shafts entering from a border, ending in a jaw that tapers to its end
    for _ in range(rng.integers(1, 3)):
        side, t = rng.integers(4), rng.uniform(0.2, 0.8)
        (x0, y0), angle = [
            ((t, 0), np.pi / 2),
            ((1, t), np.pi),
            ((t, 1), -np.pi / 2),
            ((0, t), 0.0),
        ][side]
        angle += rng.uniform(-0.6, 0.6)  # pointing inwards, give or take 35 degrees
        length, jaw, half = rng.uniform(0.35, 0.6), rng.uniform(0.1, 0.16), rng.uniform(0.05, 0.08)
        along = (u - x0) * np.cos(angle) + (v - y0) * np.sin(angle)
        across = (v - y0) * np.cos(angle) - (u - x0) * np.sin(angle)
        shaft = (along < length) & (np.abs(across) < half)
        taper = half * (1.4 - 0.8 * (along - length) / jaw)  # 1.4 x the shaft's width down to 0.6 x
        tip = (along >= length) & (along < length + jaw) & (np.abs(across) < taper)
        mask[shaft], mask[tip] = 3, 4
        tool[:, shaft | tip] = across[shaft | tip] / half, (along[shaft | tip] - length) / jaw

    def wave(lo, hi):  # a plane wave of random direction, frequency (lo..hi cycles) and phase
        fu, fv = rng.uniform(lo, hi), rng.uniform(lo, hi)
        return np.sin(2 * np.pi * (fu * u + fv * v) + rng.uniform(0, 7))

    texture = np.stack(
        [  # one per class, so each class differs in texture as well as colour
            12 * wave(1, 3),  # tissue: broad folds
            16 * wave(4, 7) * wave(4, 7),  # organ: mottled
            20 * np.cos(16 * np.pi * u) * np.cos(16 * np.pi * v),  # fat: lobules on an 8 x 8 grid
            30 * np.sin(np.pi / 2 * tool[0]),  # shaft: a lit cylinder, bright on one side
            15 * np.cos(4 * np.pi * tool[1]),  # tip: two grip ridges across the jaw
        ]
    )
    light = np.take_along_axis(texture, mask[None].astype(np.int64), 0)[0] + rng.normal(
        0, 4, (size, size)
    )
    image = SYNTHETIC_RGB[mask] + light[..., None]  # (S, S, 3)
    return np.round(image).clip(0, 255).astype(np.uint8), mask


SYNTHETIC_MAX = 64  # synthetic:K takes 2 <= K <= 64 classes: a 4 x 4 x 4 grid of colours


def synthetic_classes(root):
    """K when root names the built-in dataset ("synthetic": the 5 classes above, "synthetic:K": K
    classes), else None. A bad K is a one-line DataError."""
    root = str(root)
    if root == "synthetic":
        return 5
    if not root.startswith("synthetic:"):
        return None
    k = root.split(":", 1)[1]
    if not k.isdigit() or not 2 <= int(k) <= SYNTHETIC_MAX:
        raise DataError(f"{root}: use synthetic:K with K from 2 to {SYNTHETIC_MAX} classes")
    return int(k)


def synthetic_colours(k):
    """Mean RGB colour of each class of the built-in set with k classes, (k, 3) float64.

    k = 5: SYNTHETIC_RGB. Otherwise points of an n x n x n grid in [40, 215]^3 (n^3 >= k) in a
    fixed shuffled order: any two classes differ by >= 175 / (n - 1) in a channel (58 for k <= 64),
    far more than the textures' +-6 and the pixel noise.
    """
    if k == 5:
        return SYNTHETIC_RGB
    n = next(n for n in range(2, 5) if n**3 >= k)
    levels = np.linspace(40, 215, n)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.random.default_rng(k).permutation(len(grid))[:k]]


def synthetic_scene(index, size, k):
    """Scene number index of synthetic:k -> image uint8 (S, S, 3), mask uint8 (S, S).

    Background tissue (class 0) with 3 to 6 objects of random classes 1..k-1 drawn over it: blobs,
    and for every third class a tool-like bar. Classes with id % 4 == 3 are small (radius 0.06-0.1,
    about 20 pixels at 32 x 32), like tool tips. Each class has its own colour
    (synthetic_colours) and its own texture: stripes of +-6, frequency and angle set by its id.
    """
    rng = np.random.default_rng([2024, k, index])
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(3, 7)):
        c = int(rng.integers(1, k))
        cx, cy, angle = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0, np.pi)
        r0 = rng.uniform(0.06, 0.1) if c % 4 == 3 else rng.uniform(0.1, 0.22)
        along = (u - cx) * np.cos(angle) + (v - cy) * np.sin(angle)
        across = (v - cy) * np.cos(angle) - (u - cx) * np.sin(angle)
        if c % 3 == 0:  # a bar, 4 r0 long and r0 wide
            inside = (np.abs(along) < 2 * r0) & (np.abs(across) < r0 / 2)
        else:  # a blob, r(theta) = r0 (1 + a cos(3 theta + phase))
            theta = np.arctan2(across, along)
            inside = np.hypot(along, across) < r0 * (
                1 + rng.uniform(0, 0.2) * np.cos(3 * theta + rng.uniform(0, 7))
            )
        mask[inside] = c
    ids = np.arange(k)[:, None, None]
    turn = ids * 2.39996  # the golden angle: neighbouring ids get far-apart stripe directions
    # (k, S, S)
    texture = 6 * np.sin(2 * np.pi * (2 + ids % 5) * (u * np.cos(turn) + v * np.sin(turn)))
    light = np.take_along_axis(texture, mask[None].astype(np.int64), 0)[0] + rng.normal(
        0, 4, (size, size)
    )
    image = synthetic_colours(k)[mask] + light[..., None]
    return np.round(image).clip(0, 255).astype(np.uint8), mask


def _synthetic(size, k=5):
    """The built-in dataset with k classes as a dataset dict; class values are the ids (grey
    class-index PNGs)."""
    make = synthetic_pair if k == 5 else partial(synthetic_scene, k=k)
    pairs = [make(i, size) for i in range(SYNTHETIC_SIZE)]
    names = SYNTHETIC_CLASSES if k == 5 else ["tissue", *(f"class_{c:02d}" for c in range(1, k))]
    classes = [{"id": i, "name": n, "value": i} for i, n in enumerate(names)]
    return _pack(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [f"{i:04d}" for i in range(SYNTHETIC_SIZE)],
        classes,
    )


def alignment_score(images, masks, k=5):
    """Fraction of pixels whose mask class is the class the image colour implies (synthetic data).

    :param images: uint8 (B, 3, H, W) in [0, 255] or float in [-1, 1]
    :param masks: class ids (B, H, W)
    :param k: the classes of the built-in set the pairs follow (synthetic_classes)
    Each pixel takes the class of the nearest mean colour in synthetic_colours(k). For the 5-class
    set a 3 x 3 box blur first averages out its strong textures (up to +-30). synthetic:K's
    textures are +-6, and its colours a dense grid, where a blurred edge between two classes can
    land on a third: no blur there. Real pairs score > 0.9, shuffled pairs about 0.45-0.55.
    """
    x = torch.as_tensor(images)
    x = x.float() if x.dtype == torch.uint8 else to_uint8(x).float()
    if k == 5:
        # borders average real pixels only
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    means = torch.tensor(synthetic_colours(k), dtype=torch.float32, device=x.device)
    dist = (x[:, None] - means[None, :, :, None, None]).square().sum(2)  # (B, K, H, W)
    return (dist.argmin(1) == torch.as_tensor(masks, device=x.device).long()).float().mean().item()


def alignment_report(images, masks, k=5, real=None):
    """'0.852 (same images, shuffled masks 0.426; real pairs 0.952)': alignment_score of the pairs,
    beside the same images with the masks shuffled and, if given, of real (images, masks)."""
    shuffled = alignment_score(images, masks.roll(1, 0), k)
    text = f"{alignment_score(images, masks, k):.3f}  (same images, shuffled masks {shuffled:.3f}"
    return text + (f"; real pairs {alignment_score(*real, k):.3f})" if real else ")")
