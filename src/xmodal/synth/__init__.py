"""The generated world: a seeded image/video-text universe written as plain-JSONL datasets.

`world` writes the three sets (pretraining corpus, downstream video set with its order
subset, shifted image set), `scenes` draws them, `camera` films the videos, `captions`
phrases them, `events` scripts the video stories.
"""

from xmodal.synth.world import (  # noqa: F401
    WRITERS,
    read_jsonl,
    write_image_corpus,
    write_shifted_images,
    write_video_set,
)

__all__ = ["WRITERS", "read_jsonl", "write_image_corpus", "write_shifted_images", "write_video_set"]
