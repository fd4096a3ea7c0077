"""SSGAN networks: SPADE generator + Semantic Fusion Modules, multi-scale discriminator, VGG19."""

from __future__ import annotations

from ssgan_dist.config import ModelConfig
from ssgan_dist.models.discriminator import MultiscaleDiscriminator
from ssgan_dist.models.generator import SSGANGenerator
from ssgan_dist.models.segmenter import SketchSegmenter, build_segmenter
from ssgan_dist.models.vgg import VGG19Features, VGGWeightsError, load_vgg19


def build_generator(cfg: ModelConfig) -> SSGANGenerator:
    return SSGANGenerator(cfg)


def build_discriminator(cfg: ModelConfig) -> MultiscaleDiscriminator:
    return MultiscaleDiscriminator(cfg)


__all__ = [
    "MultiscaleDiscriminator", "SSGANGenerator", "SketchSegmenter", "VGG19Features", "VGGWeightsError",
    "build_discriminator", "build_generator", "build_segmenter", "load_vgg19",
]
