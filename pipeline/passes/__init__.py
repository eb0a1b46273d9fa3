"""Stage 2, graph passes: one named, ordered list per target, run before task extraction."""

from pipeline.passes.lift_constants import LiftConstantsToParams
from pipeline.passes.pipeline import (
                                      QUANTIZE_AT,
                                      NamedPass,
                                      apply_passes,
                                      describe_passes,
                                      graph_passes,
                                      post_tuning_passes,
                                      preset_passes,
                                      split_passes,
)

__all__ = ["QUANTIZE_AT", "split_passes", "LiftConstantsToParams", "NamedPass", "apply_passes", "describe_passes", "graph_passes",
           "post_tuning_passes", "preset_passes"]
