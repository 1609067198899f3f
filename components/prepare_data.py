"""Component ``prepare-data``: ``refine_core.stages.prepare_data.prepare_data`` into a ``Dataset`` artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from components._image import REFINE_CPU_IMAGE


@dsl.component(base_image=REFINE_CPU_IMAGE, install_kfp_package=False)
def prepare_data(config_yaml: str, dataset: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    """Read, tokenize, length-filter and shard the corpora of ``config_yaml`` (``refine prepare-data``).

    The result depends only on the config and the corpora it names, so the pipelines cache this task; it opens no
    MLflow run (a cached task would not log anything) and the training runs carry its fingerprint instead.

    Args:
        config_yaml: the experiment config (``data`` and ``model.tokenizer`` are read).
        dataset: the prepared shards, ``manifest.json`` and tokenizer; metadata ``data_fingerprint`` and counts.
        metrics: documents and tokens read / kept.
        report: a Markdown summary.
    """
    from refine_core import kfp_support as ks
    from refine_core.stages.prepare_data import prepare_data as run_stage

    cfg = ks.stage_config(config_yaml, "prepare-data", settings={"data.prepared_dir": dataset.path})
    result = run_stage(cfg)
    fingerprint = ks.prepared_data_fingerprint(result.prepared_dir)
    dataset.metadata.update({"data_fingerprint": fingerprint, **{f"{k}_docs": n for k, n in result.counts.items()}})
    ks.publish_metrics({f"data/{k}": v for k, v in result.stats.items() if isinstance(v, (int, float))}, metrics)
    ks.write_text(report.path, ks.data_report(result.counts, result.stats, fingerprint, dataset.path))
