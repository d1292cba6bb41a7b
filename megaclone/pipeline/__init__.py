"""The expansion itself: ``index_maps`` -> ``rules`` -> ``plan`` -> ``clone`` (pure math over tensors),
then ``expand`` and ``to_hf`` (the jobs that read a source and write a destination, rank by rank) and
``optimizer`` (Adam's moments grown with the weights)."""
