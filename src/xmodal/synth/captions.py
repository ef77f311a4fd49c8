"""Phrasing: turn scene specs and event stories into varied English captions.

Three registers, on purpose: the pretraining corpus (plain attribute lists), the shifted
image set (synonyms, relations, other sentence frames: text the pretrained model has never
read) and the video set (ordered events joined by temporal connectives, including
"Y after X", where the surface order is the reverse of the temporal order). Video captions
come plain (the pretraining words for objects) or, in the downstream world, in the
`"target"` register: the shifted set's synonyms ("the violet disc slides left").
Every phrasing keeps the full content, so each caption identifies its scene.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from xmodal.synth.scenes import CELL_NAMES, Thing

Rng = np.random.Generator


def _pick(rng: Rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows."""
    return "an" if phrase[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


# --------------------------------------------------------------- pretraining register
_POSITION = {
    "top left": ["in the top left corner", "at the top left"],
    "top": ["at the top", "at the top center"],
    "top right": ["in the top right corner", "at the top right"],
    "left": ["on the left", "on the left side"],
    "center": ["in the center", "in the middle"],
    "right": ["on the right", "on the right side"],
    "bottom left": ["in the bottom left corner", "at the bottom left"],
    "bottom": ["at the bottom", "at the bottom center"],
    "bottom right": ["in the bottom right corner", "at the bottom right"],
}


def position_phrase(cell: Tuple[int, int], rng: Rng) -> str:
    return _pick(rng, _POSITION[CELL_NAMES[tuple(cell)]])


def object_phrase(thing: Thing, rng: Rng, determiner: str = "a") -> str:
    """'a small red striped circle' / 'a small red circle with stripes' (determiner 'a' or 'the')."""
    texture_adj = {"solid": "", "striped": "striped", "dotted": "dotted"}[thing.texture]
    texture_post = {"solid": "", "striped": "with stripes", "dotted": "with dots"}[thing.texture]
    if thing.texture == "solid" and rng.random() < 0.2:
        texture_adj = "plain"
    if texture_post and rng.random() < 0.5:
        words = [thing.size, thing.colour, thing.shape, texture_post]
    else:
        words = [thing.size, thing.colour, texture_adj, thing.shape]
    core = " ".join(w for w in words if w)
    return with_article(core) if determiner == "a" else f"the {core}"


def image_caption(things: Sequence[Thing], rng: Rng) -> str:
    """One pretraining caption naming every object with its attributes and position."""
    order = rng.permutation(len(things))
    parts = [f"{object_phrase(things[i], rng)} {position_phrase(things[i].cell, rng)}" for i in order]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    frame = _pick(rng, ["{}", "{}", "an image of {}", "a picture of {}", "there is {}" if len(parts) == 1 else "there are {}"])
    return frame.format(body)


# ------------------------------------------------------------------- shifted register
_SHAPE_SYNONYMS = {
    "circle": ["disc", "round disk", "circle"],
    "square": ["box", "block", "square"],
    "triangle": ["triangle", "three-sided shape"],
    "diamond": ["rhombus", "diamond shape"],
    "cross": ["plus sign", "plus shape"],
    "star": ["five-pointed star", "star shape"],
}
_SIZE_SYNONYMS = {"small": ["tiny", "little", "small"], "large": ["big", "huge", "large"]}
_COLOUR_SYNONYMS = {"purple": ["violet", "purple"], "cyan": ["turquoise", "cyan"]}
_TEXTURE_SHIFTED = {"solid": ["", "", "single-coloured"], "striped": ["stripy", "lined"], "dotted": ["spotted", "speckled"]}
_POSITION_SHIFTED = {
    "top left": ["up in the left corner", "in the upper left"],
    "top": ["near the top edge", "up top"],
    "top right": ["up in the right corner", "in the upper right"],
    "left": ["along the left edge", "on the left-hand side"],
    "center": ["right in the middle", "at the centre"],
    "right": ["along the right edge", "on the right-hand side"],
    "bottom left": ["down in the left corner", "in the lower left"],
    "bottom": ["near the bottom edge", "down below"],
    "bottom right": ["down in the right corner", "in the lower right"],
}
_BACKGROUND_WORDS = {
    "gradient": ["a gradient background", "a smoothly shaded background"],
    "noise": ["a noisy background", "a grainy background"],
    "light": ["a pale background", "a light plain background"],
}


def shifted_object_phrase(thing: Thing, rng: Rng) -> str:
    size = _pick(rng, _SIZE_SYNONYMS[thing.size])
    colour = _pick(rng, _COLOUR_SYNONYMS.get(thing.colour, [thing.colour]))
    texture = _pick(rng, _TEXTURE_SHIFTED[thing.texture])
    shape = _pick(rng, _SHAPE_SYNONYMS[thing.shape])
    return with_article(" ".join(w for w in (size, texture, colour, shape) if w))


def _relation(a: Thing, b: Thing) -> Optional[str]:
    """Spatial relation of a to b from their cells, or None if they share no axis order."""
    (ax, ay), (bx, by) = a.cell, b.cell
    if ay == by and ax != bx:
        return "to the left of" if ax < bx else "to the right of"
    if ax == bx and ay != by:
        return "above" if ay < by else "below"
    return None


def shifted_captions(things: Sequence[Thing], background: str, rng: Rng, k: int) -> List[str]:
    """`k` distinct captions in the shifted register (synonyms, relations, new sentence frames)."""
    out: List[str] = []
    attempts = 0
    while len(out) < k and attempts < 20 * k:
        attempts += 1
        order = list(rng.permutation(len(things)))
        phrases = [(i, shifted_object_phrase(things[i], rng)) for i in order]
        style = int(rng.integers(4))
        if style == 0:  # "we can see A up top and B on the left-hand side"
            parts = [f"{p} {_pick(rng, _POSITION_SHIFTED[CELL_NAMES[things[i].cell]])}" for i, p in phrases]
            caption = _pick(rng, ["we can see {}", "the picture shows {}", "this scene contains {}"]).format(
                _join(parts))
        elif style == 1:  # count + background
            parts = [f"{p} {_pick(rng, _POSITION_SHIFTED[CELL_NAMES[things[i].cell]])}" for i, p in phrases]
            n = len(things)
            count = {1: "one shape", 2: "two shapes", 3: "three shapes"}[n]
            caption = f"{count} on {_pick(rng, _BACKGROUND_WORDS[background])}: {_join(parts)}"
        elif style == 2 and len(things) >= 2:  # relations between consecutive objects
            clauses = []
            for (i, p), (j, q) in zip(phrases, phrases[1:]):
                rel = _relation(things[i], things[j])
                where_i = _pick(rng, _POSITION_SHIFTED[CELL_NAMES[things[i].cell]])
                where_j = _pick(rng, _POSITION_SHIFTED[CELL_NAMES[things[j].cell]])
                clauses.append(f"{p} {rel} {q}" if rel else f"{p} {where_i} and {q} {where_j}")
            caption = "; ".join(clauses)
        else:  # "in the upper left there is A"
            parts = [f"{_pick(rng, _POSITION_SHIFTED[CELL_NAMES[things[i].cell]])} there is {p}" for i, p in phrases]
            caption = ", and ".join(parts)
        if caption not in out:
            out.append(caption)
    return out


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------- video register
REGISTERS = ("plain", "target")


def noun(thing: Thing, rng: Rng, determiner: str = "the", colour: Optional[str] = None,
         register: str = "plain") -> str:
    """'the red circle', sometimes with size or texture ('the small red circle').

    The target register names the same attributes with the shifted set's words
    ('the little turquoise rhombus').
    """
    colour = colour or thing.colour
    if register == "target":
        words = [_pick(rng, _COLOUR_SYNONYMS.get(colour, [colour])), _pick(rng, _SHAPE_SYNONYMS[thing.shape])]
    else:
        words = [colour, thing.shape]
    r = rng.random()
    if r < 0.25:
        words.insert(0, _pick(rng, _SIZE_SYNONYMS[thing.size]) if register == "target" else thing.size)
    elif r < 0.35 and thing.texture != "solid":
        words.insert(0, _pick(rng, _TEXTURE_SHIFTED[thing.texture]) if register == "target" else thing.texture)
    core = " ".join(words)
    return with_article(core) if determiner == "a" else f"the {core}"


def event_clause(kind: str, thing: Thing, rng: Rng, direction: Optional[str] = None,
                 colour_to: Optional[str] = None, colour_now: Optional[str] = None,
                 where: Optional[Tuple[int, int]] = None, register: str = "plain") -> str:
    """One event as a clause: 'the red circle moves left', 'a blue square appears', ...

    `colour_now` is the actor's colour when the event happens; `where` the cell an
    appearing object appears in or a disappearing one leaves; `register` is "plain" or
    "target" (synonyms for colours, shapes, sizes, textures and positions).
    """
    if register not in REGISTERS:
        raise ValueError(f"register must be one of {REGISTERS}, got {register!r}")
    if kind == "move":
        np_ = noun(thing, rng, colour=colour_now, register=register)
        if direction in ("left", "right"):
            verb = _pick(rng, [f"moves {direction}", f"slides to the {direction}", f"moves to the {direction}",
                               f"goes {direction}"])
        else:
            verb = _pick(rng, [f"moves {direction}", f"slides {direction}", f"goes {direction}"])
        return f"{np_} {verb}"
    if kind == "appear":
        np_ = noun(thing, rng, determiner="a", colour=colour_now, register=register)
        verb = _pick(rng, ["appears", "shows up", "pops up"])
        if where is not None and rng.random() < 0.4:
            verb += " " + (_pick(rng, _POSITION_SHIFTED[CELL_NAMES[tuple(where)]]) if register == "target"
                           else position_phrase(where, rng))
        return f"{np_} {verb}"
    if kind == "disappear":
        np_ = noun(thing, rng, colour=colour_now, register=register)
        return f"{np_} {_pick(rng, ['disappears', 'vanishes', 'goes away'])}"
    if kind == "recolour":
        if register == "target":
            colour_to = _pick(rng, _COLOUR_SYNONYMS.get(colour_to, [colour_to]))
        verb = _pick(rng, [f"turns {colour_to}", f"changes colour to {colour_to}", f"becomes {colour_to}"])
        return f"{noun(thing, rng, colour=colour_now, register=register)} {verb}"
    if kind == "grow":
        np_ = noun(thing, rng, colour=colour_now, register=register)
        return f"{np_} {_pick(rng, ['grows', 'gets bigger', 'grows larger'])}"
    if kind == "shrink":
        np_ = noun(thing, rng, colour=colour_now, register=register)
        return f"{np_} {_pick(rng, ['shrinks', 'gets smaller', 'shrinks down'])}"
    raise ValueError(f"unknown event kind {kind!r}")


_TWO = ["{0}, then {1}", "first {0}, then {1}", "{0}, and after that {1}", "{0} before {1}",
        "after {0}, {1}", "{1} after {0}", "{0}. then {1}"]
_THREE = ["{0}, then {1}, and finally {2}", "first {0}, then {1}, then {2}", "{0}; next {1}; last {2}",
          "{0}, then {1} before {2}"]
_ONE = ["{0}", "in this clip {0}", "{0} in the video"]


def join_events(clauses: Sequence[str], rng: Rng) -> str:
    """Join clauses given in temporal order with a temporal connective."""
    templates = {1: _ONE, 2: _TWO, 3: _THREE}.get(len(clauses))
    if templates is None:
        return ", then ".join(clauses)
    return _pick(rng, templates).format(*clauses)
