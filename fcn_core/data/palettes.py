"""Class names and colours of the data sets this project knows."""

from __future__ import annotations

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

CAMVID_CLASSES = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "signsymbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
]

# SegNet's CamVid colours (the 11-class version's labelling tool palette).
CAMVID_PALETTE = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
]


def voc_palette(n: int = 256) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), as in the devkit."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


VOC_PALETTE = voc_palette(21)
VOID_COLOUR = [224, 224, 192]  # VOC's void/boundary colour (index 255)


def flat_palette(palette: list[list[int]], void_colour: list[int] = VOID_COLOUR) -> list[int]:
    """768 values for PIL's ``putpalette``: the class colours, black after, void at 255."""
    flat = [v for rgb in palette for v in rgb]
    flat += [0] * (768 - len(flat))
    flat[255 * 3 : 256 * 3] = void_colour
    return flat
