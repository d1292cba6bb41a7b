"""megaclone: grow a trained Megatron GPT (or a Hugging Face model) in width, depth and experts so the
grown model computes the same function (HyperCloning), one process per destination rank.

The public API, imported on first use (``import megaclone`` stays torch-free, so flag parsing and
--help are instant)::

    import megaclone
    rt = megaclone.init_distributed()                 # torchrun, srun, mpirun or a world of one
    megaclone.grow("small", "wide", megaclone.Factors.uniform(2), tp=8)
    megaclone.verify_logits("small", "wide")          # per-rank logits against the source's
    megaclone.verify_weights("small", "wide")         # stored weights against the clone's definition
    megaclone.grow_hf("hf_small", "hf_wide", megaclone.Factors.uniform(2))
    megaclone.export_hf("wide", "wide_hf")
    megaclone.open_source("small").spec               # any checkpoint (torch_dist, legacy, HF), read by box

The names are the commands' (``megaclone grow``, ``verify``, ``export-hf``), not the modules' that
implement them (pipeline.expand, check.logits, check.weights, export): the table below maps each.
They load on first use so that ``import megaclone`` (which every command does before parsing its
flags) stays free of torch; ``megaclone.__all__`` lists them.

Requests: ``Factors`` (widths), ``Depth`` (layers), ``Experts`` (upcycling), ``CloneConfig`` with a
``Variant`` (symmetric, diagonal, their noisy forms); ``Format`` names a checkpoint's file format.
Errors a user can fix are ``MegacloneError``.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {  # public name: (module, name there)
    "grow": ("pipeline.expand", "expand"), "grow_hf": ("pipeline.to_hf", "expand_to_hf"),
    "verify_logits": ("check.logits", "verify"), "verify_weights": ("check.weights", "check_weights"),
    "export_hf": ("export", "export_hf"), "open_source": ("formats.source", "open_source"),
    "init_distributed": ("runtime", "init_distributed"),
    **{name: ("shape.request", name) for name in ("Factors", "Depth")}, "Experts": ("shape.spec", "Experts"),
    **{name: ("pipeline.clone", name) for name in ("CloneConfig", "Variant")}, "Format": ("formats", "Format"),
    "MegacloneError": ("errors", "MegacloneError"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megaclone' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(import_module(f".{module}", __name__), attribute)
