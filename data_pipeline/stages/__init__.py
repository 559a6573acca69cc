"""One module per stage, each with ``run(out_dir, shard, settings, seed) -> summary`` (``export`` and
``report`` are not sharded: ``run(out_dir, settings, seed)``). See :data:`common.ORDER`."""
