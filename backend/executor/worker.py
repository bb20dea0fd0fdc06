"""One worker: a device, the model's weights on it, its KV cache, decode CUDA graphs and the model runner."""

from __future__ import annotations

import torch

from pagetron.backend.executor.cuda_graphs import DecodeGraphs
from pagetron.backend.executor.device import (
    resolve_device,
    resolve_dtype,
    resolve_kernels,
    resolve_kv_cache_dtype,
)
from pagetron.backend.executor.kv_cache import allocate_kv_cache, num_kv_blocks
from pagetron.backend.executor.model_runner import ModelRunner
from pagetron.backend.executor.spec import ModelSpec
from pagetron.backend.model.kernel_ops import kernel_ops
from pagetron.backend.model.llama import LlamaForCausalLM
from pagetron.backend.model.lora import LoRAManager
from pagetron.backend.model.parallel import SINGLE, TensorParallel
from pagetron.backend.model.sampler import Sampler

MAX_GRAPH_BATCH = 512


class Worker:
    """Two phases: construction loads the model and measures how many KV blocks fit (``max_kv_blocks``);
    ``initialize_cache`` allocates the number every rank can hold and captures the CUDA graphs."""

    def __init__(self, spec: ModelSpec, tp: TensorParallel = SINGLE, local_rank: int = 0):
        config = spec.config
        self.spec, self.tp = spec, tp
        self.device = resolve_device(config.device, local_rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config, self.dtype)
        self.kernels = resolve_kernels(config.attention_backend, self.device)
        self.model = self._load_model(spec)
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            host_slots = config.max_cpu_loras or config.max_loras
            self.lora = LoRAManager(
                self.model,
                config.max_loras,
                config.max_lora_rank,
                host_slots,
                self.device,
                self.dtype,
                self.kernels,
            )
        self.max_kv_blocks = num_kv_blocks(
            config, self.model, spec.max_model_len, self.kv_cache_dtype, self.device
        )
        self.num_kv_blocks = 0
        self.runner: ModelRunner | None = None

    def initialize_cache(self, num_blocks: int) -> None:
        config = self.spec.config
        self.num_kv_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(
            self.model, num_blocks, config.block_size, self.kv_cache_dtype, self.device
        )
        graphs = None
        if self.device.type == "cuda" and self.kernels == "triton" and not config.enforce_eager:
            graphs = self.decode_graphs()
            graphs.capture()
        sampler = Sampler(self.spec.eos_token_ids, seed=config.seed, kernels=self.kernels)
        self.runner = ModelRunner(self.model, sampler, config.block_size, self.device, graphs, self.lora)

    def decode_graphs(self, cls: type[DecodeGraphs] = DecodeGraphs) -> DecodeGraphs:
        """The decode CUDA graphs this worker's model and engine arguments need, not captured yet."""
        config = self.spec.config
        max_blocks = -(-self.spec.max_model_len // config.block_size)
        lora_context = self.lora.context if self.lora is not None else None
        batch = min(config.max_num_seqs, MAX_GRAPH_BATCH)
        return cls(self.model, batch, max_blocks, self.device, lora_context)

    def _load_model(self, spec: ModelSpec) -> LlamaForCausalLM:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(
                    spec.model_config, spec.max_model_len, kernel_ops(self.kernels), self.tp
                )
        finally:
            torch.set_default_dtype(default_dtype)
        fp8 = "fp8" in (spec.config.quantization, spec.model_config.quantization)
        if spec.config.load_format == "dummy":
            _init_dummy_weights(model, spec.config.seed)
        else:
            if spec.model_config.quantization == "fp8":  # stored in FP8: loaded as it is
                for layer in model.linear_layers():
                    layer.expect_fp8_checkpoint()
            model.load_weights(spec.files.weights(lazy=self.tp.size > 1))
        if fp8:  # the rest are quantized now, per output channel
            for layer in model.linear_layers():
                layer.quantize_fp8()
        return model.eval()


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.uniform_(-0.02, 0.02, generator=gen)
