"""How well "not a digit" works: digits kept, non-digits refused, other handwriting kept, per score.

    python -m digits_ray train --model cnn_bn --epochs 2 --data-dir DATA --out artifacts/bench/abstain_cnn_bn
    python bench/abstain.py --model artifacts/bench/abstain_cnn_bn --data-dir DATA

For each not-a-digit score of ``digits_ray.models.abstain`` (each with the ink floor), a rule is fitted on the
model's validation split (the split its training used, from its metadata) exactly as training fits the
stored one, then measured on:

- MNIST's test digits (share kept);
- non-digits made here, every one through the preprocessing that served images get (``digits_ray.inference.images``):
  letters A-Z and a-z rendered with every font ``fc-list`` finds (Debian: ``apt-get install -y
  fonts-dejavu-core``), drawn black on white like the page's canvas; random pen strokes with the page's
  brush; blank (uniform) images and noise, as 28x28 pixels (the JSON path; a blank PNG is refused before
  any model sees it) (share refused);
- scikit-learn's ``load_digits``: 1,797 real handwritten digits, 8x8 with 17 gray levels, upscaled
  (bicubic, 8x) and framed like an uploaded image (share kept, and accuracy on those kept).

Writes bench/results/abstain.{json,md} and abstain_examples.png.
"""

from __future__ import annotations

import argparse
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, markdown_table, save

from digits_ray.data.mnist import load_split
from digits_ray.data.split import load_train_val
from digits_ray.inference.images import image_to_mnist, pixels_to_mnist, png_bytes, to_mnist_frame
from digits_ray.inference.predictor import Predictor
from digits_ray.models import abstain, artifact

CANVAS = 280  # the drawing page's canvas, in pixels
BRUSH = 20  # and its pen width
# Letters that are written like a digit (O 0, I/l 1, Z 2, S 5, b/G 6, B 8, g/q 9): refusing them is not
# expected of any rule; the table shows the letters with and without them.
LOOK_ALIKES = set("OoDIlizZSsbGBgq")


def fonts() -> list[Path]:
    """Every TrueType/OpenType font fontconfig knows; a clear error when there is none."""
    advice = "install one, e.g. `sudo apt-get install -y fonts-dejavu-core`"
    if not shutil.which("fc-list"):
        raise SystemExit(f"fc-list (fontconfig) not found, so no font to draw letters with: {advice}")
    listed = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=True).stdout
    found = sorted({Path(f) for f in listed.splitlines() if f.lower().endswith((".ttf", ".otf"))})
    if not found:
        raise SystemExit(f"no font found by fc-list: {advice}")
    return found


def letters(font_files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Every letter in every font, black on a white canvas, through the upload path (PNG bytes)."""
    from PIL import Image, ImageDraw, ImageFont

    images, names = [], []
    for font_file in font_files:
        font = ImageFont.truetype(str(font_file), 200)
        for char in string.ascii_letters:
            canvas = Image.new("L", (CANVAS, CANVAS), 255)
            ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), char, font=font, fill=0, anchor="mm")
            images.append(image_to_mnist(png_bytes(np.asarray(canvas))))
            names.append(char)
    return np.stack(images), names


def strokes(count: int, rng: np.random.Generator) -> np.ndarray:
    """1-4 random pen strokes (2-5 points each, straight or bent) with the page's round brush."""
    from PIL import Image, ImageDraw

    images = []
    for _ in range(count):
        canvas = Image.new("L", (CANVAS, CANVAS), 255)
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(1, 5)):
            points = [tuple(rng.integers(20, CANVAS - 20, 2).tolist()) for _ in range(rng.integers(2, 6))]
            draw.line(points, fill=0, width=BRUSH, joint="curve")
            for x, y in (points[0], points[-1]):  # round caps, as the page's lineCap
                draw.ellipse((x - BRUSH / 2, y - BRUSH / 2, x + BRUSH / 2, y + BRUSH / 2), fill=0)
        images.append(image_to_mnist(png_bytes(np.asarray(canvas))))
    return np.stack(images)


def blanks() -> np.ndarray:
    """Uniform 28x28 images at 18 gray levels, as JSON pixels (dark-on-light ones are inverted)."""
    return np.stack([pixels_to_mnist(np.full((28, 28), level)) for level in range(0, 256, 15)])


def noise(count: int, rng: np.random.Generator) -> np.ndarray:
    """Half uniform noise, half sparse speckle (2-30% of the pixels lit), as 28x28 JSON pixels."""
    dense = [pixels_to_mnist(rng.integers(0, 256, (28, 28))) for _ in range(count // 2)]
    sparse = [pixels_to_mnist((rng.random((28, 28)) < rng.uniform(0.02, 0.3)) * 255.0)
              for _ in range(count - count // 2)]
    return np.stack(dense + sparse)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (0..16, ink bright), upscaled 8x bicubic, then framed like an upload."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for small in digits.images:
        big = Image.fromarray((small * (255.0 / 16)).astype(np.float32), mode="F").resize((64, 64),
                                                                                         Image.Resampling.BICUBIC)
        images.append(to_mnist_frame(np.clip(np.asarray(big), 0, 255)))
    return np.stack(images), digits.target


def measure(predictor: Predictor, rule: abstain.AbstainRule, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(abstains, predicted digit) per image."""
    probs, logits = predictor.outputs(images)
    return rule.decide(images, probs, logits)[0], probs.argmax(axis=1)


def examples_png(predictor: Predictor, rule: abstain.AbstainRule, sets: dict[str, np.ndarray], out: Path,
                 rng: np.random.Generator) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = 10
    fig, axes = plt.subplots(len(sets), per_row, figsize=(per_row * 1.1, len(sets) * 1.35))
    for row, (name, images) in enumerate(sets.items()):
        picked = images[np.sort(rng.choice(len(images), size=min(per_row, len(images)), replace=False))]
        flags, digits = measure(predictor, rule, picked)
        for col in range(per_row):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picked):
                ax.imshow(picked[col], cmap="gray", vmin=0, vmax=255)
                ax.set_title("not a digit" if flags[col] else str(digits[col]), fontsize=7,
                             color="#b42318" if flags[col] else "#1d2433")
        axes[row, 0].text(-4, 14, name, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Abstain rule ({rule.score} + ink floor): what the model answers", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "bench" / "abstain_cnn_bn")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: $DIGITS_DATA_DIR)")
    parser.add_argument("--strokes", type=int, default=1000)
    parser.add_argument("--noise", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    font_files = fonts()  # fail before any work when letters cannot be drawn
    predictor = Predictor.from_artifact(args.model)
    metadata = artifact.read_metadata(args.model)
    cfg = metadata["train_config"]
    data = load_train_val(cfg["val_fraction"], cfg["seed"], args.data_dir)
    test = load_split("test", args.data_dir)
    rng = np.random.default_rng(args.seed)
    letter_images, letter_names = letters(font_files)
    distinct = np.array([name not in LOOK_ALIKES for name in letter_names])
    refused_sets = {"letters": letter_images, "strokes": strokes(args.strokes, rng), "blank": blanks(),
                    "noise": noise(args.noise, rng)}
    sk_images, sk_labels = sklearn_digits()

    rows: list[dict[str, Any]] = []
    rules = {}
    for score in abstain.SCORES:
        rule = rules[score] = predictor.fit_abstain(data.x_val, data.y_val, score)
        test_flags, _ = measure(predictor, rule, test.images)
        sk_flags, sk_digits = measure(predictor, rule, sk_images)
        refused = {name: measure(predictor, rule, images)[0] for name, images in refused_sets.items()}
        row = {
            "score": score, "threshold": rule.threshold, "min_ink": rule.min_ink,
            "validation_kept": rule.validation_kept,
            "mnist_test_kept": float(1 - test_flags.mean()),
            **{f"{name}_refused": float(flags.mean()) for name, flags in refused.items()},
            "letters_not_look_alike_refused": float(refused["letters"][distinct].mean()),
            "sklearn_digits_kept": float(1 - sk_flags.mean()),
            "sklearn_digits_accuracy_kept": float((sk_digits == sk_labels)[~sk_flags].mean()),
            "sklearn_digits_accuracy_all": float((sk_digits == sk_labels).mean()),
        }
        row["mean_refused"] = float(np.mean([row[f"{name}_refused"] for name in refused_sets]))
        rows.append(row)
        print(row, flush=True)

    best = max(rows, key=lambda r: (r["mean_refused"], r["mnist_test_kept"]))["score"]
    pct = "{:.1%}".format
    table = markdown_table(
        [{**r, **{k: pct(v) for k, v in r.items() if k.endswith(("_kept", "_refused", "_accuracy_kept"))},
          "score": f"**{r['score']}**" if r["score"] == best else r["score"]} for r in rows],
        [("score", "score (+ ink floor)"), ("validation_kept", "validation kept"),
         ("mnist_test_kept", "MNIST test kept"), ("letters_refused", "letters refused"),
         ("letters_not_look_alike_refused", "letters refused, look-alikes left out"),
         ("strokes_refused", "strokes refused"), ("blank_refused", "blank refused"),
         ("noise_refused", "noise refused"), ("sklearn_digits_kept", "load_digits kept"),
         ("sklearn_digits_accuracy_kept", "load_digits accuracy (kept)")],
    )
    counts = {name: len(images) for name, images in refused_sets.items()}
    intro = (f"Model `{args.model.name}` ({metadata['model']}, test accuracy {metadata['test_accuracy']:.2%}); "
             f"rules fitted on its {len(data.y_val):,} validation digits to keep {abstain.KEEP_RATE:.0%}. "
             f"Images: {len(test.labels):,} MNIST test, {counts['letters']:,} letters ({len(font_files)} fonts), "
             f"{counts['strokes']:,} strokes, {counts['blank']} blank, {counts['noise']:,} noise, "
             f"{len(sk_labels):,} load_digits. Best by mean share refused: **{best}**.")
    print(intro + "\n\n" + table)
    (RESULTS / "abstain.md").write_text(intro + "\n\n" + table + "\n")
    examples_png(predictor, rules[best], {"MNIST test": test.images, **refused_sets, "load_digits": sk_images},
                 RESULTS / "abstain_examples.png", np.random.default_rng(args.seed))
    saved = save("abstain", {"model": str(args.model), "best": best, "counts": counts, "rows": rows,
                             "fonts": [str(f) for f in font_files]})
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
