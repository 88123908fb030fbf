"""Typed pipeline settings, YAML presets and the loader (`load_settings`)."""

from settings.errors import UserError
from settings.loader import dump_settings, load_settings, preset_names
from settings.models import PipelineSettings

__all__ = ["PipelineSettings", "UserError", "dump_settings", "load_settings", "preset_names"]
