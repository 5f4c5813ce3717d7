"""Test-wide settings."""

import os

from hypothesis import settings

# CI (.ci/run) replays the same examples every run, so a red run there is a regression, not a
# new draw; anywhere else every run draws new examples and may find what CI cannot.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
