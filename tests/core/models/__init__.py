"""Tests of matting_core.models submodules."""
