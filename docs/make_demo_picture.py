"""Make docs/inpaint_demo.png: the demo photo with its hole (left) and `neuralpatch inpaint --demo` (right).

python docs/make_demo_picture.py [--preset fast]
"""

import argparse
from pathlib import Path

import torch

from neuralpatch import inpaint
from neuralpatch.demo import DEMO_OPTIONS, DEMO_PRESET, demo_inputs, show_hole
from neuralpatch.io import save_image_atomic

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default=DEMO_PRESET)
parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "inpaint_demo.png")
args = parser.parse_args()
image, hole = demo_inputs()
result = inpaint(image, hole, preset=args.preset, device="cpu", **DEMO_OPTIONS)
save_image_atomic(torch.cat([show_hole(image, hole), result], dim=2), args.out)
print(f"wrote {args.out}")
