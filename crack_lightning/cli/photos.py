"""``predict.py``'s modes that work photo by photo (``--localize``, ``--segment``, ``--explain``): the files
each photo gets, and the loop that writes them, the folder's ``summary.csv`` after every photo."""
from __future__ import annotations

import sys
from pathlib import Path

from crack_lightning.errors import ConfigError
from crack_lightning.files import path_text


def _unique_stem(path, used: set) -> str:
    stem = path.stem
    n = 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def photo_outputs(paths, out_dir, mode: str) -> list[tuple]:
    """The files ``--localize`` (tiles CSV, heatmap), ``--segment`` (mask, overlay, cracks CSV) or ``--explain``
    (Grad-CAM) will write per photo, and the folder's ``summary.csv``."""
    used: set = set()
    stems = [_unique_stem(p, used) for p in paths]
    if mode == "localize":
        return [(out_dir / f"{s}_tiles.csv", out_dir / f"{s}_heatmap.png") for s in stems] + \
            [(out_dir / "summary.csv",)]
    if mode == "segment":
        return [(out_dir / f"{s}_mask.png", out_dir / f"{s}_overlay.png", out_dir / f"{s}_cracks.csv")
                for s in stems] + [(out_dir / "summary.csv",)]
    return [(out_dir / f"{s}_gradcam.png",) for s in stems]


def segment_photos(checkpoint: Path, paths, outputs, out_dir: Path, args) -> int:
    from crack_lightning.errors import BadImageError
    from crack_lightning.inference.segment import (
        load_segmenter,
        segment,
        write_outputs,
        write_summary,
    )

    try:
        edges = tuple(float(e) for e in args.severity_mm.split(","))
    except ValueError:
        raise ConfigError(f"--severity-mm takes increasing widths in mm, e.g. 0.1,0.3; got {args.severity_mm!r}") \
            from None
    if not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0:
        raise ConfigError(f"--severity-mm takes increasing widths in mm, e.g. 0.1,0.3; got {args.severity_mm!r}")
    if not checkpoint.is_file():
        raise ConfigError(f"no segmentation model at {path_text(checkpoint)}: train one (python train.py --config "
                          "configs/segment.yaml) and give it with --checkpoint")
    model = load_segmenter(checkpoint, args.device, args.engine)
    rows, failed = [], 0
    for path, (mask, _, _) in zip(paths, outputs):
        try:
            seg, image = segment(path, model)
        except BadImageError as exc:
            failed += 1
            rows.append({"photo": str(path), "error": str(exc)})
            print(f"  unreadable: {path_text(path)}: {exc}", file=sys.stderr)
        else:
            row = write_outputs(seg, image, out_dir, mask.name[:-len("_mask.png")], args.mm_per_pixel, edges)
            rows.append(row)
            print(f"{path_text(path)}: {row['cracks']} crack(s), {row['length_px']} px long in all, widest "
                  f"{row['max_width_px']} px{'' if seg.cracked else ' (no crack long enough to count)'} -> "
                  f"{path_text(out_dir / row['overlay'])}")
        write_summary(rows, out_dir / "summary.csv", args.mm_per_pixel is not None)  # after every photo
    return 1 if failed else 0


def localize_photos(predictor, paths, outputs, out_dir, args) -> int:
    """Each photo's tiles, heatmap and summary row; the row's label and probability are the photo's answer,
    as ``predict.py`` writes it (for a photo: these very tiles, unless ``--tile`` asks for others)."""
    from crack_lightning.data.images import decode_image
    from crack_lightning.errors import BadImageError
    from crack_lightning.inference.localize import (
        localize_array,
        summary_row,
        write_heatmap,
        write_summary,
        write_tiles_csv,
    )

    rows, failed = [], 0
    for path, (tiles_csv, heatmap) in zip(paths, outputs):
        try:
            image = decode_image(path)
        except BadImageError as exc:
            failed += 1
            rows.append({"photo": str(path), "error": str(exc)})
            print(f"  unreadable: {path_text(path)}: {exc}", file=sys.stderr)
        else:
            answer = predictor.answer(image, str(path), progress=True)
            loc = answer.localization
            if loc is None or args.tile:  # a patch (answered whole), or other tiles asked for
                loc = localize_array(image, predictor.photos, args.tile, args.stride or None, str(path), True)
            write_tiles_csv(loc, tiles_csv)
            write_heatmap(loc, image, heatmap)
            row = summary_row(loc, answer.label, answer.probability)
            rows.append(row)
            print(f"{path_text(path)}: {answer.label} ({answer.probability:.3f}), {row['crack_tiles']}/{row['tiles']} "
                  f"crack tiles, {float(row['crack_fraction']):.1%} of the surface -> {path_text(heatmap)}")
        write_summary(rows, out_dir / "summary.csv")  # after every photo: an interruption keeps what is done
    return 1 if failed else 0


def explain_photos(predictor, paths, outputs, out_dir, args) -> int:
    import torch

    from crack_lightning.errors import BadImageError
    from crack_lightning.inference.explain import explain_file

    if not isinstance(predictor.model, torch.nn.Module):
        raise ConfigError("--explain needs a PyTorch checkpoint (.pt/.ckpt), not an exported model")
    failed = 0
    for path, (out,) in zip(paths, outputs):
        try:
            prob = explain_file(predictor.model, path, out)
        except BadImageError as exc:
            failed += 1
            print(f"  unreadable: {path}: {exc}", file=sys.stderr)
            continue
        print(f"{path}: p(crack)={prob:.3f} -> {out}")
    return 1 if failed else 0
