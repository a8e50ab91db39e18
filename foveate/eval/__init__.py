"""The evaluation harness: ``foveate eval`` and its parts.

- `foveate.eval.metrics`: answer metrics (exact match, VQA soft accuracy, POPE, box grounding), pure functions;
- `foveate.eval.runner`: task sets (``world:<preset>`` or a tasks.jsonl), concurrent micro-batched runs, the
  resumable items file;
- `foveate.eval.report`: result rows, tables and the results JSON;
- `foveate.eval.cli`: the ``eval`` command.

    foveate eval --task world:small-detail --strategies direct,oracle-crop --n 200 --out results.json
"""
