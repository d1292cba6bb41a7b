"""Megatron GPT pretraining on megatron-core with Megatron-LM's flags: ``args``, ``data``, ``step``,
``precision``, ``state`` (checkpoints with optimizer and scheduler), ``loss`` and the ``loop``."""
