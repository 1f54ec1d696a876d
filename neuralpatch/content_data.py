"""The content network's photos: gathered from packages installed here, with a manifest of each
photo's source package and licence, and a validation split of whole photos
(``python -m neuralpatch.train_content --prepare-data DIR``).

Sources (:data:`DEBIAN_SOURCES`, :data:`SKIMAGE_PHOTOS`):

- scikit-image's bundled colour photos (public domain / CC0).
- Debian ``opencv-doc``: the colour photos of ``examples/data`` and of a few example folders,
  and the clean photos among the tutorial pictures of ``opencv4/html`` (lists reviewed on a
  contact sheet: no drawn overlays, screenshots, drawings, and none of lena, messi or baboon,
  whose rights are unclear). Apache-2.0 AND BSD-3-Clause (the ``Files: *`` stanza).
- Debian ``lomiri-wallpapers-16.04`` (photos under CC0-1.0 / CC-BY-4.0 only) and
  ``puzzle-jigsaw``'s Pexels samples (CC0-1.0).

A Debian photo's files are those the package owns (dpkg's file list), and its licence is read
per file from the package's machine-readable ``/usr/share/doc/<pkg>/copyright`` (last matching
``Files:`` stanza); a file whose licence is not in :data:`PERMISSIVE` is left out and listed in
``EXCLUDED.txt``. So CC-BY-SA wallpapers (ukui-wallpapers, gnome-backgrounds, half of lomiri's)
are not used. :data:`HELD_OUT_PACKAGES` are never read: a source naming one is an error.

Split: photos are grouped when their 16x16 grey thumbnails correlate above
:data:`DUPLICATE_CORRELATION` (the same photo in two folders or sizes, stereo pairs), and a group
goes to ``val`` or ``train`` whole: ``train`` if any member was a training photo of the first
shipped weights (so that the comparison with them is fair), ``val`` if any member is in
:data:`FORCED_VAL`, else ``val`` when a hash of its first name falls under :data:`VAL_FRACTION`.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Reserved to test the project on photos it was never tuned on.
HELD_OUT_PACKAGES = frozenset({"mate-backgrounds", "plasma-workspace-wallpapers"})
# Licences (SPDX-style, as Debian copyright files write them) that count as permissive.
PERMISSIVE = frozenset(
    {"apache-2.0", "bsd-2-clause", "bsd-3-clause", "expat", "mit", "cc0", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0", "public-domain"}
)
DPKG_INFO = Path("/var/lib/dpkg/info")
DOC_DIR = Path("/usr/share/doc")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".jpg.gz", ".png.gz")
VAL_FRACTION = 0.15
DUPLICATE_CORRELATION = 0.9

# scikit-image's bundled colour photos: name -> licence note. "cat" is chelsea again.
SKIMAGE_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "motorcycle_left", "motorcycle_right",
    "immunohistochemistry", "retina", "chelsea", "coffee",
)  # fmt: skip
SKIMAGE_LICENCE = "public-domain (scikit-image bundled data, see skimage/data/README.txt)"

# opencv-doc examples/data photos the first shipped weights trained on (home.jpg was their validation)
_OPENCV_FIRST_TRAINING = (
    "aero1.jpg",
    "aero3.jpg",
    "aloeL.jpg",
    "aloeR.jpg",
    "apple.jpg",
    "board.jpg",
    "building.jpg",
    "butterfly.jpg",
    "chicky_512.png",
    "ela_original.jpg",
    "fruits.jpg",
    "graf1.png",
    "graf3.png",
    "left.jpg",
    "right.jpg",
    "leuvenA.jpg",
    "leuvenB.jpg",
    "licenseplate_motion.jpg",
    "orange.jpg",
    "rubberwhale1.png",
    "rubberwhale2.png",
    "squirrel_cls.jpg",
    "starry_night.jpg",
    "stuff.jpg",
)

# The training photos of the first shipped weights (README, 1 600 steps on 31 photos): their
# groups always go to train.
PREVIOUS_TRAINING = frozenset(
    {
        f"skimage_{n}"
        for n in ("astronaut", "rocket", "hubble_deep_field", "motorcycle_left", "motorcycle_right", "immunohistochemistry", "retina")
    }
    | {f"opencv-doc_{n}" for n in _OPENCV_FIRST_TRAINING}
)
# Held out from the first shipped weights: kept in val.
FORCED_VAL = frozenset({"skimage_chelsea", "skimage_coffee", "opencv-doc_home.jpg"})


@dataclass(frozen=True)
class DebianSource:
    """Photos of one Debian package.

    Attributes:
        package: the Debian package that owns the files.
        under: installed folder whose files are candidates (not recursive).
        upstream: that folder's path in the upstream source, for the copyright lookup.
        names: the file names to take (without a ``.gz``), or None for every image file.
    """

    package: str
    under: str
    upstream: str
    names: tuple[str, ...] | None = None


_OPENCV = "/usr/share/doc/opencv-doc"
DEBIAN_SOURCES = (
    # examples/data: colour photos only (no grey, logos, drawings, renders or text; not
    # ela_modified, a retouched ela_original; not baboon or messi5, whose origin is unclear)
    DebianSource(
        "opencv-doc",
        f"{_OPENCV}/examples/data",
        "samples/data",
        (*_OPENCV_FIRST_TRAINING, "home.jpg"),
    ),
    DebianSource(
        "opencv-doc",
        f"{_OPENCV}/examples/text",
        "contrib/modules/text/samples",
        ("scenetext01.jpg", "scenetext03.jpg", "scenetext04.jpg", "scenetext05.jpg", "scenetext06.jpg"),
    ),
    DebianSource("opencv-doc", f"{_OPENCV}/examples/hfs/data", "contrib/modules/hfs/samples/data", ("000.jpg", "001.jpg", "002.jpg")),
    DebianSource(
        "opencv-doc", f"{_OPENCV}/examples/alphamat/input_images", "contrib/modules/alphamat/samples/input_images", ("plant.jpg",)
    ),
    DebianSource("opencv-doc", f"{_OPENCV}/examples/dnn_superres", "contrib/modules/dnn_superres/samples", ("butterfly.png",)),
    # the tutorials' pictures: the clean photos among the 193 colour, photo-like ones
    DebianSource(
        "opencv-doc",
        f"{_OPENCV}/opencv4/html",
        "doc",
        (
            "11_demo.jpg",
            "230501201_1.jpg",
            "4_barcodes.jpg",
            "Back_Projection1_Source_Image.jpg",
            "Back_Projection_Theory0.jpg",
            "Back_Projection_Theory2.jpg",
            "Background_Subtraction_Tutorial_frame.jpg",
            "Histogram_Comparison_Source_0.jpg",
            "Histogram_Comparison_Source_1.jpg",
            "Hough_Lines_Tutorial_Original_Image.jpg",
            "Laplace_Operator_Tutorial_Original_Image.jpg",
            "Remap_Tutorial_Original_Image.jpg",
            "Threshold_Tutorial_Original_Image.jpg",
            "Threshold_inRange_Tutorial_Result_input.jpeg",
            "Warp_Affine_Tutorial_Original_Image.jpg",
            "apple.jpg",
            "astra_color.jpg",
            "building.jpg",
            "detect_test1.jpg",
            "detect_test2.jpg",
            "feature_building.jpg",
            "fusion_mertens.jpg",
            "graf.png",
            "handDst.jpg",
            "handSrc.jpg",
            "ldr_robertson.jpg",
            "orange.jpg",
            "plant.jpg",
            "retina_TreeHdr_small.jpg",
            "space_shuttle.jpg",
            "squirrel_cls.jpg",
            "studentsSample_input.jpg",
        ),  # fmt: skip
    ),
    DebianSource("lomiri-wallpapers-16.04", "/usr/share/backgrounds", "16.04"),
    DebianSource("puzzle-jigsaw", "/usr/share/puzzle-jigsaw/samples", "samples"),
)


def package_files(package: str, info_dir: Path = DPKG_INFO) -> list[Path]:
    """The files dpkg says ``package`` installed; FileNotFoundError naming the apt-get command
    when it is not installed."""
    if package in HELD_OUT_PACKAGES:
        raise ValueError(f"{package} is held out and is never used for training, tuning or tests")
    for name in (f"{package}.list", *(p.name for p in sorted(Path(info_dir).glob(f"{package}:*.list")))):
        listing = Path(info_dir) / name
        if listing.is_file():
            return [Path(line) for line in listing.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"--prepare-data: {package} is not installed; install it with: apt-get install {package}")


def read_copyright(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(Files patterns, licence) of each ``Files:`` stanza of a machine-readable Debian
    copyright file, in order."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            stanzas.append((tuple(fields["files"].split()), fields["license"].split(" ")[0] if fields["license"] else ""))
    return stanzas


def licence_of(stanzas: list[tuple[tuple[str, ...], str]], upstream_path: str) -> str | None:
    """The licence of the last stanza whose pattern matches ``upstream_path``, or None."""
    found = None
    for patterns, licence in stanzas:
        if any(fnmatch.fnmatchcase(upstream_path, p) for p in patterns):
            found = licence
    return found


def _full_licence(stanzas, upstream_path: str, text: str) -> str | None:
    """Like :func:`licence_of` but keeps a compound licence such as "Apache-2.0 AND BSD-3-Clause"."""
    found = None
    for block in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", block, re.M)
        lic = re.search(r"^License:[ \t]*(.*)$", block, re.M)
        if files and lic and any(fnmatch.fnmatchcase(upstream_path, p) for p in files.group(1).split()):
            found = lic.group(1).strip()
    return found


def is_permissive(licence: str | None) -> bool:
    """True when every part of an "A AND B" / "A or B" licence is in :data:`PERMISSIVE`."""
    if not licence:
        return False
    parts = re.split(r"\s+(?:and|or)\s+", licence.strip().lower())
    return all(p.strip("() ") in PERMISSIVE for p in parts)


def thumbnail(path_or_array) -> np.ndarray:
    """Zero-mean, unit-norm 16x16 grey thumbnail (float64, flattened) of an image file or array."""
    from PIL import Image

    if isinstance(path_or_array, np.ndarray):
        im = Image.fromarray(path_or_array)
    else:
        im = _open(Path(path_or_array))
    grey = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float64).ravel()
    grey = grey - grey.mean()
    return grey / max(np.linalg.norm(grey), 1e-9)


def _open(path: Path):
    from PIL import Image

    if path.suffix == ".gz":
        import io

        return Image.open(io.BytesIO(gzip.decompress(path.read_bytes())))
    return Image.open(path)


def group_duplicates(thumbs: list[np.ndarray], threshold: float = DUPLICATE_CORRELATION) -> list[int]:
    """Group index of each thumbnail: connected components of correlation > ``threshold``."""
    parent = list(range(len(thumbs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if thumbs:
        stack = np.stack(thumbs)
        corr = stack @ stack.T
        for i, j in zip(*np.nonzero(np.triu(corr > threshold, 1))):
            parent[find(int(i))] = find(int(j))
    return [find(i) for i in range(len(thumbs))]


def assign_splits(names: list[str], groups: list[int], forced_train=PREVIOUS_TRAINING, forced_val=FORCED_VAL) -> list[str]:
    """'train' or 'val' for each photo, the same for every member of a group (module docstring)."""
    members: dict[int, list[str]] = {}
    for name, g in zip(names, groups):
        members.setdefault(g, []).append(name)
    split = {}
    for g, group in members.items():
        if any(n in forced_train for n in group):
            split[g] = "train"
        elif any(n in forced_val for n in group):
            split[g] = "val"
        else:
            digest = hashlib.sha256(min(group).encode()).digest()
            split[g] = "val" if int.from_bytes(digest[:4], "big") / 2**32 < VAL_FRACTION else "train"
    return [split[g] for g in groups]


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(data, name)()


def _debian_candidates(source: DebianSource, info_dir: Path, doc_dir: Path):
    """(name, installed path, licence or None) of each candidate file of ``source``."""
    under = Path(source.under)
    files = [p for p in package_files(source.package, info_dir) if p.parent == under and p.name.lower().endswith(IMAGE_SUFFIXES)]
    by_name = {p.name.removesuffix(".gz"): p for p in files}
    copyright_file = Path(doc_dir) / source.package / "copyright"
    text = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
    stanzas = read_copyright(text)
    names = source.names if source.names is not None else sorted(by_name)
    for name in names:
        path = by_name.get(name)
        if path is None or not path.is_file():
            warnings.warn(f"--prepare-data: {source.package} has no {under / name}; skipped", stacklevel=3)
            continue
        upstream = f"{source.upstream}/{path.name.removesuffix('.gz')}"
        licence = _full_licence(stanzas, upstream, text) if stanzas else None
        yield name, path, licence


def prepare_training_photos(out_dir, sources=DEBIAN_SOURCES, skimage_photos=SKIMAGE_PHOTOS, info_dir=DPKG_INFO, doc_dir=DOC_DIR):
    """Gather the photos into ``out_dir/train`` and ``out_dir/val`` (module docstring).

    Writes ``MANIFEST.txt`` (split, file, package, source path, licence, duplicate group, one
    photo a line) and ``EXCLUDED.txt`` (files left out for their licence). Debian files are
    copied byte for byte (``.gz`` ones decompressed), scikit-image's written as PNG.

    Returns:
        (train folder, val folder).

    Raises:
        ValueError: a source names a held-out package.
        FileNotFoundError: a source package is not installed (the message gives the apt-get
            command).
        RuntimeError: scikit-image is not installed.
    """
    from PIL import Image

    for source in sources:
        if source.package in HELD_OUT_PACKAGES:
            raise ValueError(f"{source.package} is held out and is never used for training, tuning or tests")
    if skimage_photos:
        try:
            import skimage  # noqa: F401
        except ImportError as err:
            raise RuntimeError("--prepare-data needs scikit-image: pip install scikit-image") from err
    out_dir = Path(out_dir)
    entries, excluded = [], []  # (key, writer, package, source, licence)
    for name in skimage_photos:
        array = np.ascontiguousarray(_skimage_photo(name)[..., :3])
        entries.append((f"skimage_{name}", f"skimage_{name}.png", array, "scikit-image", f"skimage.data.{name}", SKIMAGE_LICENCE))
    for source in sources:
        for name, path, licence in _debian_candidates(source, info_dir, doc_dir):
            if not is_permissive(licence):
                excluded.append(f"{path}\t{source.package}\t{licence or 'unknown'}")
                continue
            key = f"{source.package}_{name}"
            if any(e[0] == key for e in entries):  # same name in two folders: keep the folder in the key
                key = f"{source.package}_{Path(source.under).name}_{name}"
            entries.append((key, key, path, source.package, str(path), licence))
    thumbs = [thumbnail(e[2]) for e in entries]
    groups = group_duplicates(thumbs)
    splits = assign_splits([e[0] for e in entries], groups)
    for folder in ("train", "val"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for (_key, file_name, data, package, origin, licence), group, split in zip(entries, groups, splits):
        target = out_dir / split / file_name
        if isinstance(data, np.ndarray):
            Image.fromarray(data).save(target)
        elif data.suffix == ".gz":
            with gzip.open(data, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(data, target)
        lines.append(f"{split}\t{split}/{file_name}\t{package}\t{origin}\t{licence}\tgroup{group}")
    (out_dir / "MANIFEST.txt").write_text("split\tfile\tpackage\tsource\tlicence\tgroup\n" + "\n".join(lines) + "\n")
    (out_dir / "EXCLUDED.txt").write_text("source\tpackage\tlicence (not permissive)\n" + "\n".join(excluded) + ("\n" if excluded else ""))
    return out_dir / "train", out_dir / "val"
