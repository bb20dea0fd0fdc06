"""LoRA adapters made with the real `peft` package (random, non-zero weights; several ranks and target
sets) against HF transformers + PEFT: greedy tokens identical per adapter, a mixed batch (base and three
adapters, more than the device slots and the host cache hold) gives each request its own reference, the
prefix cache keeps adapters apart, and the scheduler never puts more adapters in a step than it has slots.
"""

from __future__ import annotations

import json

import pytest
import torch

from model_factory import make_hf_model, make_lora_adapter
from pagetron.backend import LLM, InvalidRequestError, LoRARequest, SamplingParams
from pagetron.backend.core.block_manager import BlockManager
from pagetron.backend.core.scheduler import Scheduler
from pagetron.backend.core.sequence import Sequence
from pagetron.backend.model.lora import LoRAContext

MAX_TOKENS = 8
PROMPTS = [[11, 12, 13, 14, 15], [200, 7, 9], list(range(30, 52))]
ADAPTERS = {  # name: (rank, alpha, targets, rsLoRA)
    "qv-r4": (4, 8, ["q_proj", "v_proj"], False),
    "all-r8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "mlp-r2-rslora": (2, 4, ["o_proj", "gate_proj", "up_proj", "down_proj"], True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # head_dim 64: the smallest the Triton attention kernels take, so the CUDA tests run this model too
    return make_hf_model(
        tmp_path_factory.mktemp("lora-base"), "llama", num_kv_heads=2, tie_word_embeddings=False, head_dim=64
    )


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: LoRARequest(name, i + 1, str(make_lora_adapter(base, root / name, *spec, seed=i)))
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def references(base, adapters):
    """HF transformers + PEFT greedy continuations: per adapter name (None: the base model), per prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def greedy(model) -> list[list[int]]:
        out = []
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            n = MAX_TOKENS
            generated = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            out.append(generated[0, len(prompt) :].tolist())
        return out

    result = {None: greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))}
    for name, request in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        result[name] = greedy(PeftModel.from_pretrained(model, request.lora_path).eval())
    return result


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_each_adapter_gives_hf_peft_greedy_tokens(base, adapters, references):
    llm = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=8)
    assert tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == references[None]
    for name, request in adapters.items():
        assert (
            tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora_request=request)) == references[name]
        ), name
    assert all(references[name] != references[None] for name in adapters)  # the adapters change the answers


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_mixed_batch_gives_each_request_its_own_output(base, adapters, references, async_scheduling):
    """Base and three adapters at once with two device slots and two adapters kept on the host: the
    scheduler holds back the third adapter's requests until a slot frees, and the host reloads it (also
    with asynchronous scheduling, where a step's adapters are set while the previous step may still run)."""
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=8,
              async_scheduling=async_scheduling)  # fmt: skip
    assert llm.engine.async_scheduling == async_scheduling
    names = [None, *adapters]
    prompts = [p for _ in names for p in PROMPTS]
    loras = [adapters.get(n) for n in names for _ in PROMPTS]
    outs = tokens(llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras))
    assert outs == [t for n in names for t in references[n]]
    lora = llm.engine.executor.worker.lora
    assert len(lora.host) == 2 and set(lora.slots) <= {1, 2, 3}


def test_tensor_parallel_ranks_give_each_request_its_adapters_tokens(base, adapters, references):
    """TP 2 (gloo): each rank holds its shard of every adapter (B cut like a column-parallel layer's
    output, A like a row-parallel layer's input) and mirrors the driver's slot loads step by step; the
    same mixed batch, with more adapters than slots, gives PEFT's tokens. Greedy ties cannot flip here:
    the tiny model's logprobs are far apart (its references are the one-rank engine's too)."""
    llm = LLM(str(base), tensor_parallel_size=2, enable_lora=True, max_loras=2, max_cpu_loras=2,
              max_lora_rank=8)  # fmt: skip
    names = [None, *adapters]
    prompts = [p for _ in names for p in PROMPTS]
    loras = [adapters.get(n) for n in names for _ in PROMPTS]
    try:
        outs = tokens(llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras))
        assert llm.engine.executor.num_resident_loras() == 2
    finally:
        llm.engine.shutdown()
    assert outs == [t for n in names for t in references[n]]


def test_the_prefix_cache_keeps_adapters_apart(base, adapters):
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4)
    prompt = list(range(40, 60))  # 5 full blocks
    first = llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=adapters["qv-r4"])[0]
    again = llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=adapters["qv-r4"])[0]
    other = llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=adapters["all-r8"])[0]
    plain = llm.generate([prompt], PARAMS, use_tqdm=False)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 16)  # its own blocks, but the last
    assert (other.num_cached_tokens, plain.num_cached_tokens) == (0, 0)  # never another adapter's KV


def test_bad_adapters_are_refused_naming_the_problem(base, adapters, tmp_path):
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4)
    cases = {
        "rank": (adapters["all-r8"], "rank 8 is above max_lora_rank 4"),
        "missing": (LoRARequest("ghost", 9, str(tmp_path / "ghost")), "adapter_config.json not found"),
    }
    embed = make_lora_adapter(base, tmp_path / "embed", 4, 8, ["embed_tokens"], False, seed=5)
    cases["target"] = (LoRARequest("embed", 10, str(embed)), "target module 'embed_tokens' is not supported")
    wide = tmp_path / "wide"
    make_lora_adapter(base, wide, 4, 8, ["q_proj"], False, seed=6)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases["dora"] = (LoRARequest("wide", 11, str(wide)), "use_dora=True is not supported")
    for key, (request, words) in cases.items():
        with pytest.raises(InvalidRequestError) as e:
            llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False, lora_request=[None, request])
        assert (
            e.value.field == "lora_request" and request.lora_name in str(e.value) and words in str(e.value)
        ), key
    assert not llm.engine.has_unfinished_requests()  # the good prompt of each batch never started
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        LLM(str(base)).generate(PROMPTS[:1], PARAMS, use_tqdm=False, lora_request=adapters["qv-r4"])


def seq(lora_id: int | None, n: int = 4) -> Sequence:
    lora = LoRARequest(f"a{lora_id}", lora_id, "/unused") if lora_id else None
    return Sequence(list(range(n)), SamplingParams(max_tokens=4), lora=lora)


def test_the_scheduler_never_runs_more_adapters_than_slots_and_starves_none():
    scheduler = Scheduler(BlockManager(64, 4, True), max_num_seqs=8, max_num_batched_tokens=64,
                          max_model_len=64, max_loras=1)  # fmt: skip
    a1, b, base, a1_again = seq(1), seq(2), seq(None), seq(1)
    for s in (a1, b, base, a1_again):
        scheduler.add(s)
    first = scheduler.schedule()
    # a1 takes the one slot; b must wait for it; the base request goes ahead; a1_again, though its
    # adapter is running, may not pass b (else adapter 1 could keep the slot for ever)
    assert first.seqs == [a1, base] and list(scheduler.waiting) == [b, a1_again]
    scheduler.abort([a1])
    second = scheduler.schedule()
    assert second.seqs == [base, b]  # base's next token (pending: this test applies no result), then b
    assert list(scheduler.waiting) == [a1_again]


def test_a_peft_adapter_on_smollm2_gives_hf_peft_greedy_tokens(tmp_path):
    """The bundled SmolLM2 (its converted folder, which transformers loads too) with a rank-8 adapter on
    q, v and down projections: PEFT's greedy continuation of a chat prompt and a raw one."""
    from peft import PeftModel

    from pagetron.backend.benchmarks.hf_reference import load_hf_model
    from pagetron.backend.model.loader import default_model_path, load_model_files

    folder = load_model_files(default_model_path()).weight_files[0].parent
    adapter = make_lora_adapter(folder, tmp_path / "smol", 8, 16, ["q_proj", "v_proj", "down_proj"], seed=7)
    llm = LLM(enable_lora=True, max_lora_rank=8, kv_cache_memory_gb=0.25)
    prompts = [llm.encode_chat([{"role": "user", "content": "Name a color."}]), [1, 504, 2582, 28, 1115, 314]]
    request = LoRARequest("smol", 1, str(adapter))
    ours = tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False,
                               lora_request=request))  # fmt: skip
    hf = PeftModel.from_pretrained(load_hf_model(None), str(adapter)).eval()
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                          min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
        assert got == out[0, len(prompt) :].tolist()
    base = tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False))
    assert base != ours  # the adapter changes the answers


def test_rows_are_regrouped_whenever_the_slots_are_set():
    """The grouping the kernels take is made once per forward pass, and again whenever the slots are set
    or a regroup is asked for: a decode graph's capture asks after its warm-up pass, so the grouping it
    records is made inside the capture, not the warm-up's (freed afterwards, then read by each replay)."""
    made = []
    context = LoRAContext(None, None, lambda slots, num_slots: made.append(slots) or len(made), num_slots=2)
    slots = torch.tensor([0, -1, 1], dtype=torch.int32)
    context.token_slots = slots
    assert context.rows() == 1 and context.rows() == 1
    context.token_slots = slots
    assert context.rows() == 2 and len(made) == 2
    context.regroup()
    assert context.rows() == 3 and context.rows() == 3


def test_a_graphs_warm_up_takes_the_path_its_capture_will(monkeypatch):
    """With a side stream, layers defer their deltas (and gate_up does not fuse its expand) while a graph
    is captured, and also in the warm-up pass before it, marked ``as_captured``, so that every kernel the
    capture launches is compiled outside it; without the mark, eager steps fuse instead."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (CPU-only torch)
    context = LoRAContext(None, None, None, num_slots=2, side_stream=object(), expand_silu_and_mul=print)
    assert not context.defers() and context.fuses_silu()
    context.as_captured = True
    assert context.defers() and not context.fuses_silu()
    context.side_stream = None  # no side stream: the capture runs the eager path
    assert not context.defers() and context.fuses_silu()


def test_short_steps_share_one_zeroed_shrink_workspace_and_long_ones_do_not(base, adapters):
    """Every LoRA layer has its own columns of the workspace, zeroed once per forward pass of at most
    WORKSPACE_MAX_ROWS rows; a longer step's layers zero their own buffers. Both give the same product."""
    from pagetron.backend.model import lora as lora_module

    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8)
    model = llm.engine.executor.worker.runner.model
    layer = model.model.layers[0]
    qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
    widths = [3 * 8, 8, 2 * 8, 8]  # qkv, o, gate_up, down at max_lora_rank 8
    assert (qkv.lora_offset, o.lora_offset) == (0, 24)
    context = qkv.lora_context
    assert context._width == len(model.model.layers) * sum(widths)
    manager = llm.engine.executor.worker.lora
    manager._load_slot(1, manager.add(adapters["all-r8"]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, qkv.weight.shape[1], generator=gen)
    context.token_slots = torch.tensor([1, -1, 1, 1, -1, 1], dtype=torch.int32)
    with torch.inference_mode():
        shared = qkv(x)
        assert context._workspace is not None and context._workspace.shape == (6, context._width)
        assert context._workspace[:, 24:].count_nonzero() == 0  # only qkv's columns written so far
        original = lora_module.WORKSPACE_MAX_ROWS
        lora_module.WORKSPACE_MAX_ROWS = 5
        try:
            context.token_slots = context.token_slots.clone()
            own = qkv(x)
            assert context._workspace is None
        finally:
            lora_module.WORKSPACE_MAX_ROWS = original
        context.token_slots = None
        plain = qkv(x)
    assert torch.equal(shared, own) and not torch.equal(shared[0], plain[0])
    assert torch.equal(shared[1], plain[1])  # no adapter on row 1


def test_deltas_left_to_the_next_kernel_give_the_bits_of_expanding_in_line(base, adapters, monkeypatch):
    """Where the context defers (on a GPU: decode graphs with a side stream), o_proj, gate_up_proj and
    down_proj leave their LoRA product to the fused norm or silu_and_mul after them. Forced on the CPU
    path in bf16 (where a missed rounding would show): the same tokens and logprobs, bit for bit."""
    llm = LLM(str(base), enable_lora=True, max_loras=3, max_lora_rank=8, dtype="bfloat16")
    context = llm.engine.executor.worker.runner.lora.context
    names = [None, "qv-r4", "all-r8", "mlp-r2-rslora"]
    requests = [None if name is None else adapters[name] for name in names for _ in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)

    def run() -> list:
        outs = llm.generate(PROMPTS * len(names), params, use_tqdm=False, lora_request=requests)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    in_line = run()
    deferred, start_delta = [], context.start_delta
    monkeypatch.setattr(context, "defers", lambda: True)
    monkeypatch.setattr(context, "start_delta", lambda x, *rest: deferred.append(x) or start_delta(x, *rest))
    assert run() == in_line
    num_layers = len(llm.engine.executor.worker.runner.model.model.layers)
    assert deferred and len(deferred) % (3 * num_layers) == 0  # o, gate_up and down of every layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_graphs_give_each_request_its_adapters_tokens(base, adapters, references):
    """On a GPU: the LoRA kernels in decode CUDA graphs (mixed batch, bf16 rounding aside: fp32 here)."""
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32")
    names = [None, "qv-r4", "all-r8"]
    requests = [None if name is None else adapters[name] for name in names for _ in PROMPTS]
    outs = llm.generate(PROMPTS * len(names), PARAMS, use_tqdm=False, lora_request=requests)
    assert tokens(outs) == [ref for name in names for ref in references[name]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shrinks_on_the_side_stream_give_the_same_tokens(base, adapters):
    """On a GPU: shrinks beside the base GEMMs (a side stream in the decode graphs) and shrinks in line
    give the same tokens, after prefill steps long enough for 64-row blocks (no prefix cache, so both
    runs prefill alike). The graphs are captured again without the side stream for the second run."""
    llm = LLM(
        str(base),
        enable_lora=True,
        max_loras=3,
        max_lora_rank=8,
        dtype="float32",
        enable_prefix_caching=False,
    )
    context = llm.engine.executor.worker.runner.lora.context
    assert context.side_stream is not None
    prompts = [[(3 + i + j) % 256 for j in range(300)] for i in range(8)] + PROMPTS
    names = [None, "qv-r4", "all-r8", "mlp-r2-rslora"]
    requests = [None if (name := names[i % 4]) is None else adapters[name] for i in range(len(prompts))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    beside = tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=requests))
    context.side_stream = None
    llm.engine.executor.worker.runner.graphs.capture()
    in_line = tokens(llm.generate(prompts, params, use_tqdm=False, lora_request=requests))
    assert beside == in_line
