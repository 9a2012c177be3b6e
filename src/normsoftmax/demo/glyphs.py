"""The embedded demo dataset: Unicode characters rendered with matplotlib's fonts.

The toolkit's main job (train an embedding on some classes, evaluate retrieval on
unseen ones) should run anywhere without downloading a benchmark.  This module
renders such a dataset from the TrueType fonts that ship inside matplotlib
(``matplotlib/mpl-data/fonts/ttf``), so it needs nothing but matplotlib, Pillow,
numpy and fontTools (a matplotlib dependency).

One class is one character.  Every image of a class is that character drawn in a
randomly chosen font face, so a class holds genuinely different drawings of the
same symbol -- the intra-class variation metric learning has to see through:

* **Faces.**  DejaVu Sans / Serif / Sans Mono and STIXGeneral, each in regular,
  bold, italic/oblique and bold-italic, plus the Computer Modern faces cmr10,
  cmss10, cmti10, cmb10, cmtt10 and cmmi10.  A face is used for a character only
  if its ``cmap`` (read with fontTools) maps the code point *and* the rendered
  glyph has ink, so no tofu boxes are drawn.  The Computer Modern files use the
  TeX byte encoding rather than Unicode, so they are restricted to the code points
  where that encoding agrees with ASCII (letters and digits; all printable ASCII
  for the typewriter face).  Display, size-variant, non-Unicode and LastResort
  fonts are never used.  Every class has at least :data:`MIN_FACES` faces.
* **Geometry.**  A random affine map -- rotation (normal, sd 8 degrees, clipped to
  +-20), shear (+-0.25), a mild aspect change (+-10 %) and a translation inside the
  free margin -- with the glyph scaled so that its transformed ink spans 75-92 %
  of the image along its longer side.  A glyph that fills the image matters:
  glyphs covering a third of the image, or 32x32 inputs, trained far more slowly
  with a ResNet18 from scratch on the CPU.  There is no mirroring: 'b' and 'd' are different
  classes (the image pipeline's horizontal flip must stay off for this data).
* **Appearance.**  Random stroke and background colours whose luminances differ by
  at least 0.4 (on a 0-1 scale), over a background texture (gradient, stripes,
  smooth blotches or checks between two nearby colours), then Gaussian pixel
  noise.  Colour and texture therefore carry no class information.
* **Rendering.**  The glyph is drawn by FreeType at about the font size that
  gives the wanted ink size (sizes on a 10 % ladder, so few font objects are
  loaded), transformed at twice the output resolution and box-filtered down, then
  composited in numpy and written as an RGB PNG.

Choosing characters so that classes are distinct
-------------------------------------------------
Candidates come from fixed Unicode blocks (Latin, digits, Greek, Cyrillic,
Armenian, Georgian, Hebrew, Lao, punctuation and currency, letter-like and
technical symbols, arrows, mathematical operators, geometric shapes,
miscellaneous symbols, dingbats), in a fixed priority order.  Dropped are:
combining marks, spaces, controls, modifier letters and symbols, anything with a
Unicode decomposition (accented letters, circled / full-width / font variants,
ligatures, which are near-duplicates of their base), characters in fewer than
:data:`MIN_FACES` usable faces, and glyphs that are very thin (ratio of the ink's
principal axes under :data:`MIN_ASPECT`: 'l', '|', '/', '!', ':', ...) or small
(ink under :data:`MIN_EXTENT` of the em: '.', ',', "'", '-', ...).

Because every glyph is scaled to fill the image, size is not a cue: 'o' and 'O'
become the same picture.  Homoglyphs are removed greedily in priority order (Latin
before Greek before Cyrillic, core alphabets before their extensions): a candidate
is dropped when it duplicates an already kept character.  Two characters are
duplicates when, in at least half of the :data:`COMPARED_FACES` (one face per
design, italics included) that draw both, their size-normalised bitmaps (ink box
padded to a centred square, 24x24) are the same picture -- correlation of the
slightly blurred bitmaps above :data:`DUPLICATE_CORRELATION`, or each one's ink
within 1.5 px of the other's ink up to :data:`DUPLICATE_UNCOVERED` (a test that
tolerates stroke weight, so a thin and a bold ring match) -- when the upper and
lower case of one letter pass looser thresholds in a third of those faces
('К'/'к', 'Щ'/'щ'), or when both are in one of the hand-written
:data:`CONFUSABLE_GROUPS` (pairs that differ by font design rather than shape:
'O'/'0', 'x'/'×', 'a'/'α', 'ß'/'β', '#'/'♯', '«'/'≪', ...).  So Latin 'A' is
kept and Greek 'Α' and Cyrillic 'А' are dropped, and of 'l', 'I', '1', '|' only
'I' remains.  The tests are deliberately conservative: dropping a
distinct character costs one class out of a pool of more than 1300, keeping a
homoglyph would put label noise into both halves.

The classes used are picked round-robin over the script/symbol groups (within a
group, characters drawn in the most faces first), so the first and the second
half -- the training and the test classes -- both mix scripts and symbols.

On disk (the ``folder`` reader's layout)::

    root/train/0000_U+0041/00.png ...   the first num_classes // 2 classes
    root/test/0200_U+25CC/00.png ...    the remaining classes
    root/glyphs.json                    manifest, written last

Each image is seeded from ``(seed, code point, image index)``, so the output does
not depend on the number of worker processes, and the same parameters give
byte-identical files (on the same Pillow/FreeType/matplotlib versions).  A
manifest with matching parameters means the dataset is complete and is reused;
otherwise the dataset is rendered into a temporary sibling folder and swapped in.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import sys
import tempfile
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..runtime import worker_count

__all__ = [
    "GENERATOR_VERSION", "MANIFEST_NAME", "FONT_FACES", "COMPARED_FACES", "CONFUSABLE_GROUPS", "GlyphClass",
    "font_directory", "candidate_classes", "select_classes", "render_glyph_image",
    "generate_glyph_dataset", "read_manifest", "make_contact_sheet",
]

GENERATOR_VERSION = 1
MANIFEST_NAME = "glyphs.json"

MIN_FACES = 3                 # usable faces a character needs to become a candidate
MIN_ASPECT = 0.20             # ink's minor / major principal axis (median over the compared faces)
MIN_EXTENT = 0.30             # ink box long side / em size (median over the compared faces)
# Two characters are the same picture in a face when their size-normalised bitmaps
# correlate above DUPLICATE_CORRELATION, or when at most DUPLICATE_UNCOVERED of either
# one's ink lies farther than _REACH pixels (of _NORM) from the other's ink; the
# looser CASE_* values apply to the upper and lower case of one letter.
DUPLICATE_CORRELATION = 0.90
DUPLICATE_UNCOVERED = 0.04
CASE_CORRELATION = 0.77
CASE_UNCOVERED = 0.10
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024

_REF_PX = 64                  # font size of the reference renderings used for the candidate table
_NORM = 24                    # side of the size-normalised bitmaps compared for homoglyphs
_REACH = 1.5                  # ink-coverage tolerance of that comparison, in pixels of _NORM
_SUPERSAMPLE = 2              # glyphs are transformed at this multiple of the output size

_LETTERS = frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B))
_DIGITS = frozenset(range(0x30, 0x3A))
_PRINTABLE_ASCII = frozenset(range(0x21, 0x7F))

# (name, file, code points the face may draw; None = whatever its Unicode cmap maps)
FONT_FACES: tuple[tuple[str, str, frozenset | None], ...] = (
    ("DejaVuSans", "DejaVuSans.ttf", None),
    ("DejaVuSans-Bold", "DejaVuSans-Bold.ttf", None),
    ("DejaVuSans-Oblique", "DejaVuSans-Oblique.ttf", None),
    ("DejaVuSans-BoldOblique", "DejaVuSans-BoldOblique.ttf", None),
    ("DejaVuSerif", "DejaVuSerif.ttf", None),
    ("DejaVuSerif-Bold", "DejaVuSerif-Bold.ttf", None),
    ("DejaVuSerif-Italic", "DejaVuSerif-Italic.ttf", None),
    ("DejaVuSerif-BoldItalic", "DejaVuSerif-BoldItalic.ttf", None),
    ("DejaVuSansMono", "DejaVuSansMono.ttf", None),
    ("DejaVuSansMono-Bold", "DejaVuSansMono-Bold.ttf", None),
    ("DejaVuSansMono-Oblique", "DejaVuSansMono-Oblique.ttf", None),
    ("DejaVuSansMono-BoldOblique", "DejaVuSansMono-BoldOblique.ttf", None),
    ("STIXGeneral", "STIXGeneral.ttf", None),
    ("STIXGeneral-Bold", "STIXGeneralBol.ttf", None),
    ("STIXGeneral-Italic", "STIXGeneralItalic.ttf", None),
    ("STIXGeneral-BoldItalic", "STIXGeneralBolIta.ttf", None),
    # Computer Modern (BaKoMa): TeX text encoding, which matches ASCII for letters and digits only
    ("cmr10", "cmr10.ttf", _LETTERS | _DIGITS),
    ("cmss10", "cmss10.ttf", _LETTERS | _DIGITS),
    ("cmti10", "cmti10.ttf", _LETTERS | _DIGITS),
    ("cmb10", "cmb10.ttf", _LETTERS | _DIGITS),
    ("cmtt10", "cmtt10.ttf", _PRINTABLE_ASCII),
    ("cmmi10", "cmmi10.ttf", _LETTERS),   # its digits are old-style figures
)


def _r(first: int, last: int) -> range:
    return range(first, last + 1)


# Candidate blocks as (group, code points), in priority order: earlier characters win
# homoglyph ties, so the core alphabets come before their extensions.
_BLOCKS: tuple[tuple[str, Iterable[int]], ...] = (
    ("latin", _r(0x41, 0x5A)), ("latin", _r(0x61, 0x7A)), ("latin", _r(0x30, 0x39)),
    ("greek", _r(0x391, 0x3A9)), ("greek", _r(0x3B1, 0x3C9)),
    ("cyrillic", _r(0x410, 0x44F)),
    ("armenian-georgian", _r(0x531, 0x587)), ("armenian-georgian", _r(0x10D0, 0x10FA)),
    ("hebrew-lao", _r(0x5D0, 0x5EA)),
    ("punctuation-currency", _r(0x21, 0x2F)), ("punctuation-currency", _r(0x3A, 0x40)),
    ("punctuation-currency", _r(0x5B, 0x60)), ("punctuation-currency", _r(0x7B, 0x7E)),
    ("math", _r(0x2200, 0x22FF)),
    ("arrows", _r(0x2190, 0x21FF)),
    ("shapes", _r(0x25A0, 0x25FF)),
    ("symbols", _r(0x2600, 0x26FF)),
    ("dingbats", _r(0x2700, 0x2775)), ("dingbats", _r(0x2794, 0x27BF)),  # not the circled digits 2776-2793
    ("letterlike-technical", _r(0x2100, 0x218F)), ("letterlike-technical", _r(0x2300, 0x23FF)),
    # extensions
    ("latin", _r(0xC0, 0x24F)), ("latin", _r(0x250, 0x2AF)), ("latin", _r(0x2C60, 0x2C7F)),
    ("latin", _r(0xA720, 0xA7FF)),
    ("greek", _r(0x370, 0x3FF)),
    ("cyrillic", _r(0x400, 0x52F)), ("cyrillic", _r(0xA640, 0xA69F)),
    ("armenian-georgian", _r(0x10A0, 0x10FF)),
    ("hebrew-lao", _r(0x5F0, 0x5F4)), ("hebrew-lao", _r(0xE80, 0xEFF)),
    ("punctuation-currency", _r(0xA1, 0xBF)), ("punctuation-currency", (0xD7, 0xF7)),
    ("punctuation-currency", _r(0x2010, 0x205E)), ("punctuation-currency", _r(0x20A0, 0x20CF)),
    ("math", _r(0x27C0, 0x27EF)), ("math", _r(0x2980, 0x29FF)), ("math", _r(0x2A00, 0x2AFF)),
    ("arrows", _r(0x27F0, 0x27FF)), ("arrows", _r(0x2900, 0x297F)),
    ("shapes", _r(0x2B00, 0x2BFF)),
)
_GROUP_ORDER = tuple(dict.fromkeys(group for group, _ in _BLOCKS))

# Characters that read as the same symbol although fonts draw them differently
# (the bitmap comparison catches same-shape pairs on its own).  At most one
# member of a group is kept: the first in candidate order.
CONFUSABLE_GROUPS: tuple[str, ...] = (
    # letters and digits across scripts (and IPA / APL look-alikes)
    "AΑА", "BΒВʙ", "CcСсϹϲⅭ⊂", "EΕЕ", "HΗНʜн", "KΚКкκ", "MΜМм", "NΝɴ", "OoΟοОоՕօ0○◯〇⚪⚬∘◦",
    "PΡРpрρ⍴", "TΤТтτ⊤⊺", "XxΧχХх×⨯╳✕✖", "YΥҮʏ", "ZΖ", "aаɑα⍺", "eе℮", "yуγɣү", "SsЅѕ", "JЈ", "jј",
    "hһհ", "dԁ", "qԛɥ", "WwԜԝ", "VvѴѵν∨⋁", "uυʋս", "UՍ∪⋃", "nпոη", "πп", "gɡ9", "ɛεƐ", "3ЗзƷʒ",
    "bЬ♭", "rг", "lIΙІӀ|ǀ∣1ıɩι⍳⌶", "LʟԼ", "Rʀ", "Gɢ", "fƒ", "FϜϝ", "ςϚϛ", "Ϡϡ", "ϟ⚡☇", "ßβꞵ", "4Ч",
    "6б", "ʎλ⅄", "ΣƩ∑", "Π∏", "Θ⊖ϴ", "∈ϵєЄ€", "Ээ϶∋", "Ø∅ø⌀", "ɸφϕф", "ɷω⍵", "∧Λʌ⋀", "∩⋂Ո", "Ǝ∃", "∀Ɐ", "⊃ɔↄϽↃ",
    "əǝ", "ÞϷ", "þϸ", "ÐĐƉ", "ðδ", "ʃ∫ſ", "∂ә", "ΓГ", "ΦФ", "ΨѰ", "ΛЛ", "℧Ʊ", "דרך", "בכ",
    # punctuation, operators and symbols
    "?ʔɁɂ", "!ǃ", "#♯", "/⁄∕⧸", "\\∖⧵⧹", "+✚➕", ":∶⁚", "∴⁖", "*∗⁎✱", "~∼〜", "÷➗", "∥‖", "≡☰",
    "<‹〈⟨❮❰", ">›〉⟩❯❱", "«≪⟪", "»≫⟫", "(❨", ")❩", "{❴", "}❵", "‡☨", "✓✔", "✗✘", "♥❤", "☆✩",
    "⋆★", "Γ⌈⎡⌜⌐⌌", "⌉⎤⌝¬⌍", "L⌊⎣⌞⌎⌙∟", "⌋⎦⌟⌏", "←⟵", "→⟶", "↔⟷", "⇐⟸", "⇒⟹", "⇔⟺", "↤⟻", "↦⟼",
    # filled / outlined geometric shapes in several sizes
    "·⋅•●∙⬤", "■▪◼⬛", "□◻▫⬜", "▯⎕", "Δ∆△▵", "∇▽▿", "▲▴", "▼▾", "▶▸►", "◀◂◄", "▷▹⊳▻", "◁◃⊲◅",
    "◆⬥♦", "◇⬦⋄", "⊙☉⨀◉", "⊚◎", "⊠⌧☒", "⊡▣",
)


@dataclass(frozen=True)
class GlyphClass:
    """One class: a character, its candidate group and the faces that draw it."""

    char: str
    codepoint: int
    group: str
    faces: tuple[str, ...]

    @property
    def code(self) -> str:
        return f"U+{self.codepoint:04X}"

    def folder_name(self, index: int, width: int = 4) -> str:
        return f"{index:0{width}d}_{self.code}"


# --------------------------------------------------------------------------- fonts

def font_directory() -> Path:
    """matplotlib's bundled TrueType fonts (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


_FACE_FILES = {name: file for name, file, _ in FONT_FACES}

# Faces in which candidates are compared for homoglyphs (and measured for the thin /
# small filters): one per design -- the bold and slanted variants of a design add
# little but time.  Italic designs are included: an italic 'a' is not an upright one.
COMPARED_FACES = frozenset({
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Italic", "DejaVuSansMono",
    "STIXGeneral", "STIXGeneral-Italic", "cmr10", "cmss10", "cmti10", "cmb10", "cmtt10", "cmmi10",
})


@functools.lru_cache(maxsize=1024)
def _font(face: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_directory() / _FACE_FILES[face]), px, layout_engine=ImageFont.Layout.BASIC)


def _ink(char: str, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    """The glyph's coverage (uint8), cropped to its ink; None when it draws nothing."""
    x0, y0, x1, y1 = (int(edge) for edge in font.getbbox(char))
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4))
    ImageDraw.Draw(canvas).text((2 - x0, 2 - y0), char, font=font, fill=255)
    coverage = np.asarray(canvas)
    rows = np.flatnonzero((coverage > 16).any(axis=1))
    cols = np.flatnonzero((coverage > 16).any(axis=0))
    if rows.size == 0:
        return None
    return coverage[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _draws(face: str, codepoint: int) -> bool:
    """The face's glyph for the code point has an outline (not an empty or space glyph)."""
    x0, y0, x1, y1 = _font(face, _REF_PX).getbbox(chr(codepoint))
    return x1 - x0 > 1 and y1 - y0 > 1


@functools.lru_cache(maxsize=65536)
def _extent(face: str, codepoint: int) -> float:
    """Long side of the glyph's ink box at a font size of _REF_PX."""
    coverage = _ink(chr(codepoint), _font(face, _REF_PX))
    return float(max(coverage.shape)) if coverage is not None else float(_REF_PX)


def _cmaps() -> dict[str, frozenset]:
    from fontTools.ttLib import TTFont

    directory = font_directory()
    cmaps = {}
    for name, file, allowed in FONT_FACES:
        path = directory / file
        if not path.is_file():  # a trimmed matplotlib install: do without the face
            continue
        with TTFont(str(path), lazy=True) as font:
            cmap = font.getBestCmap() or {}
        points = frozenset(cmap)
        cmaps[name] = points & allowed if allowed is not None else points
    return cmaps


# --------------------------------------------------------------------------- candidates

def _wanted(codepoint: int) -> bool:
    char = chr(codepoint)
    category = unicodedata.category(char)
    return (category[0] in "LNPS" and category not in ("Lm", "Sk")
            and not unicodedata.decomposition(char))


def _elongation(coverage: np.ndarray) -> float:
    """sqrt(minor / major eigenvalue) of the ink's second moments: 1 for a disc, ~0 for a line at any angle."""
    weight = coverage.astype(np.float64)
    total = weight.sum()
    ys, xs = np.indices(weight.shape, dtype=np.float64)
    my, mx = (weight * ys).sum() / total, (weight * xs).sum() / total
    syy = (weight * (ys - my) ** 2).sum() / total
    sxx = (weight * (xs - mx) ** 2).sum() / total
    sxy = (weight * (xs - mx) * (ys - my)).sum() / total
    half_trace, spread = (sxx + syy) / 2, math.hypot((sxx - syy) / 2, sxy)
    return math.sqrt(max(half_trace - spread, 0.0) / max(half_trace + spread, 1e-12))


def _normalised(coverage: np.ndarray) -> np.ndarray:
    """Ink box padded to a centred square and resized to _NORM x _NORM (float, 0-255)."""
    h, w = coverage.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = coverage
    return np.asarray(Image.fromarray(square).resize((_NORM, _NORM), Image.Resampling.BOX), np.float32)


def _signatures(bitmaps: np.ndarray) -> np.ndarray:
    """Blurred, mean-removed, unit-length rows: their dot products are correlations."""
    x = np.pad(bitmaps, ((0, 0), (1, 1), (1, 1)))
    x = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
    x = 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]
    x = x.reshape(len(x), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _uncovered(bitmaps: np.ndarray) -> np.ndarray:
    """u[i, j]: the fraction of glyph i's ink farther than _REACH pixels from glyph j's ink."""
    ink = bitmaps > 64
    r = int(math.ceil(_REACH))
    padded = np.pad(ink, ((0, 0), (r, r), (r, r)))
    near = np.zeros_like(ink)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= _REACH * _REACH:
                near |= padded[:, r + dy:r + dy + _NORM, r + dx:r + dx + _NORM]
    ink = ink.reshape(len(ink), -1).astype(np.float32)
    far = (~near).reshape(len(near), -1).astype(np.float32)
    return (ink @ far.T) / np.maximum(ink.sum(axis=1, keepdims=True), 1.0)


def _render_candidates() -> tuple[list[tuple[int, str, tuple[str, ...]]], list[dict], list[str]]:
    """Candidates that pass the per-character filters, with their normalised bitmaps per face."""
    cmaps = _cmaps()
    faces = [name for name, _, _ in FONT_FACES if name in cmaps]
    seen: set[int] = set()
    infos, bitmaps = [], []
    for group, block in _BLOCKS:
        for cp in block:
            if cp in seen or not _wanted(cp):
                continue
            seen.add(cp)
            have = [face for face in faces if cp in cmaps[face] and _draws(face, cp)]
            if len(have) < MIN_FACES:
                continue
            aspects, sizes, maps = [], [], {}
            for face in [face for face in have if face in COMPARED_FACES] or have[:1]:
                coverage = _ink(chr(cp), _font(face, _REF_PX))
                if coverage is None:
                    continue
                aspects.append(_elongation(coverage))
                sizes.append(max(coverage.shape) / _REF_PX)
                maps[face] = _normalised(coverage)
            if not maps or np.median(aspects) < MIN_ASPECT or np.median(sizes) < MIN_EXTENT:
                continue
            infos.append((cp, group, tuple(have)))
            bitmaps.append(maps)
    return infos, bitmaps, faces


def _duplicates(infos: list, bitmaps: list[dict], faces: list[str]) -> np.ndarray:
    """Boolean matrix: candidates i and j must not both be classes."""
    n = len(infos)
    present = np.array([[face in maps for face in faces] for maps in bitmaps], np.float32)
    shared = present @ present.T                 # compared faces that draw both
    alike = np.zeros((n, n), np.float32)         # ... in which the two are the same picture
    # the upper and lower case of one letter get the looser CASE_* test
    by_case: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        by_case.setdefault(chr(info[0]).lower(), []).append(i)
    case_pairs = np.array([(i, j) for members in by_case.values() for i in members for j in members if i != j],
                          np.int64).reshape(-1, 2)
    case_alike = np.zeros(len(case_pairs), np.float32)
    for column, face in enumerate(faces):
        idx = np.flatnonzero(present[:, column])
        if idx.size < 2:
            continue
        stack = np.stack([bitmaps[i][face] for i in idx])
        signatures = _signatures(stack)
        correlation = signatures @ signatures.T
        uncovered = _uncovered(stack)
        uncovered = np.maximum(uncovered, uncovered.T)
        rows, cols = np.nonzero((correlation > DUPLICATE_CORRELATION) | (uncovered <= DUPLICATE_UNCOVERED))
        np.add.at(alike, (idx[rows], idx[cols]), 1.0)
        local = np.full(n, -1, np.int64)
        local[idx] = np.arange(idx.size)
        li, lj = local[case_pairs[:, 0]], local[case_pairs[:, 1]]
        both = (li >= 0) & (lj >= 0)
        case_alike[both] += ((correlation[li[both], lj[both]] > CASE_CORRELATION)
                             | (uncovered[li[both], lj[both]] <= CASE_UNCOVERED))
    # the same picture in at least half of the compared faces that draw both
    duplicate = (shared > 0) & (2 * alike >= shared)
    pair_shared = shared[case_pairs[:, 0], case_pairs[:, 1]]
    case_duplicate = (pair_shared > 0) & (3 * case_alike >= pair_shared)  # a third of the faces suffices
    duplicate[case_pairs[case_duplicate, 0], case_pairs[case_duplicate, 1]] = True
    position = {info[0]: i for i, info in enumerate(infos)}
    for group in CONFUSABLE_GROUPS:
        members = [position[ord(c)] for c in group if ord(c) in position]
        duplicate[np.ix_(members, members)] = True
    np.fill_diagonal(duplicate, False)
    return duplicate


@functools.lru_cache(maxsize=1)
def candidate_classes() -> tuple[GlyphClass, ...]:
    """Every usable, mutually distinct character, in candidate (priority) order.

    Greedy: a candidate is kept unless it duplicates one kept before it.
    Deterministic for a given set of matplotlib fonts and Pillow/FreeType build.
    """
    infos, bitmaps, faces = _render_candidates()
    duplicate = _duplicates(infos, bitmaps, faces)
    result, chosen = [], np.zeros(len(infos), bool)
    for i, (cp, group, names) in enumerate(infos):
        if duplicate[i, chosen].any():
            continue
        chosen[i] = True
        result.append(GlyphClass(chr(cp), cp, group, names))
    return tuple(result)


def select_classes(num_classes: int) -> list[GlyphClass]:
    """The generator's class order: round-robin over groups, most faces first within a group."""
    pool = candidate_classes()
    if num_classes > len(pool):
        raise ValueError(f"num_classes={num_classes} but only {len(pool)} distinct characters are available "
                         f"from matplotlib's fonts")
    queues: dict[str, list[GlyphClass]] = {}
    for glyph in pool:
        queues.setdefault(glyph.group, []).append(glyph)
    order = {glyph.codepoint: rank for rank, glyph in enumerate(pool)}
    for group in queues:
        queues[group].sort(key=lambda g: (-len(g.faces), order[g.codepoint]))
    picked: list[GlyphClass] = []
    round_index = 0
    while len(picked) < num_classes:
        for group in _GROUP_ORDER:
            queue = queues.get(group, [])
            if round_index < len(queue) and len(picked) < num_classes:
                picked.append(queue[round_index])
        round_index += 1
    return picked


# --------------------------------------------------------------------------- rendering

MIN_CONTRAST = 0.4  # least luminance difference between the stroke and any background colour


def _with_luminance(colour: np.ndarray, target: float) -> np.ndarray:
    """The colour darkened towards black or lightened towards white to the target luminance."""
    y = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    if y > target:
        return colour * (target / y)
    return 1.0 - (1.0 - colour) * ((1.0 - target) / max(1.0 - y, 1e-6))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stroke colour and two nearby background colours, the stroke contrasting with both."""
    stroke_y = rng.uniform(0.0, 1.0)
    below = max(stroke_y - MIN_CONTRAST, 0.0)          # room for a darker background: [0, below]
    above = max(1.0 - (stroke_y + MIN_CONTRAST), 0.0)  # room for a lighter one: [1 - above, 1]
    pick = rng.uniform(0.0, below + above)
    low, high = (0.0, below) if pick < below else (1.0 - above, 1.0)
    back_y = low + pick if pick < below else 1.0 - above + (pick - below)
    back2_y = float(np.clip(back_y + rng.normal(0.0, 0.1), low, high))
    hues = rng.random((3, 3))
    return (_with_luminance(hues[0], stroke_y), _with_luminance(hues[1], back_y),
            _with_luminance(hues[2], back2_y))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A [0, 1] field: linear gradient, stripes, smooth blotches or checks."""
    kind = int(rng.integers(4))
    yy, xx = _grid(size)
    angle = rng.uniform(0.0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:
        field = along
    elif kind == 1:
        period = rng.uniform(0.08, 0.3)
        field = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            field = (field > 0.5).astype(np.float32)
    elif kind == 2:
        cells = int(rng.integers(3, 7))
        coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
        field = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    else:
        cells = int(rng.integers(2, 7))
        across = -xx * math.sin(angle) + yy * math.cos(angle)
        field = ((np.floor(along * cells) + np.floor(across * cells)) % 2).astype(np.float32)
    low, high = float(field.min()), float(field.max())
    return ((field - low) / (high - low)).astype(np.float32) if high > low else np.zeros_like(field)


def _coverage_image(glyph: GlyphClass, rng: np.random.Generator, size: int) -> np.ndarray:
    """The glyph's coverage in [0, 1] after the random affine map, size x size."""
    pick = int(rng.integers(len(glyph.faces)))
    face = glyph.faces[pick]
    extent = _extent(face, glyph.codepoint)
    fill = rng.uniform(0.75, 0.92)
    rotation = math.radians(float(np.clip(rng.normal(0.0, 8.0), -20.0, 20.0)))
    shear = rng.uniform(-0.25, 0.25)
    aspect = math.exp(rng.uniform(-0.1, 0.1))
    shift = rng.uniform(-0.5, 0.5, 2)

    canvas = size * _SUPERSAMPLE
    target = fill * canvas
    # font sizes on a ladder (steps of 10 %, at or above the size wanted) keep the number of
    # loaded FreeType faces small; the affine map then scales down by at most 10 %
    wanted = max(4.0, _REF_PX * target / extent)
    px = int(math.ceil(4 * 1.1 ** math.ceil(math.log(wanted / 4) / math.log(1.1) - 1e-9)))
    coverage = _ink(glyph.char, _font(face, px))
    if coverage is None:  # cannot happen for faces in the table; keep a blank image rather than crash
        return np.zeros((size, size), np.float32)
    h, w = coverage.shape

    # linear part: rotation @ shear @ aspect, as plain floats (no BLAS in worker processes)
    cos, sin = math.cos(rotation), math.sin(rotation)
    m00, m01 = cos * aspect, (cos * shear - sin) / aspect
    m10, m11 = sin * aspect, (sin * shear + cos) / aspect
    # fit the transformed ink itself, not its rotated box: the leftmost and rightmost ink
    # pixel of each row include the ink's convex-hull vertices
    ink = coverage > 32
    rows = np.flatnonzero(ink.any(axis=1))
    first = ink[rows].argmax(axis=1)
    last = w - ink[rows, ::-1].argmax(axis=1)
    xs = np.concatenate([first, last, first, last]).astype(np.float64)
    ys = np.concatenate([rows, rows, rows + 1, rows + 1]).astype(np.float64)
    moved_x, moved_y = m00 * xs + m01 * ys, m10 * xs + m11 * ys
    low_x, high_x, low_y, high_y = moved_x.min(), moved_x.max(), moved_y.min(), moved_y.max()
    scale = target / max(high_x - low_x, high_y - low_y)
    m00, m01, m10, m11 = m00 * scale, m01 * scale, m10 * scale, m11 * scale
    # the transformed ink box's centre goes to a random place within the free margin
    centre_x = canvas / 2 + shift[0] * max(canvas - scale * (high_x - low_x), 0.0)
    centre_y = canvas / 2 + shift[1] * max(canvas - scale * (high_y - low_y), 0.0)
    tx = centre_x - scale * (low_x + high_x) / 2
    ty = centre_y - scale * (low_y + high_y) / 2
    # PIL wants the inverse map: output pixel -> input pixel
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    data = (i00, i01, -(i00 * tx + i01 * ty), i10, i11, -(i10 * tx + i11 * ty))
    warped = Image.fromarray(coverage).transform((canvas, canvas), Image.Transform.AFFINE, data,
                                                 resample=Image.Resampling.BILINEAR)
    if _SUPERSAMPLE > 1:
        warped = warped.reduce(_SUPERSAMPLE)
    return np.asarray(warped, np.float32) * np.float32(1 / 255)


def render_glyph_image(glyph: GlyphClass, index: int, seed: int, image_size: int) -> np.ndarray:
    """Image ``index`` of ``glyph``'s class as an (image_size, image_size, 3) uint8 array.

    Depends only on (seed, code point, index, image_size).
    """
    rng = np.random.default_rng([int(seed), glyph.codepoint, int(index), GENERATOR_VERSION])
    alpha = _coverage_image(glyph, rng, image_size)[..., None]
    stroke, back, back2 = (255.0 * c.astype(np.float32) for c in _colours(rng))
    field = _texture(rng, image_size)[..., None]
    image = back + (back2 - back) * field        # textured background
    image += (stroke - image) * alpha            # glyph over it
    sigma = np.float32(255.0 * rng.uniform(0.0, 0.06))
    image += sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image += 0.5
    return np.clip(image, 0, 255).astype(np.uint8)


def _render_class(task: tuple) -> int:
    folder, glyph, images_per_class, image_size, seed, width = task
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(images_per_class):
        pixels = render_glyph_image(glyph, index, seed, image_size)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
        (folder / f"{index:0{width}d}.png").write_bytes(buffer.getvalue())
    return images_per_class


# --------------------------------------------------------------------------- dataset

def read_manifest(root: str | os.PathLike) -> dict | None:
    """The dataset's manifest, or None when missing or unreadable."""
    try:
        with open(Path(root) / MANIFEST_NAME, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _check(num_classes, images_per_class, image_size, seed, workers) -> None:
    def integer(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")

    for name, value in (("num_classes", num_classes), ("images_per_class", images_per_class),
                        ("image_size", image_size), ("seed", seed)):
        integer(name, value)
    if num_classes < 4:
        raise ValueError(f"num_classes={num_classes}: need at least 4 (2 training and 2 test classes)")
    if images_per_class < 2:
        raise ValueError(f"images_per_class={images_per_class}: retrieval needs at least 2 images per class")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size}: must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    if workers is not None:
        integer("workers", workers)
        if workers < 1:
            raise ValueError(f"workers={workers}: must be >= 1 (or None for all cores)")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise generations of the same root across processes (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ours(root: Path) -> bool:
    """True when root holds nothing but a (possibly partial) glyph dataset."""
    return all(entry.name in ("train", "test", MANIFEST_NAME) for entry in root.iterdir())


def _render_all(tasks: Sequence[tuple], workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(task[2] for task in tasks)
    with tqdm(total=total, unit="img", desc="rendering glyphs", disable=not progress) as bar:
        import multiprocessing

        if workers == 1 or len(tasks) == 1 or multiprocessing.current_process().daemon:  # daemons can't fork
            for task in tasks:
                bar.update(_render_class(task))
            return
        method = "fork" if sys.platform.startswith("linux") else None
        with multiprocessing.get_context(method).Pool(min(workers, len(tasks))) as pool:
            for count in pool.imap_unordered(_render_class, tasks):
                bar.update(count)


def generate_glyph_dataset(root: str | os.PathLike, num_classes: int = 400, images_per_class: int = 24,
                           image_size: int = 64, seed: int = 0, workers: int | None = None,
                           progress: bool = True) -> Path:
    """Render the glyph dataset into ``root`` (or reuse it) and return ``root`` as a Path.

    ``root/train/<class>/<i>.png`` holds the first ``num_classes // 2`` classes,
    ``root/test/<class>/<i>.png`` the rest; ``root/glyphs.json`` is written last.
    A complete dataset with the same parameters is returned untouched; anything
    else (other parameters, no manifest after an interrupted run) is re-rendered
    into a temporary sibling folder that then replaces ``root``.  ``workers``
    processes render in parallel (default: all cores) with output identical to a
    serial run.  Raises ValueError for impossible parameters and FileExistsError
    when ``root`` holds files that are not a glyph dataset.
    """
    _check(num_classes, images_per_class, image_size, seed, workers)
    root = Path(root).expanduser().absolute()
    params = {"num_classes": int(num_classes), "images_per_class": int(images_per_class),
              "image_size": int(image_size), "seed": int(seed)}

    def current() -> bool:
        manifest = read_manifest(root)
        return (manifest is not None and manifest.get("generator_version") == GENERATOR_VERSION
                and manifest.get("params") == params)

    if current():
        return root
    classes = select_classes(num_classes)  # raises ValueError for too many classes
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if current():  # another process finished it while we waited
            return root
        if root.exists() and (not root.is_dir() or not _ours(root)):
            raise FileExistsError(f"{root} exists and holds other files than a glyph dataset; refusing to replace it")
        for pattern in (f".{root.name}.tmp-*", f".{root.name}.old-*"):  # left by killed runs; we hold the lock
            for stale in root.parent.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            manifest = _generate_into(staging, classes, params, worker_count(workers), progress)
            with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1, ensure_ascii=False)
                handle.write("\n")
            if root.exists():
                retired = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, retired)
                os.rename(staging, root)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(staging, root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return root


def _generate_into(folder: Path, classes: list[GlyphClass], params: dict, workers: int, progress: bool) -> dict:
    num_classes, images_per_class = params["num_classes"], params["images_per_class"]
    num_train = num_classes // 2
    class_width = max(4, len(str(num_classes - 1)))
    image_width = max(2, len(str(images_per_class - 1)))
    tasks, entries = [], []
    for index, glyph in enumerate(classes):
        split = "train" if index < num_train else "test"
        name = glyph.folder_name(index, class_width)
        tasks.append((str(folder / split / name), glyph, images_per_class, params["image_size"], params["seed"],
                      image_width))
        entries.append({"index": index, "split": split, "folder": f"{split}/{name}", "char": glyph.char,
                        "codepoint": glyph.code, "name": unicodedata.name(glyph.char, glyph.code),
                        "group": glyph.group, "fonts": list(glyph.faces)})
    _render_all(tasks, workers, progress)
    files = sum(1 for _ in folder.glob("*/*/*.png"))
    if files != num_classes * images_per_class:
        raise RuntimeError(f"rendered {files} images, expected {num_classes * images_per_class}")
    import matplotlib
    import PIL

    return {
        "generator": "normsoftmax.demo.glyphs",
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "num_files": files,
        "splits": {"train": num_train, "test": num_classes - num_train},
        "classes": entries,
        "font_files": {face: _FACE_FILES[face] for face in sorted({f for glyph in classes for f in glyph.faces})},
        "font_directory": str(font_directory()),
        "software": {"pillow": PIL.__version__, "matplotlib": matplotlib.__version__, "numpy": np.__version__},
    }


def make_contact_sheet(root: str | os.PathLike, path: str | os.PathLike, num_classes: int = 8,
                       images_per_class: int = 8, scale: int = 1) -> Path:
    """Save a grid of a dataset's images (a row per class, from both splits) for a visual check."""
    root = Path(root)
    folders = sorted((root / "train").iterdir())[: (num_classes + 1) // 2] + \
        sorted((root / "test").iterdir())[: num_classes // 2]
    rows = [sorted(folder.glob("*.png"))[:images_per_class] for folder in folders]
    with Image.open(rows[0][0]) as first:
        cell = first.size[0] * scale
    sheet = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, file in enumerate(row):
            with Image.open(file) as image:
                sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x * cell, y * cell))
    path = Path(path)
    sheet.save(path)
    return path
