"""Pictures and captions for every stage and bench: the sources ``--data`` names (:mod:`data.sources`: the
built-in `shapes` world, OpenMoji, folders, tables, tar shards, the hub), the pixel conventions
(:mod:`data.images`), the `shapes` world and its oracle (:mod:`data.shapes`, :mod:`data.oracle`) and the
hard-negative captions the scorer trains and is tested with (:mod:`data.negatives`)."""
