"""The pipeline composes stages: ``stages`` (each stage), ``cache`` (verified, content-addressed),
``candidate`` (one candidate on one target), ``build`` (N targets) and ``search`` (release)."""

from edgepipe.pipeline.build import BuildResult, TargetResult, build
from edgepipe.pipeline.options import BuildOptions

__all__ = ["BuildOptions", "BuildResult", "TargetResult", "build"]
