"""Reward models for multi-subject personalization, usable from any trainer (imports nothing from psr).

Modules: ``base`` (the Reward contract, RewardInputs, WeightedReward), ``subject_consistency`` (the
pairwise subject-consistency reward), ``detectors``, ``embedders``, ``text_alignment`` (CLIP-T),
``preference`` (ImageReward, HPS v2.1, PickScore), ``spatial``, ``color``, ``testing`` (tiny
random-weight builders), ``cli`` (``psr-score``). Configs: ``conf/reward/*.yaml``.
"""
