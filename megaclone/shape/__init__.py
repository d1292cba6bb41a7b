"""Model shapes, with no files and no processes: ``spec`` (a GPT model's shape and the Megatron args it
reads and writes), ``request`` (what a growth asks for), ``presets`` (the bundled shapes) and
``layout`` (every stored tensor of a shape, as megatron-core keys and shapes it)."""
