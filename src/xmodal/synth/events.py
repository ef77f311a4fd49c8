"""Video stories: objects, an ordered list of events, and the hard negatives they imply.

A story is a few actors on a 3x3 grid and 1-3 events, each acting on a different actor:
move (one cell left/right/up/down), appear, disappear, recolour, grow, shrink. Event k
happens during seconds [k*S + 1, k*S + 3] of a clip of S seconds per event, so a 1 fps
sampler sees the state before, during and after every event.

Hard negatives are stories with the same actors and background whose difference only time
can tell: the same events in the opposite order (`swapped`), or one event played backwards
(`time_reversed`: left <-> right, appear <-> disappear, grow <-> shrink, red->blue <->
blue->red). A mean-pooled single-frame model sees nearly the same set of frames for both.

`background` is a backdrop spec (`scenes.sample_backdrop`, drawn by `scenes.backdrop_image`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from xmodal.synth import captions as phr
from xmodal.synth.scenes import (
    CELL_NAMES, CELLS, COLOURS, DIRECTIONS, SHAPES, SIZES, TEXTURES, Shape, Thing, backdrop_image, cell_centre,
    radius_px, render,
)

EVENT_KINDS: Tuple[str, ...] = ("move", "appear", "disappear", "recolour", "grow", "shrink")
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_REVERSE_KIND = {"appear": "disappear", "disappear": "appear", "grow": "shrink", "shrink": "grow",
                 "move": "move", "recolour": "recolour"}


@dataclass(frozen=True)
class Event:
    kind: str
    actor: int
    direction: Optional[str] = None  # move
    colour: Optional[str] = None     # recolour: the new colour

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "actor": self.actor}
        if self.direction:
            d["direction"] = self.direction
        if self.colour:
            d["colour"] = self.colour
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        return cls(d["kind"], int(d["actor"]), d.get("direction"), d.get("colour"))


@dataclass(frozen=True)
class Story:
    """Actors in their state at t=0 (`present` says who is visible), events in temporal order."""

    actors: Tuple[Thing, ...]
    present: Tuple[bool, ...]
    events: Tuple[Event, ...]
    jitter: Tuple[Tuple[float, float], ...]
    background: Dict  # backdrop spec, e.g. {"kind": "gradient", "a": [r, g, b], "b": [r, g, b], "angle": 1.2}

    def to_dict(self) -> dict:
        return {
            "actors": [a.to_dict() for a in self.actors],
            "present": list(self.present),
            "events": [e.to_dict() for e in self.events],
            "jitter": [list(j) for j in self.jitter],
            "background": dict(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Story":
        return cls(tuple(Thing.from_dict(a) for a in d["actors"]), tuple(bool(p) for p in d["present"]),
                   tuple(Event.from_dict(e) for e in d["events"]), tuple(tuple(j) for j in d["jitter"]),
                   dict(d["background"]))


# -------------------------------------------------------------------------- sampling
def _shift(cell: Tuple[int, int], direction: str) -> Tuple[int, int]:
    dx, dy = DIRECTIONS[direction]
    return cell[0] + dx, cell[1] + dy


def sample_story(rng: np.random.Generator, n_events: int = 2, n_static: Optional[int] = None,
                 colours: Optional[Sequence[str]] = None, backdrop: Optional[Dict] = None) -> Story:
    """A random valid story: distinct colours (from `colours`), no two actors ever share a cell.

    `backdrop` is the scene's backdrop spec; without one a dark gradient is drawn.
    """
    if not 1 <= n_events <= 3:
        raise ValueError(f"n_events must be 1..3, got {n_events}")
    palette = list(colours or COLOURS)
    if n_static is None:
        n_static = int(rng.integers(0, 2))
    if len(palette) < n_events + n_static + n_events:  # every actor and every recolour needs its own colour
        raise ValueError(f"{len(palette)} colours cannot give {n_events + n_static} actors distinct colours")
    while True:  # rejection sampling; almost always succeeds first time
        story = _try_sample(rng, n_events, n_static, palette, backdrop)
        if story is not None:
            return story


def _try_sample(rng: np.random.Generator, n_events: int, n_static: int, palette: List[str],
                backdrop: Optional[Dict]) -> Optional[Story]:
    n = n_events + n_static
    colours = list(rng.permutation(palette))
    kinds = [EVENT_KINDS[int(i)] for i in rng.integers(len(EVENT_KINDS), size=n_events)]
    occupied: set = set()
    actors, present, events = [], [], []
    free_colours = colours[n:]
    for i in range(n):
        kind = kinds[i] if i < n_events else None
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        if kind == "grow":
            size = "small"
        elif kind == "shrink":
            size = "large"
        cells = [c for c in CELLS if c not in occupied]
        if kind == "move":
            options = [(c, d) for c in cells for d in DIRECTIONS if _shift(c, d) in cells]
            if not options:
                return None
            cell, direction = options[int(rng.integers(len(options)))]
            occupied.update({cell, _shift(cell, direction)})
        else:
            if not cells:
                return None
            cell, direction = cells[int(rng.integers(len(cells)))], None
            occupied.add(cell)
        actors.append(Thing(shape, str(colours[i]), size, texture, cell))
        present.append(kind != "appear")
        if kind is not None:
            colour_to = None
            if kind == "recolour":
                colour_to = str(free_colours.pop(0))
            events.append(Event(kind, i, direction, colour_to))
    order = rng.permutation(n)  # draw order and actor index carry no information
    remap = {int(old): new for new, old in enumerate(order)}
    actors = tuple(actors[int(o)] for o in order)
    present = tuple(present[int(o)] for o in order)
    events = tuple(replace(e, actor=remap[e.actor]) for e in events)
    jitter = tuple((float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))) for _ in range(n))
    if backdrop is None:
        a, b = rng.uniform(0, 55, size=3), rng.uniform(0, 55, size=3)
        backdrop = {"kind": "dark-gradient", "a": [float(v) for v in a], "b": [float(v) for v in b],
                    "angle": float(rng.uniform(0, 2 * np.pi))}
    return Story(actors, present, events, jitter, dict(backdrop))


# --------------------------------------------------------------------- hard negatives
def swapped(story: Story) -> Story:
    """The same events in the opposite temporal order."""
    return replace(story, events=tuple(reversed(story.events)))


def time_reversed(story: Story, k: int) -> Story:
    """Event k played backwards; the actor's start state becomes the old end state."""
    e = story.events[k]
    actors, present = list(story.actors), list(story.present)
    a = actors[e.actor]
    new = replace(e, kind=_REVERSE_KIND[e.kind])
    if e.kind == "move":
        actors[e.actor] = replace(a, cell=_shift(a.cell, e.direction))
        new = replace(new, direction=_OPPOSITE[e.direction])
    elif e.kind == "recolour":
        actors[e.actor] = replace(a, colour=e.colour)
        new = replace(new, colour=a.colour)
    elif e.kind in ("grow", "shrink"):
        actors[e.actor] = replace(a, size="large" if e.kind == "grow" else "small")
    elif e.kind in ("appear", "disappear"):
        present[e.actor] = not present[e.actor]
    events = list(story.events)
    events[k] = new
    return replace(story, actors=tuple(actors), present=tuple(present), events=tuple(events))


def variants(story: Story, group_size: int, rng: np.random.Generator) -> List[Tuple[str, Story]]:
    """Up to `group_size` distinct stories that differ only in time: base, swapped, reversed, both."""
    k = int(rng.integers(len(story.events)))
    out = [("base", story)]
    if len(story.events) >= 2:
        out.append(("swapped", swapped(story)))
    rev = time_reversed(story, k)
    out.append(("reversed", rev))
    if len(story.events) >= 2:
        out.append(("swapped+reversed", swapped(rev)))
    return out[:max(1, group_size)]


# ------------------------------------------------------------------------- timeline
def progress(t: float, k: int, seconds_per_event: float) -> float:
    """How far event k is at time t: 0 before its window, 1 after (window = middle half of its slot)."""
    start = k * seconds_per_event + 0.25 * seconds_per_event
    return float(np.clip((t - start) / (0.5 * seconds_per_event), 0.0, 1.0))


def actor_states(story: Story, t: float, seconds_per_event: float, image_size: int) -> List[Optional[Shape]]:
    """What each actor looks like at time t (None = not visible)."""
    out: List[Optional[Shape]] = []
    for i, a in enumerate(story.actors):
        shape = a.to_shape(image_size, story.jitter[i])
        visible = story.present[i]
        for k, e in enumerate(story.events):
            if e.actor != i:
                continue
            p = progress(t, k, seconds_per_event)
            if e.kind == "move":
                x1, y1 = cell_centre(_shift(a.cell, e.direction), image_size)
                jx, jy = story.jitter[i]
                shape = shape.moved(x=shape.x + p * (x1 + jx - shape.x), y=shape.y + p * (y1 + jy - shape.y))
            elif e.kind in ("appear", "disappear"):
                if p >= 0.5:
                    visible = e.kind == "appear"
            elif e.kind == "recolour":
                if p >= 0.5:
                    shape = shape.moved(colour=e.colour)
            elif e.kind in ("grow", "shrink"):
                r0 = radius_px(a.size, image_size)
                r1 = radius_px("large" if e.kind == "grow" else "small", image_size)
                shape = shape.moved(radius=r0 + p * (r1 - r0))
        out.append(shape if visible else None)
    return out


def duration(story: Story, seconds_per_event: float) -> float:
    return len(story.events) * seconds_per_event


def render_clip(story: Story, fps: float, seconds_per_event: float, image_size: int) -> np.ndarray:
    """All frames of a story, uint8 (T, H, W, 3), frame i at time i / fps."""
    background = backdrop_image(story.background, image_size)
    n = int(round(duration(story, seconds_per_event) * fps))
    frames = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        states = actor_states(story, i / fps, seconds_per_event, image_size)
        frames[i] = render([s for s in states if s is not None], background)
    return frames


# ------------------------------------------------------------------------- language
def _colour_before(story: Story, k: int) -> str:
    """Actor colour just before event k (only its own recolour event can change it)."""
    return story.actors[story.events[k].actor].colour


def clauses(story: Story, rng: np.random.Generator, register: str = "plain") -> List[str]:
    """One clause per event, in temporal order (`register`: see `captions.event_clause`)."""
    out = []
    for k, e in enumerate(story.events):
        a = story.actors[e.actor]
        where = _shift(a.cell, e.direction) if e.kind == "move" else a.cell
        out.append(phr.event_clause(e.kind, a, rng, direction=e.direction, colour_to=e.colour,
                                    colour_now=_colour_before(story, k), where=where, register=register))
    return out


def story_captions(story: Story, rng: np.random.Generator, k: int, register: str = "plain") -> List[str]:
    """`k` distinct captions (fewer only if the phrasings run out)."""
    out: List[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        c = phr.join_events(clauses(story, rng, register), rng)
        if c not in out:
            out.append(c)
    return out


def story_descriptions(story: Story, seconds_per_event: float) -> Dict[str, List[str]]:
    """A fuller account for consistency losses (MSTA), by kind.

    `spatial`: what the scene holds at the start and at the end; `temporal`: each event with
    its time and path, in order. Canonical wording (an annotator's detailed account).
    """
    rng = np.random.default_rng(0)  # descriptions use the canonical phrasing only

    def scene(visible: Sequence[Tuple[Thing, str]]) -> str:
        if not visible:
            return "nothing"
        return ", ".join(f"{phr.with_article(f'{t.size} {c} {t.texture} {t.shape}')} "
                         f"{phr.position_phrase(t.cell, rng)}" for t, c in visible)

    start = [(a, a.colour) for a, p in zip(story.actors, story.present) if p]
    lines = [f"at the start: {scene(start)}"]
    end_state = {i: (a, a.colour, p) for i, (a, p) in enumerate(zip(story.actors, story.present))}
    for k, e in enumerate(story.events):
        a, colour, _ = end_state[e.actor]
        t0 = k * seconds_per_event + 0.25 * seconds_per_event
        t1 = t0 + 0.5 * seconds_per_event
        when = f"from second {t0:g} to second {t1:g}"
        name = f"{colour} {a.shape}"
        if e.kind == "move":
            dest = _shift(a.cell, e.direction)
            lines.append(f"{when} the {name} moves {e.direction} from the {_cell_word(a.cell)} to the "
                         f"{_cell_word(dest)}")
            end_state[e.actor] = (replace(a, cell=dest), colour, True)
        elif e.kind == "appear":
            lines.append(f"{when} {phr.with_article(name)} appears {phr.position_phrase(a.cell, rng)}")
            end_state[e.actor] = (a, colour, True)
        elif e.kind == "disappear":
            lines.append(f"{when} the {name} {phr.position_phrase(a.cell, rng)} disappears")
            end_state[e.actor] = (a, colour, False)
        elif e.kind == "recolour":
            lines.append(f"{when} the {name} changes colour from {colour} to {e.colour}")
            end_state[e.actor] = (a, e.colour, True)
        else:
            new = "large" if e.kind == "grow" else "small"
            lines.append(f"{when} the {name} {'grows' if e.kind == 'grow' else 'shrinks'} from {a.size} to {new}")
            end_state[e.actor] = (replace(a, size=new), colour, True)
    end = [(a, c) for a, c, p in end_state.values() if p]
    return {"spatial": [lines[0], f"at the end: {scene(end)}"], "temporal": lines[1:]}


def _cell_word(cell: Tuple[int, int]) -> str:
    return CELL_NAMES[tuple(cell)]
