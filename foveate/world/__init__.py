"""The synthetic world: seeded scenes and questions with exact ground truth (objects, boxes, labels, relations).

It is the project's measuring stick (benchmarks whose answers need no judge), the demo model's training data, and
the fixture every test uses. Tiny objects are sized to vanish at the demo model's input resolution, so questions
about them need zooming in, while medium and large objects stay easy (see `foveate.world.scenes`).

    >>> from foveate.world import generate_dataset, iter_items
    >>> image, scene, row = next(iter_items(1, seed=0, preset="small-detail"))
    >>> row["split"], row["target_size"]
    ('small-detail', 'tiny')
"""

from foveate.world.dataset import generate_dataset, iter_items, iter_scenes, load_tasks
from foveate.world.describe import describe_scene, matching_objects, reference_phrase, unique_reference
from foveate.world.presets import PRESETS, WorldConfig, get_preset
from foveate.world.questions import (
    EXISTENCE_SUBTYPES,
    FAMILIES,
    SPLITS,
    QuestionConfig,
    confusers,
    generate_question,
    generate_questions,
    popularity,
    split_for,
)
from foveate.world.scenes import (
    BACKGROUNDS,
    CLUTTER_KINDS,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZE_CLASSES,
    Scene,
    SceneConfig,
    WorldObject,
    compute_relations,
    generate_scene,
    object_mask,
    render_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CLUTTER_KINDS",
    "COLORS",
    "EXISTENCE_SUBTYPES",
    "FAMILIES",
    "PRESETS",
    "RELATIONS",
    "SHAPES",
    "SIZE_CLASSES",
    "SPLITS",
    "QuestionConfig",
    "Scene",
    "SceneConfig",
    "WorldConfig",
    "WorldObject",
    "compute_relations",
    "confusers",
    "describe_scene",
    "generate_dataset",
    "generate_question",
    "generate_questions",
    "generate_scene",
    "get_preset",
    "iter_items",
    "iter_scenes",
    "load_tasks",
    "matching_objects",
    "object_mask",
    "popularity",
    "reference_phrase",
    "render_scene",
    "split_for",
    "unique_reference",
]
