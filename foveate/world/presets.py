"""Named world configurations: a plain dict name -> `WorldConfig`.

=============  ==============================================================================================
preset         what it measures
=============  ==============================================================================================
default        mixed: every family, splits 40/20/40 % small-detail/mid-detail/large, 30 % cluttered
               backgrounds (the training mix and the overall benchmark)
small-detail   every target is tiny: 1344 px scenes whose tiny objects are 24-40 px, so 4-7 px at a 224 px
               input and 6-10 px at 336 (a fraction of one merged token), but 24-40 px again in a crop whose
               side is the input side (the oracle-crop and ViCrop window): zooming is necessary and sufficient;
               scenes still carry medium/large distractors; existence negatives are POPE-adversarial only (one
               attribute away from a tiny object -- random/popular negatives rarely hinge on a tiny object)
large          every target is medium/large: answerable at input resolution, the "zoom must not hurt" check
highres        2048 px scenes (square, landscape, portrait), objects at 0.6x relative size, tiny targets:
               V*-style search in a big image, needs high-resolution splitting or several zoom steps
cluttered      like default but every background is textured (noise, stripes or random lines)
single         training curriculum: one medium/large object on a plain background (colour/shape/existence)
simple         training curriculum: 1-4 medium/large objects on plain backgrounds
objects        vision pretraining: 168 px scenes of 1-3 objects at the size a 672 px scene's have at a 336 px
               input, a quarter of the pixels per image for the vision tower
grounding      "Locate the ..." only, all target sizes (IoU >= 0.5 accuracy per split)
zoom           V*-style: 1344-2048 px plain canvases with 3-5 shapes of 36-52 px far apart, distinct colours;
               "What shape is the red object / the object in the top left?", open or multiple choice; the
               shape is illegible at a 336 px input and alone in a 336 px crop (`foveate.world.zoom`)
caption        "Describe the image in detail." once per scene; the scene's objects are the reference (object and
               attribute precision / recall / F1, CHAIR-style hallucination rate, caption length)
=============  ==============================================================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from foveate.errors import FoveateError
from foveate.world.questions import QuestionConfig, generate_questions
from foveate.world.scenes import Scene, SceneConfig, generate_scene
from foveate.world.zoom import ZoomConfig, generate_zoom_scene, zoom_questions

__all__ = ["PRESETS", "WorldConfig", "ZoomWorldConfig", "get_preset"]


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a dataset besides the seed and the number of questions."""

    name: str = "custom"  # recorded in every row as "preset"
    scene: SceneConfig = field(default_factory=SceneConfig)  # how scenes are composed and drawn
    questions: QuestionConfig = field(default_factory=QuestionConfig)  # which questions are asked
    questions_per_scene: tuple[int, int] = (1, 3)  # inclusive range; the last scene may get fewer to hit n exactly

    def sample(self, rng: random.Random, scene_id: str) -> tuple[Scene, list[dict[str, Any]]]:
        """One scene and its questions, all drawn from ``rng`` (the dataset seeds it per scene)."""
        scene = generate_scene(rng, self.scene, scene_id=scene_id)
        k = rng.randint(*self.questions_per_scene)
        return scene, generate_questions(scene, rng, k, self.questions, self.scene)


@dataclass(frozen=True)
class ZoomWorldConfig(WorldConfig):
    """A world whose scenes and questions come from `foveate.world.zoom` (the V*-style zoom benchmark)."""

    zoom: ZoomConfig = field(default_factory=ZoomConfig)

    def sample(self, rng: random.Random, scene_id: str) -> tuple[Scene, list[dict[str, Any]]]:
        scene = generate_zoom_scene(rng, self.scene, self.zoom, scene_id=scene_id)
        k = rng.randint(*self.questions_per_scene)
        return scene, zoom_questions(scene, rng, k, self.zoom)


# Mixed presets balance the regimes explicitly; left alone, tiny objects (the most numerous, and the smallest
# member decides counting/relation/comparison) would make two thirds of the questions small-detail.
_MIXED_QUESTIONS = QuestionConfig(split_weights=(("small-detail", 0.4), ("mid-detail", 0.2), ("large", 0.4)))

_SMALL_DETAIL_QUESTIONS = QuestionConfig(
    family_weights=(
        ("attribute", 3.0),
        ("text", 2.0),
        ("existence", 2.0),
        ("counting", 1.0),
        ("relation", 1.0),
        ("comparison", 1.0),
    ),
    splits=("small-detail",),
    existence_subtypes=("adversarial",),
)

PRESETS: dict[str, WorldConfig] = {
    "default": WorldConfig(name="default", questions=_MIXED_QUESTIONS),
    "small-detail": WorldConfig(
        name="small-detail",
        scene=SceneConfig(
            # Twice the 672 px reference: the same scene layout, so direct sees the same 6-10 px target at a
            # 336 px input, while a 336 px crop shows it at full size (4x zoom). At 672 px that crop was only a
            # 2x zoom (12-20 px, still under half a 42 px token) and no model read it better than direct.
            canvas_sizes=((1344, 1344),),
            n_objects=(8, 14),
            # Several tiny objects so "the tiny star" cannot be found by elimination among blobs; big distractors
            # so the scene is not just dots.
            min_size_counts=(("tiny", 4), ("medium", 1), ("large", 1)),
            size_weights=(("tiny", 0.5), ("small", 0.2), ("medium", 0.2), ("large", 0.1)),
            label_prob=0.5,
        ),
        questions=_SMALL_DETAIL_QUESTIONS,
    ),
    "large": WorldConfig(
        name="large",
        scene=SceneConfig(
            min_size_counts=(("tiny", 2), ("medium", 2), ("large", 1)),
            size_weights=(("tiny", 0.25), ("small", 0.15), ("medium", 0.4), ("large", 0.2)),
            label_prob=0.5,
        ),
        questions=QuestionConfig(splits=("large",)),
    ),
    "highres": WorldConfig(
        name="highres",
        scene=SceneConfig(
            canvas_sizes=((2048, 2048), (2048, 1536), (1536, 2048)),
            object_scale=0.6,
            n_objects=(10, 18),
            min_size_counts=(("tiny", 5), ("medium", 2), ("large", 1)),
            size_weights=(("tiny", 0.5), ("small", 0.2), ("medium", 0.2), ("large", 0.1)),
            label_prob=0.5,
        ),
        questions=_SMALL_DETAIL_QUESTIONS,
    ),
    "cluttered": WorldConfig(name="cluttered", scene=SceneConfig(clutter_prob=1.0), questions=_MIXED_QUESTIONS),
    # The first curriculum stage for training from scratch: one medium/large object, so the vision tower learns
    # colour, shape and position features before any question needs binding one object's words to another's.
    "single": WorldConfig(
        name="single",
        scene=SceneConfig(
            n_objects=(1, 1),
            size_weights=(("medium", 0.5), ("large", 0.5)),
            min_size_counts=(("medium", 1),),
            label_prob=0.0,
            clutter_prob=0.0,
        ),
        questions=QuestionConfig(
            family_weights=(("attribute", 4.0), ("existence", 2.0)),
            splits=("large",),
        ),
        questions_per_scene=(1, 2),
    ),
    # A curriculum stage for training from scratch: a few medium/large objects on plain backgrounds, so colour,
    # shape and position can be bound to words before the cluttered, many-object scenes.
    "simple": WorldConfig(
        name="simple",
        scene=SceneConfig(
            n_objects=(1, 4),
            size_weights=(("medium", 0.5), ("large", 0.5)),
            min_size_counts=(("medium", 1),),
            label_prob=0.2,
            clutter_prob=0.0,
        ),
        questions=QuestionConfig(
            family_weights=(("attribute", 4.0), ("existence", 2.0), ("counting", 1.0), ("relation", 1.0)),
            splits=("large",),
        ),
    ),
    # Vision pretraining at a quarter of the pixels: a 168 px canvas with objects at the size a 672 px scene's have
    # at a 336 px input (object_scale 2 × 168 / 672 = 0.5), so a processor that keeps 168 px as it is sees them at
    # the demo model's scale in 144 patches instead of 576 (the vision tower's cost per image falls about 4×).
    "objects": WorldConfig(
        name="objects",
        scene=SceneConfig(
            canvas_sizes=((168, 168),),
            object_scale=2.0,
            n_objects=(1, 3),
            size_weights=(("small", 0.2), ("medium", 0.5), ("large", 0.3)),
            min_size_counts=(("medium", 1),),
            label_prob=0.3,
        ),
        questions=QuestionConfig(family_weights=(("attribute", 4.0), ("existence", 2.0)), splits=("large",)),
        questions_per_scene=(1, 2),
    ),
    # Grounding only ("Locate the …"), all target sizes; the eval reports IoU >= 0.5 accuracy per split.
    "grounding": WorldConfig(
        name="grounding",
        questions=QuestionConfig(
            family_weights=(("grounding", 1.0),),
            split_weights=(("small-detail", 0.3), ("mid-detail", 0.2), ("large", 0.5)),
        ),
    ),
    # V*-style zoom benchmark (`foveate.world.zoom`): the asked shape is illegible at the model's input and alone in
    # a crop of the input's side. `scene` gives canvases, object count, backgrounds and shape priors.
    "zoom": ZoomWorldConfig(
        name="zoom",
        scene=SceneConfig(
            canvas_sizes=((1344, 1344), (1680, 1680), (2048, 2048), (2048, 1536), (1536, 2048)),
            n_objects=(3, 5),
            shape_weights=(1.0,) * 7,  # uniform: a shape prior would let a guess beat chance
            label_prob=0.0,
            clutter_prob=0.0,
        ),
        questions=QuestionConfig(family_weights=(("attribute", 1.0),), splits=("small-detail",)),
        questions_per_scene=(1, 2),
    ),
    # Dense captioning: one "Describe the image in detail." per default scene, scored against the scene's objects.
    "caption": WorldConfig(
        name="caption",
        questions=QuestionConfig(family_weights=(("caption", 1.0),)),
        questions_per_scene=(1, 1),
    ),
}


def get_preset(preset: str | WorldConfig) -> WorldConfig:
    """Resolve a preset name (or pass a `WorldConfig` through); unknown names raise a `FoveateError`."""
    if isinstance(preset, WorldConfig):
        return preset
    if preset not in PRESETS:
        raise FoveateError(f"unknown world preset {preset!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[preset]
