"""Runs the model for the engine: ``Executor.execute(SchedulerOutput) -> RunnerOutput``. The uniprocess
executor owns one worker (device, weights, KV cache, CUDA graphs), which owns the model runner."""
