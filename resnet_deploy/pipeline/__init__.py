"""The main job (``resnet-deploy pipeline``): load or train a model, export every artifact, bench them."""

from resnet_deploy.pipeline.job import PipelineOptions, pipeline_error, run_pipeline, write_reports

__all__ = ["PipelineOptions", "pipeline_error", "run_pipeline", "write_reports"]
