"""``coatflux bench``: time and size one FLUX LoRA training step under several precision recipes.

What: builds the FLUX.1 transformer architecture with random weights directly on the target
device (no download), adds rank-16 LoRA adapters on ai-toolkit's targets, and repeats one training
step (forward, backward, optimizer step) on random latents and text embeddings. For each
configuration -- bf16 with and without gradient checkpointing, FP8 weight storage upcast to bf16
(kohya / ai-toolkit), torchao float8 training, COAT with and without checkpointing -- it measures
the median step time, the peak allocated memory and the largest batch that fits, and relates each
step time to the compute floor at the card's *measured* bf16 and FP8 matmul rates.

Modules: :mod:`.model` (presets, random-weight construction, inputs, FLOP count),
:mod:`.configs` (the recipes), :mod:`.measure` (timers, memory, batch search, matmul rates),
:mod:`.report` (table, JSON, markdown) and :mod:`.cli` (arguments and the run plan under a time
budget). ``python -m coatflux.bench`` runs it without the other subcommands' imports.
"""
