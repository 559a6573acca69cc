"""Multi-subject training data from single-subject models (docs/method.md §8), sharded and resumable.

Stages (:mod:`data_pipeline.stages`): plan -> prompts -> target -> crop -> references -> edit ->
instruct -> filter -> export -> report; models behind small protocols (:mod:`data_pipeline.models`);
shard bookkeeping (:mod:`data_pipeline.shards`); the ``psr-data`` entry point (:mod:`data_pipeline.cli`).
The only contract with the trainers is the manifest schema in :mod:`psr.data.manifest`.
"""
