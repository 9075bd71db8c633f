"""The FLUX.1 LoRA trainer: what goes in (an ai-toolkit YAML config and an image/caption folder).

``config`` turns an unchanged ostris/ai-toolkit job file into typed, validated dataclasses;
``captions``, ``buckets``, ``data`` and ``cache`` turn the dataset folder into reproducible,
aspect-bucketed batches and content-keyed latent / text-embedding caches. None of these modules
loads a model, so every mistake in a config or a dataset is reported before minutes are spent
loading FLUX.
"""
