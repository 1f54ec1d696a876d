"""Exact against approximate patch search, side by side, on real VGG features of photos.

    nice python bench/bench_patchmatch.py                      # the table (CPU: takes minutes)
    python bench/bench_patchmatch.py --sizes 4k --layers relu3_1 --csv out.csv
    pytest bench/bench_patchmatch.py --benchmark-json=bench/results/patchmatch.json

Problem: the features of a mosaic of scikit-image's photos (astronaut, coffee, chelsea,
rocket, hubble_deep_field, immunohistochemistry, motorcycle_left; each centre-cropped to a
square tile, repeats flipped so that no tile is a copy), computed tile by tile with
the layer's receptive-field margin, so they equal whole-image features. Queries are a centred
square hole of Nq positions; keys are the first Nk positions, row-major, whose 3x3 patch lies
outside the hole and inside the map: the inpainting search.

Rows, for each (layer, Nq x Nk):
- ``exact``: ``patch_nn(method="exact")`` (the fastest backend here);
- ``patchmatch``: ``patch_nn(method="patchmatch")`` at several iteration counts;
- ``faiss-flat``: FAISS ``IndexFlatIP`` over explicitly unfolded, key-normalised patches
  (unfold time excluded, as a user would have them already);
- ``faiss-ivf`` / ``faiss-hnsw``: approximate FAISS indexes, timed with their build
  (our keys change at every scale, so every search pays it).

Quality: ``ratio`` is the mean over queries of NCC(returned) / NCC(exact best); ``exact%``
the fraction of queries whose returned key is the exact one. Where the exact search would
take too long (the largest sizes), it runs on a fixed sample of queries only, for the quality
columns, and its time is not reported.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neuralpatch import patch_nn  # noqa: E402

PATCH_SIZE = 3
SIZES = {"4k": (4096, 16384), "16k": (16384, 65536), "64k": (65536, 262144)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left")
TILE = 512
# exact search above this many multiply-adds runs on a query sample only (2 cores: ~150 GFLOP/s)
EXACT_MAX_MACS = 1e13
EXACT_SAMPLE = 2048
PATCHMATCH_ITERATIONS = (1, 2, 4)
COLUMNS = ["layer", "nq", "nk", "method", "setting", "ms", "x_exact", "ratio", "exact_pct", "note"]


# ----------------------------------------------------------------------------- problem


def _photo(name: str) -> torch.Tensor:
    """A scikit-image photo as (3, H, W) float in [0, 1]."""
    import numpy as np
    from skimage import data

    array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255.0


def _square_tile(image: torch.Tensor, side: int) -> torch.Tensor:
    """Centre square crop, resized to side x side (area down, bicubic up)."""
    _, h, w = image.shape
    s = min(h, w)
    crop = image[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s][None]
    mode = dict(mode="area") if s >= side else dict(mode="bicubic", align_corners=False)
    return F.interpolate(crop, size=(side, side), **mode)[0].clamp(0, 1)


def mosaic(height: int, width: int) -> tuple[torch.Tensor, int]:
    """(3, height, width) canvas of photo tiles, and the tile side used (512, doubled until
    the photos and their 4 flips suffice without repeating a tile)."""
    side = TILE
    while math.ceil(height / side) * math.ceil(width / side) > 4 * len(PHOTOS):
        side *= 2
    photos = [_photo(n) for n in PHOTOS]
    rows, cols = math.ceil(height / side), math.ceil(width / side)
    canvas = torch.zeros(3, rows * side, cols * side)
    for i in range(rows * cols):
        tile = _square_tile(photos[i % len(photos)], side)
        variant = i // len(photos)
        if variant & 1:
            tile = tile.flip(-1)
        if variant & 2:
            tile = tile.flip(-2)
        y, x = divmod(i, cols)
        canvas[:, y * side : (y + 1) * side, x * side : (x + 1) * side] = tile
    return canvas[:, :height, :width], side


@torch.no_grad()
def tiled_features(vgg, image: torch.Tensor, layer: str, block: int = 1024) -> torch.Tensor:
    """``vgg(image)[layer]`` computed over blocks of ``block`` pixels plus the layer's
    receptive-field margin (equal to the whole-image features, in bounded memory)."""
    field = vgg.receptive_field(layer)
    stride, margin = field.stride, -(-field.margin // field.stride) * field.stride
    _, h, w = image.shape
    hf, wf = vgg.output_size(h, w, layer)
    out = None
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            ya, xa = max(0, y0 - margin), max(0, x0 - margin)
            yb, xb = min(h, y0 + block + margin), min(w, x0 + block + margin)
            feat = vgg(image[None, :, ya:yb, xa:xb])[layer][0]
            if out is None:
                out = torch.empty(feat.shape[0], hf, wf)
            fy0, fx0 = y0 // stride, x0 // stride
            fy1, fx1 = min(hf, (y0 + block) // stride), min(wf, (x0 + block) // stride)
            oy, ox = fy0 - ya // stride, fx0 - xa // stride
            out[:, fy0:fy1, fx0:fx1] = feat[:, oy : oy + fy1 - fy0, ox : ox + fx1 - fx0]
    return out


def masks(side: int, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred square hole of nq positions; the first nk valid keys outside it (row-major)."""
    a = int(round(math.sqrt(nq)))
    assert a * a == nq, "nq must be a square"
    hole = torch.zeros(side, side, dtype=torch.bool)
    lo = (side - a) // 2
    hole[lo : lo + a, lo : lo + a] = True
    r = PATCH_SIZE // 2
    valid = ~F.max_pool2d(hole[None, None].float(), PATCH_SIZE, 1, r)[0, 0].bool()
    border = torch.zeros_like(valid)
    border[r : side - r, r : side - r] = True
    valid = (valid & border).reshape(-1)
    keys = valid.nonzero().squeeze(1)
    if keys.numel() < nk:
        return hole, None
    key_mask = torch.zeros(side * side, dtype=torch.bool)
    key_mask[keys[:nk]] = True
    return hole, key_mask.view(side, side)


def feature_problem(vgg, layer: str, nq: int, nk: int):
    """(features (C, S, S), hole (S, S), key_mask (S, S), tile side) for exactly nq queries and nk keys."""
    side = int(math.sqrt(nq + nk))
    while True:
        hole, key_mask = masks(side, nq, nk)
        if key_mask is not None:
            break
        side += 1
    stride = vgg.receptive_field(layer).stride
    image, tile = mosaic(side * stride, side * stride)
    feat = tiled_features(vgg, image, layer)
    return feat[:, :side, :side].contiguous(), hole, key_mask, tile


# ----------------------------------------------------------------------------- peers


def unfolded_patches(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C*k*k) float32 patches (zero-padded) centred at the mask's positions, row-major."""
    r = PATCH_SIZE // 2
    cols = F.unfold(F.pad(feat, (r, r, r, r))[None], PATCH_SIZE)[0]  # (C*k*k, H*W)
    return cols[:, mask.reshape(-1)].T.contiguous()


def faiss_rows(queries, keys, key_positions):
    """FAISS IndexFlatIP, IVF and HNSW over key-normalised patches (inner product = <q,k>/|k|).

    Each index is built once and searched at several settings; a row's time is the build
    (train + add) plus that search. Returns (method, setting, ms, index) rows."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    q = queries.numpy()
    k = (keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-30)).numpy()
    dim = k.shape[1]
    rows = []

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out

    def search(index):
        _, found = index.search(q, 1)
        return key_positions[torch.from_numpy(found[:, 0]).long().clamp_min(0)]

    def add(index):
        index.add(k)
        return index

    build_ms, flat = timed(lambda: add(faiss.IndexFlatIP(dim)))
    ms, found = timed(lambda: search(flat))
    rows.append(("faiss-flat", "IndexFlatIP", build_ms + ms, found))
    flat = None  # free it before the next index
    nlist = int(4 * math.sqrt(k.shape[0]))

    def ivf():
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(k[:: max(1, k.shape[0] // (64 * nlist))])  # 64 training points per list
        return add(index)

    build_ms, index = timed(ivf)
    for nprobe in (4, 16, 64):
        index.nprobe = nprobe
        ms, found = timed(lambda: search(index))
        rows.append(("faiss-ivf", f"nlist={nlist} nprobe={nprobe}", build_ms + ms, found))
    index = None  # free it before the next index

    def hnsw():
        index = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        return add(index)

    build_ms, index = timed(hnsw)
    for ef in (16, 64):
        index.hnsw.efSearch = ef
        ms, found = timed(lambda: search(index))
        rows.append(("faiss-hnsw", f"M=16 efC=40 efS={ef}", build_ms + ms, found))
    return rows


# ----------------------------------------------------------------------------- timing


def time_ms(fn, reps: int, warmup: int = 1):
    """(median ms over reps after ``warmup`` untimed runs, the last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out


def quality(feat, hole, index, exact_index, exact_score, sample=None):
    """(mean NCC ratio to the exact best, % exact) of ``index`` on the (sampled) queries."""
    from neuralpatch._torch import box_sum_of_squares as _box_sum_of_squares

    if sample is not None:
        index = index[sample]
    r = PATCH_SIZE // 2
    q_pos = hole.reshape(-1).nonzero().squeeze(1)
    if sample is not None:
        q_pos = q_pos[sample]
    c, h, w = feat.shape
    padded = F.pad(feat, (r, r, r, r)).permute(1, 2, 0).reshape(-1, c)
    wp = w + 2 * r
    taps = (torch.arange(PATCH_SIZE)[:, None] * wp + torch.arange(PATCH_SIZE)[None, :]).reshape(-1)
    norms = _box_sum_of_squares(feat, PATCH_SIZE).sqrt()
    ratios = []
    for s in range(0, q_pos.numel(), 4096):
        qp, ki = q_pos[s : s + 4096], index[s : s + 4096]
        qpatch = padded[((qp // w) * wp + qp % w)[:, None] + taps[None, :]].reshape(qp.numel(), -1)
        kpatch = padded[((ki // w) * wp + ki % w)[:, None] + taps[None, :]].reshape(ki.numel(), -1)
        ncc = (qpatch * kpatch).sum(1) / (norms[qp] * norms[ki]).clamp_min(1e-30)
        ratios.append(ncc / exact_score[s : s + 4096].clamp_min(1e-30))
    ratio = torch.cat(ratios).mean().item()
    return ratio, 100.0 * (index == exact_index).float().mean().item()


# ----------------------------------------------------------------------------- table


def run_size(vgg, layer, nq, nk, reps, with_faiss, iterations=PATCHMATCH_ITERATIONS):
    feat, hole, key_mask, tile = feature_problem(vgg, layer, nq, nk)
    note = f"tile {tile}px" + (" (photos upscaled)" if tile > TILE else "")
    dim = feat.shape[0] * PATCH_SIZE**2
    rows = []
    macs = float(nq) * nk * dim
    sample = None
    warmup = 1 if nq <= SIZES["4k"][0] else 0  # the larger runs take seconds: nothing to warm
    if macs <= EXACT_MAX_MACS:
        exact_ms, (exact_index, exact_score) = time_ms(
            lambda: patch_nn(feat, feat, hole, key_mask, PATCH_SIZE, "fp32", method="exact"), reps, warmup
        )
        rows.append(dict(method="exact", setting="patch_nn fp32", ms=exact_ms, ratio=1.0, exact_pct=100.0, note=note))
    else:
        gen = torch.Generator().manual_seed(0)
        sample = torch.randperm(nq, generator=gen)[:EXACT_SAMPLE].sort().values
        q_sample = torch.zeros(hole.numel(), dtype=torch.bool)
        q_sample[hole.reshape(-1).nonzero().squeeze(1)[sample]] = True
        exact_index, exact_score = patch_nn(feat, feat, q_sample.view_as(hole), key_mask, PATCH_SIZE, "fp32")
        exact_ms = None
        note += f"; exact on {EXACT_SAMPLE} sampled queries (quality only), not timed"
    for it in iterations:
        ms, (index, _) = time_ms(
            lambda it=it: patch_nn(feat, feat, hole, key_mask, PATCH_SIZE, "fp32", method="patchmatch", iterations=it),
            reps,
            warmup,
        )
        ratio, pct = quality(feat, hole, index, exact_index, exact_score, sample)
        rows.append(dict(method="patchmatch", setting=f"iterations={it}", ms=ms, ratio=ratio, exact_pct=pct, note=""))
    if with_faiss and sample is None:
        queries = unfolded_patches(feat, hole)
        keys = unfolded_patches(feat, key_mask)
        key_positions = key_mask.reshape(-1).nonzero().squeeze(1)
        for method, setting, ms, index in faiss_rows(queries, keys, key_positions):
            ratio, pct = quality(feat, hole, index, exact_index, exact_score)
            rows.append(
                dict(
                    method=method,
                    setting=setting,
                    ms=ms,
                    ratio=ratio,
                    exact_pct=pct,
                    note="build + search" if method != "faiss-flat" else "unfold excluded",
                )
            )
        del queries, keys
    for row in rows:
        row.update(layer=layer, nq=nq, nk=nk)
        row["x_exact"] = exact_ms / row["ms"] if exact_ms else float("nan")
    return rows


def format_table(rows) -> str:
    lines = ["| layer | Nq x Nk | method | setting | ms | x exact | score ratio | exact % | note |", "|" + "---|" * 9]
    for r in rows:
        x = "" if math.isnan(r["x_exact"]) else f"{r['x_exact']:.1f}"
        lines.append(
            f"| {r['layer']} | {r['nq'] // 1024}k x {r['nk'] // 1024}k | {r['method']} | {r['setting']} | "
            f"{r['ms']:.0f} | {x} | {r['ratio']:.4f} | {r['exact_pct']:.1f} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["relu3_1", "relu4_1"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions after one warm-up")
    parser.add_argument("--iterations", type=int, nargs="+", default=list(PATCHMATCH_ITERATIONS))
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    from neuralpatch.models import load_vgg

    vgg = load_vgg("auto", layers=tuple(args.layers))
    print(f"# weights: {vgg.source}; torch {torch.__version__}; {torch.get_num_threads()} threads; cpu x{os.cpu_count()}")
    with_faiss = not args.no_faiss
    if with_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("# faiss not installed (pip install faiss-cpu): FAISS rows skipped")
            with_faiss = False
    rows = []
    for layer in args.layers:
        for size in args.sizes:
            nq, nk = SIZES[size]
            new = run_size(vgg, layer, nq, nk, args.reps, with_faiss, tuple(args.iterations))
            print(format_table(new).split("\n", 2)[2] if rows else format_table(new), flush=True)
            rows += new
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in COLUMNS} for r in rows)


# ----------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def small_problem():
        from neuralpatch.models import load_vgg

        vgg = load_vgg("auto", layers=("relu3_1",))
        return feature_problem(vgg, "relu3_1", *SIZES["4k"])

    @pytest.mark.parametrize("method", ["exact", "patchmatch"])
    def test_patch_search(benchmark, small_problem, method):
        feat, hole, key_mask, _ = small_problem
        benchmark.group = "patch_search-relu3_1-4kx16k"
        benchmark.extra_info.update(layer="relu3_1", nq=SIZES["4k"][0], nk=SIZES["4k"][1], method=method)
        index, score = benchmark.pedantic(
            lambda: patch_nn(feat, feat, hole, key_mask, PATCH_SIZE, "fp32", method=method), rounds=3, warmup_rounds=1
        )
        exact_index, exact_score = patch_nn(feat, feat, hole, key_mask, PATCH_SIZE, "fp32")
        benchmark.extra_info["score_ratio"] = quality(feat, hole, index, exact_index, exact_score)[0]


if __name__ == "__main__":
    main()
