"""The reproduction of *Scaling Smart* and the benchmarks: ``paper`` (the paper's measures), ``plots``
and ``bench`` (figures of a run against the write floor)."""
