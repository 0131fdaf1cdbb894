"""RandAugment as timm defines it, batched: the policy's op sets, timm's level functions and PIL's ops.

`BatchRandAugment` carries out a timm RandAugment string (`data.augment.auto_augment`, e.g. DeiT's
"rand-m9-mstd0.5-inc1"; tasks/config.py parses it into a `RandAugmentPolicy`) on uint8 N x C x H x W batches:
timm's op sets (`RAND_AUGMENT_OPS`, `RAND_AUGMENT_INCREASING_OPS`), its level scale, magnitude noise,
per-op probability and random signs (`OpRound`, one per round, drawn on the host), the arguments timm's
level functions make of the levels (`op_arguments`, `op_parameters`), and PIL's definition of every op,
applied op by op to the images that drew it instead of image by image: per-image factors, thresholds and
masks for the colour and pixel ops, lookup tables for AutoContrast and Equalize, and one resampling per
group of geometric ops with PIL's matrices (`pil_affine`) and PIL's bicubic kernel (`_pil_bicubic`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from tasks.config import RAND_AUGMENT_LEVELS, RandAugmentPolicy
from tasks.data.host_to_device import pinned_to
from tasks.data.sources import CIFAR10_MEAN

# timm's RandAugment op sets, in timm's order (timm.data.auto_augment._RAND_TRANSFORMS and
# _RAND_INCREASING_TRANSFORMS): inc1 swaps six ops for variants whose severity grows with the level.
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_HAVE_INCREASING = frozenset({"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"})
RAND_AUGMENT_INCREASING_OPS = tuple(f"{op}Increasing" if op in _HAVE_INCREASING else op for op in RAND_AUGMENT_OPS)
# Ops whose argument takes a random sign (timm's _randomly_negate).
SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})
# timm's translate_pct: the Rel translations move by up to this share of the image side.
TRANSLATE_PCT = 0.45
# The batched implementations, one per image operation (an op and its Increasing variant differ only in how
# a level becomes an argument). "Identity" serves the images whose op was drawn but not applied. The geometric
# ops sit next to each other, grouped by the axes they move samples along, and each group is resampled at once.
IMPLEMENTATIONS = (
    "Identity", "ShearX", "TranslateXRel", "ShearY", "TranslateYRel", "Rotate", "AutoContrast", "Equalize",
    "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness",
)
_ALONG_X = range(IMPLEMENTATIONS.index("ShearX"), IMPLEMENTATIONS.index("TranslateXRel") + 1)
_ALONG_Y = range(IMPLEMENTATIONS.index("ShearY"), IMPLEMENTATIONS.index("TranslateYRel") + 1)
_ROTATE = range(IMPLEMENTATIONS.index("Rotate"), IMPLEMENTATIONS.index("Rotate") + 1)
GEOMETRIC_OPS = frozenset(IMPLEMENTATIONS[_ALONG_X.start : _ROTATE.stop])
# Per-image parameters travel as rows of this many float32: a 3x2 affine matrix is the widest.
_PARAMS = 6
# Added before the geometric ops truncate to integers as PIL does: float32 grids land a hair off the pixel
# centres PIL's double-precision ones hit, which would otherwise turn an exact v into v - 1.
_TRUNCATION_SLACK = 1e-3


def rand_augment_ops(policy: RandAugmentPolicy) -> tuple[str, ...]:
    """The op set images draw from under `policy`: timm's increasing set for inc1, its default set otherwise."""
    return RAND_AUGMENT_INCREASING_OPS if policy.increasing else RAND_AUGMENT_OPS


def implementation_of(op: str) -> str:
    """The image operation behind a timm op name (PosterizeIncreasing -> Posterize)."""
    return op.removesuffix("Increasing")


def op_arguments(op: str, levels: torch.Tensor, negative: torch.Tensor) -> torch.Tensor | None:
    """What timm's level function of `op` (timm.data.auto_augment.LEVEL_TO_ARG) hands the op for each level
    (float64 CPU tensor, already clipped to [0, mmax]), negated where `negative` for the signed ops; None for
    ops without an argument. The same double-precision steps as timm's, so the values are identical: degrees
    (Rotate), shear factor, translation as a share of the side, bits kept (Posterize), threshold
    (Solarize), addition (SolarizeAdd), enhancement factor (Color, Contrast, Brightness, Sharpness)."""
    fraction = levels / RAND_AUGMENT_LEVELS

    def signed(values: torch.Tensor) -> torch.Tensor:
        return torch.where(negative, -values, values)

    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return signed(fraction * 30.0)
    if op in ("ShearX", "ShearY"):
        return signed(fraction * 0.3)
    if op in ("TranslateXRel", "TranslateYRel"):
        return signed(fraction * TRANSLATE_PCT)
    if op in ("Posterize", "PosterizeIncreasing"):
        bits = (fraction * 4).trunc()
        return bits if op == "Posterize" else 4 - bits
    if op in ("Solarize", "SolarizeIncreasing"):
        threshold = (fraction * 256).trunc().clamp(max=256)
        return threshold if op == "Solarize" else 256 - threshold
    if op == "SolarizeAdd":
        return (fraction * 110).trunc().clamp(max=128)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return fraction * 1.8 + 0.1
    if op in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + signed(fraction * 0.9)).clamp(min=0.1)
    known = ", ".join(RAND_AUGMENT_OPS + RAND_AUGMENT_INCREASING_OPS)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {known}")


def pil_affine(implementation: str, arguments: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x 2 x 3 float64: the affine data (a, b, c, d, e, f) timm's geometric op hands PIL for each argument,
    mapping an output point (x, y) to the input point (a x + b y + c, d x + e y + f), in pixels from the
    top-left corner. Shears are about that corner (PIL's (1, m, 0, 0, 1, 0), not torchvision's atan
    angle); Rotate is PIL's Image.rotate about the centre, counter-clockwise, its matrix rounded as PIL's."""
    count = arguments.shape[0]
    matrix = torch.zeros(count, 2, 3, dtype=torch.float64)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
    if implementation == "ShearX":
        matrix[:, 0, 1] = arguments
    elif implementation == "ShearY":
        matrix[:, 1, 0] = arguments
    elif implementation == "TranslateXRel":
        matrix[:, 0, 2] = arguments * width
    elif implementation == "TranslateYRel":
        matrix[:, 1, 2] = arguments * height
    elif implementation == "Rotate":
        angle = -torch.deg2rad(arguments.remainder(360.0))
        cos, sin = angle.cos().round(decimals=15), angle.sin().round(decimals=15)
        center_x, center_y = width / 2.0, height / 2.0
        matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, sin, -sin, cos
        matrix[:, 0, 2] = cos * -center_x + sin * -center_y + center_x
        matrix[:, 1, 2] = -sin * -center_x + cos * -center_y + center_y
    else:
        raise ValueError(f"{implementation!r} is not a geometric op")
    return matrix


def op_parameters(ops: tuple[str, ...], chosen: torch.Tensor, levels: torch.Tensor, negative: torch.Tensor,
                  height: int, width: int) -> torch.Tensor:
    """float32 N x _PARAMS on the host: what each image's op (index `chosen` into `ops`) needs at its level
    and sign, computed for the batch at once.

    Geometric ops: PIL's matrix transposed to 3x2, to multiply (x + 0.5, y + 0.5, 1) pixel-centre rows.
    Colour ops: the factor. Posterize: the bit mask PIL's lookup table keeps. Solarize: the threshold
    clipped to 255 and the xor value (0 for PIL's 256, which inverts nothing). SolarizeAdd: the addition.
    Others: unused zeros."""
    params = torch.zeros(chosen.shape[0], _PARAMS, dtype=torch.float64)
    for index, op in enumerate(ops):
        rows = chosen == index  # host tensors: no device involved
        arguments = op_arguments(op, levels[rows], negative[rows])
        if arguments is None:
            continue
        implementation = implementation_of(op)
        if implementation in GEOMETRIC_OPS:
            params[rows] = pil_affine(implementation, arguments, height, width).transpose(1, 2).reshape(-1, _PARAMS)
        elif implementation == "Posterize":
            # ImageOps.posterize keeps value & ~(2 ** (8 - bits) - 1); 8 or more bits keep everything.
            params[rows, 0] = 256.0 - torch.pow(2.0, (8.0 - arguments).clamp(0.0, 8.0))
        elif implementation == "Solarize":
            params[rows, 0] = arguments.clamp(max=255.0)
            params[rows, 1] = (arguments < 256.0).double() * 255.0
        else:
            params[rows, 0] = arguments
    return params.float()


@dataclass(frozen=True)
class OpRound:
    """One RandAugment round, per image (CPU tensors of length N): the op drawn (index into the policy's op
    set), whether it is applied (probability p), its level (after magnitude noise, clipped to [0, mmax],
    float64) and whether a signed op's argument is negated."""

    ops: torch.Tensor
    applied: torch.Tensor
    levels: torch.Tensor
    negative: torch.Tensor


def to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values -> uint8, clamped to [0, 255] and truncated as PIL's and torchvision's casts do.
    Through int16, which is the same for values in range and several times faster on CPU than the direct cast."""
    return values.clamp_(0, 255).to(torch.int16).to(torch.uint8)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N per-image values laid out like `like` (N x C x H x W). Materialised: a uint8 comparison with a
    broadcast operand takes an unvectorised path on CPU that is over ten times slower."""
    return values.view(-1, 1, 1, 1).expand_as(like).contiguous()


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, images, factor) per image, the core of ImageEnhance: degenerate +
    factor * (images - degenerate) in float32 (PIL's float alpha, the same two roundings), clipped and
    truncated to uint8. `degenerate` is float and broadcasts against the images."""
    return to_uint8(images.float().sub_(degenerate).mul_(factors.view(-1, 1, 1, 1)).add_(degenerate))


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Float luma N x 1 x H x W as PIL converts RGB to L: (19595 R + 38470 G + 7471 B + 2^15) >> 16. Every
    partial sum is an integer below 2^24, so float32 holds it exactly."""
    if images.shape[1] == 1:
        return images.float()
    red, green, blue = images.float().unbind(dim=1)
    luma = red.mul_(19595).add_(green, alpha=38470).add_(blue, alpha=7471).add_(32768)
    return luma.div_(65536).floor_().unsqueeze(1)


def _lookup(images: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Each (image, channel)'s pixels through its own 256-entry uint8 table (N*C x 256): one index_select."""
    return tables.reshape(-1).index_select(0, _table_indices(images).view(-1)).view_as(images)


def _table_indices(images: torch.Tensor) -> torch.Tensor:
    """int64 N*C x H*W: pixel value plus 256 times the pixel's (image, channel) row."""
    count, channels, height, width = images.shape
    rows = count * channels
    offsets = torch.arange(0, rows * 256, 256, device=images.device)[:, None]
    return images.reshape(rows, height * width).long().add_(offsets)


def _identity(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images


def _brightness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # Blending with black: 0 + factor * (images - 0).
    return to_uint8(images.float().mul_(params[:, 0].view(-1, 1, 1, 1)))


def _color(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images  # no colour to change
    return _blend(_grayscale(images), images, params[:, 0])


def _contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, rounded half up to an integer as ImageEnhance.Contrast does."""
    luma_sum = _grayscale(images).sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64)
    mean = luma_sum.div_(images.shape[-2] * images.shape[-1]).add_(0.5).floor_().float()
    return _blend(mean, images, params[:, 0])


def _sharpness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3 kernel: 1s around a 5, over 13, rounded) inside a one-pixel border
    that stays as it is. (sum of integers) / 13 is never within 1/26 of a rounding tie, so summing shifted
    slices gives exactly the integers PIL's float filter rounds to, at a fraction of a depthwise
    convolution's cost on CPU."""
    if images.shape[-2] <= 2 or images.shape[-1] <= 2:
        return images
    output = images.float()
    rows = output[..., :-2, :] + output[..., 1:-1, :] + output[..., 2:, :]
    inner = output[..., 1:-1, 1:-1]
    smoothed = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13).round_()
    inner.sub_(smoothed).mul_(params[:, 0].view(-1, 1, 1, 1)).add_(smoothed)
    return to_uint8(output)


def _invert(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images.bitwise_not()


def _posterize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images & _per_image(params[:, 0].to(torch.uint8), images)


def _solarize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Invert (xor 255) the pixels at or above the image's threshold; a threshold of 256 (xor 0) none."""
    at_or_above = images >= _per_image(params[:, 0].to(torch.uint8), images)
    return images ^ at_or_above.to(torch.uint8).mul_(_per_image(params[:, 1].to(torch.uint8), images))


def _solarize_add(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Add the image's amount to pixels below 128 (timm's solarize_add; at most 127 + 128, so no overflow)."""
    below = images < 128
    return images + below.to(torch.uint8).mul_(_per_image(params[:, 0].to(torch.uint8), images))


def _autocontrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast per image and channel: value v maps to int(v * scale + offset) clipped to
    [0, 255], scale = 255 / (high - low) and offset = -low * scale in double precision as PIL computes its
    table; unchanged where the channel has one value. A 256-entry table per channel, built on the device."""
    count, channels = images.shape[:2]
    flat = images.reshape(count * channels, -1)
    low, high = flat.amin(dim=1, keepdim=True).double(), flat.amax(dim=1, keepdim=True).double()
    # A true division: torch computes `255.0 / tensor` as 255 * (1 / tensor), which rounds differently.
    scale = torch.full_like(low, 255.0).div_((high - low).clamp_(min=1.0))
    offset = -low * scale
    values = torch.arange(256, dtype=torch.float64, device=images.device)
    tables = torch.where(high > low, (values * scale).add_(offset).trunc_().clamp_(0, 255), values)
    return _lookup(images, tables.to(torch.uint8))


def _equalize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation, per image and channel: value v maps to (pixels below v + step // 2) //
    step, at most 255, with step = (pixels not of the highest value present) // 255; unchanged where step is
    0. One scatter for all histograms (bincount would read its maximum back from the device) and one lookup
    for all pixels."""
    count, channels, height, width = images.shape
    rows, device = count * channels, images.device
    bins = _table_indices(images)
    histogram = torch.zeros(rows * 256, dtype=torch.int64, device=device)
    histogram.scatter_add_(0, bins.view(-1), torch.ones(1, dtype=torch.int64, device=device).expand(bins.numel()))
    histogram = histogram.view(rows, 256)
    cumulative = histogram.cumsum(dim=1)
    highest_count = histogram.gather(1, cumulative.argmax(dim=1, keepdim=True))  # the first bin reaching the total
    step = (height * width - highest_count).div_(255, rounding_mode="floor")
    table = (cumulative[:, :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    table = torch.cat([torch.zeros_like(step), table], dim=1)
    table = torch.where(step == 0, torch.arange(256, device=device), table).to(torch.uint8)
    return table.view(-1).index_select(0, bins.view(-1)).view_as(images)


class BatchRandAugment:
    """RandAugment as timm's rand_augment_transform does it for a policy, on uint8 N x C x H x W batches on any
    device, without a loop over images.

    `draw` makes the policy's n rounds for a batch on the host: in each, every image draws one op of timm's
    set uniformly, applies it with probability p, at a level drawn from N(m, mstd) clipped to [0, mmax] and
    turned into the op's argument by timm's level function, with a random sign for the signed ops.

    `apply` carries the rounds out. Images are sorted by the op they drew, each op runs once on its slice (one
    resampling for each group of geometric ops, per-image factors, thresholds and masks for the colour ops,
    one histogram scatter for Equalize, per-channel tables for AutoContrast), and the results are put back in
    order. Every op follows PIL as timm's ops call it: on CPU the colour and pixel ops equal PIL's image by
    image, pixel for pixel; the geometric ops resample with `interpolation` (PIL's own bicubic kernel, or
    bilinear), filling what falls outside with the dataset mean in 0..255 (timm's img_mean), and differ from
    PIL by one level in a few pixels where PIL's double-precision arithmetic truncates a hair below an integer
    (tests/unit/data/test_auto_augment.py measures it).

    Args:
        policy: the parsed `auto_augment` string (data.augment.rand_augment).
        interpolation: how the geometric ops sample, "bilinear" or "bicubic" (`BatchAugmenter` checks it).
        mean: the dataset's per-channel mean in 0..1 (data.mean): the geometric ops' fill, rounded to 0..255 as
            timm's create_transform rounds its img_mean. A 1-channel batch is filled with the first value.
    """

    def __init__(self, policy: RandAugmentPolicy, *, interpolation: str = "bicubic",
                 mean: tuple[float, float, float] = CIFAR10_MEAN):
        self.policy = policy
        self.interpolation = interpolation
        self.ops = rand_augment_ops(policy)
        self.fill = tuple(min(255, round(255 * value)) for value in mean)
        # The policy's op index -> its implementation's index.
        self._implementation_index = torch.tensor([IMPLEMENTATIONS.index(implementation_of(op)) for op in self.ops],
                                                  dtype=torch.int64)
        self._base_grids: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._fills: dict[tuple[int, torch.device], torch.Tensor] = {}
        # Consecutive implementation indices and the batched function that serves them, in IMPLEMENTATIONS
        # order: the geometric ops that move samples along the same axes share one resampling.
        single: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert, "Posterize": _posterize,
            "Solarize": _solarize, "SolarizeAdd": _solarize_add, "Color": _color, "Contrast": _contrast,
            "Brightness": _brightness, "Sharpness": _sharpness,
        }
        self._spans: list[tuple[range, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = [
            (range(0, 1), _identity),
            (_ALONG_X, functools.partial(self._affine, along="x")),
            (_ALONG_Y, functools.partial(self._affine, along="y")),
            (_ROTATE, functools.partial(self._affine, along="xy")),
            *((range(IMPLEMENTATIONS.index(name), IMPLEMENTATIONS.index(name) + 1), op) for name, op in single.items()),
        ]

    def draw(self, count: int, generator: torch.Generator) -> list[OpRound]:
        """The policy's rounds for a batch of `count` images, from the CPU `generator`."""
        return [self._draw_round(count, generator) for _ in range(self.policy.num_ops)]

    def _draw_round(self, count: int, generator: torch.Generator) -> OpRound:
        """timm's AugmentOp choices for one round of `count` images: the op (uniform, with replacement across
        rounds), applied when a uniform draw is below p, the level N(m, mstd) (uniform in [0, m] for an
        infinite mstd) clipped to [0, mmax], and the sign (negated half the time)."""
        policy = self.policy
        ops = torch.randint(len(self.ops), (count,), generator=generator)
        applied = torch.rand(count, generator=generator) < policy.prob
        if policy.magnitude_std == math.inf:
            levels = torch.rand(count, dtype=torch.float64, generator=generator).mul_(policy.magnitude)
        elif policy.magnitude_std > 0:
            levels = torch.randn(count, dtype=torch.float64, generator=generator)
            levels.mul_(policy.magnitude_std).add_(policy.magnitude)
        else:
            levels = torch.full((count,), float(policy.magnitude), dtype=torch.float64)
        negative = torch.rand(count, generator=generator) < 0.5
        return OpRound(ops, applied, levels.clamp_(0.0, policy.magnitude_max), negative)

    def apply(self, images: torch.Tensor, rounds: list[OpRound]) -> torch.Tensor:
        """Carry out `rounds` (from `draw`) on uint8 N x C x H x W `images`, C 1 or 3, on their own device."""
        for op_round in rounds:
            images = self._apply_round(images, op_round)
        return images

    def _apply_round(self, images: torch.Tensor, op_round: OpRound) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        # Host side: sort images by implementation (Identity where the op is not applied) so that each
        # one's images form one slice, and compute their parameters.
        implementations = torch.where(op_round.applied, self._implementation_index[op_round.ops], 0)
        order = torch.argsort(implementations, stable=True)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(count)
        counts = torch.bincount(implementations, minlength=len(IMPLEMENTATIONS)).tolist()  # a CPU tensor: no sync
        params = op_parameters(self.ops, op_round.ops, op_round.levels, op_round.negative, height, width)[order]
        indices = pinned_to(torch.stack([order, restore]), device)
        params = pinned_to(params, device)

        sorted_images = images.index_select(0, indices[0])
        starts = [0, *itertools.accumulate(counts)]
        pieces = []
        for implementation_range, implementation in self._spans:
            start, stop = starts[implementation_range.start], starts[implementation_range.stop]
            if stop > start:
                pieces.append(implementation(sorted_images[start:stop], params[start:stop]))
        return torch.cat(pieces).index_select(0, indices[1])

    def _base_grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """1 x HW x 3 homogeneous pixel-centre coordinates (x + 0.5, y + 0.5, 1) from the top-left corner, where
        PIL samples; made on the device itself (fills, no host copy), once per size and device."""
        key = (height, width, device)
        if key not in self._base_grids:
            grid = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
            grid[..., 0].copy_(torch.arange(width, dtype=torch.float32, device=device).add_(0.5))
            grid[..., 1].copy_(torch.arange(height, dtype=torch.float32, device=device).add_(0.5).unsqueeze_(-1))
            grid[..., 2].fill_(1)
            self._base_grids[key] = grid.view(1, height * width, 3)
        return self._base_grids[key]

    def _fill(self, channels: int, device: torch.device) -> torch.Tensor:
        """1 x C x 1 x 1 float fill on the device, made there from Python numbers (no host copy)."""
        key = (channels, device)
        if key not in self._fills:
            fill = torch.empty(1, channels, 1, 1, dtype=torch.float32, device=device)
            for channel, value in enumerate(self.fill[:channels]):
                fill[:, channel].fill_(value)
            self._fills[key] = fill
        return self._fills[key]

    def _affine(self, images: torch.Tensor, params: torch.Tensor, *, along: str) -> torch.Tensor:
        """One resampling for geometric ops that move samples `along` the same axes ("x": ShearX and
        TranslateXRel, "y": ShearY and TranslateYRel, "xy": Rotate); each image has its own (transposed) PIL
        matrix.

        As PIL's Image.transform: an output pixel whose sample point (x, y) falls outside the image (x outside
        [0, W) or y outside [0, H)) takes the fill; the others interpolate with out-of-range neighbours
        clamped to the edge, and the result is truncated to an integer. Bilinear through grid_sample with
        border padding; bicubic with PIL's own cubic (`_pil_bicubic`), which grid_sample's kernel is not."""
        count, channels, height, width = images.shape
        base = self._base_grid(height, width, images.device)
        points = base.expand(count, -1, -1).bmm(params.view(count, 3, 2)).view(count, height, width, 2)
        x, y = points.unbind(dim=-1)
        inside = ((x >= 0) & (x < width) & (y >= 0) & (y < height)).unsqueeze(1)
        if self.interpolation == "bicubic":
            sampled = _pil_bicubic(images.float(), x - 0.5, y - 0.5, along=along)
        else:
            x.mul_(2.0 / width).sub_(1.0)  # grid_sample's [-1, 1] coordinates (align_corners=False)
            y.mul_(2.0 / height).sub_(1.0)
            sampled = nnf.grid_sample(images.float(), points, mode="bilinear", padding_mode="border",
                                      align_corners=False)
        filled = torch.where(inside, sampled, self._fill(channels, images.device))
        return to_uint8(filled.add_(_TRUNCATION_SLACK))


def _cubic_weights(offsets: torch.Tensor) -> list[torch.Tensor]:
    """PIL's cubic convolution weights (its a = -1 kernel) of the four taps at -1, 0, 1, 2 around a sample
    `offsets` (0..1) past tap 0: PIL's v2 + d (v3 - v1) + d^2 (2 v1 - 2 v2 + v3 - v4) + d^3 (v2 - v1 + v4 - v3)
    sorted by tap."""
    squared = offsets * offsets
    cubed = squared * offsets
    return [
        (2 * squared).sub_(offsets).sub_(cubed),
        (1 - 2 * squared).add_(cubed),
        (offsets + squared).sub_(cubed),
        cubed - squared,
    ]


def _cubic_taps(coordinates: torch.Tensor, size: int, moves: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(index clamped to the image, weight) of each of PIL's cubic taps along one axis, for N x H' x W'
    coordinates; where the samples do not move along the axis they sit on pixel centres, where PIL's weights
    are 0, 1, 0, 0: then a single tap and no weight (None)."""
    start = coordinates.floor()
    first = start.long()
    if not moves:
        return [(first.clamp_(0, size - 1), None)]
    weights = _cubic_weights(coordinates - start)
    return [((first + (tap - 1)).clamp_(0, size - 1), weight) for tap, weight in enumerate(weights)]


def _pil_bicubic(images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, along: str = "xy") -> torch.Tensor:
    """Float N x C x H x W images sampled at N x H' x W' points (pixel coordinates, pixel centres at integers)
    with PIL's bicubic filter of Image.transform: 4 x 4 taps, indices clamped to the image, weights from
    `_cubic_weights`, each tap row summed, then the rows. Points that move only `along` one axis ("x" or "y")
    need a single tap on the other: a quarter of the gathers."""
    count, channels, height, width = images.shape
    flat = images.reshape(count, channels, height * width)
    columns = _cubic_taps(x, width, "x" in along)
    rows = _cubic_taps(y, height, "y" in along)

    def weighted(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return values if weight is None else values.mul_(weight.unsqueeze(1))

    def total(terms: list[torch.Tensor]) -> torch.Tensor:
        return functools.reduce(torch.Tensor.add_, terms)

    def tap_row(row_start: torch.Tensor) -> torch.Tensor:
        gathered = [flat.gather(2, (row_start + column).view(count, 1, -1).expand(count, channels, -1))
                    for column, _ in columns]
        return total([weighted(values.view(count, channels, *x.shape[1:]), weight)
                      for values, (_, weight) in zip(gathered, columns, strict=True)])

    return total([weighted(tap_row(row * width), weight) for row, weight in rows])
