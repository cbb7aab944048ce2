"""LocalEngine: the Backend protocol on PyTorch + transformers, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .._backend import Outcome
from .._errors import BackendError, ConfigError
from .._tokenizers import Tokenizer, hf_tokenizer
from .._types import GenerationRequest, Trace, Usage
from . import _gguf, _memory
from ._deps import require_local_extra, require_module
from ._source import DEFAULT_MODEL, DEFAULT_MODEL_NAME, ModelSource, resolve_source
from ._text import (
    chatml,
    finish_row,
    plain_messages,
    prompt_opens_think,
    split_reasoning,
    stop_list,
)
from ._worker import BatchWorker, Job, loop_delivery

_DTYPE_ALIASES = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
}
# Request fields the engine understands in ``GenerationRequest.extra``; others are reported as ignored.
_KNOWN_EXTRA = frozenset({"stop", "min_p", "ignore_eos"})


def default_cache_dir() -> Path:
    """Where dequantized GGUF models are kept between runs."""
    return Path.home() / ".cache" / "markov-rsa"


@dataclass
class _Loaded:
    """A model ready to generate, and what was learnt while loading it."""

    model: Any
    tokenizer: Any
    device: Any
    dtype: str
    eos_ids: frozenset[int]
    pad_id: int
    context_length: int | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Row:
    """One job of a batch, rendered and tokenised."""

    job: Job
    prompt_ids: list[int]
    opens_think: bool
    budget: int
    stops: list[str]
    eos_ids: frozenset[int]
    """Tokens that end this row: the model's end-of-sequence ids, none with ``ignore_eos``."""
    notes: dict[str, Any]


class LocalEngine:
    """Generates rollouts in-process with transformers; implements :class:`markov_rsa.Backend`.

    ``model`` is ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct GGUF, a path to a
    ``.gguf`` file or a checkpoint directory, or a Hugging Face id found in the local cache (fetched
    only with ``allow_download=True``). ``device`` defaults to CUDA when present, else CPU; ``dtype``
    to bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 on CPU.

    Requests are batched, up to ``max_batch_size`` rows per ``model.generate`` call, across every
    concurrent caller. Each row keeps its own sampling settings, its own token budget and its own
    seed: a request with a seed yields the same tokens whatever batch it lands in (up to
    floating-point differences between batch shapes), so a controller run with a fixed
    ``params.seed`` is reproducible. A request without a seed draws a fresh one.

    A GGUF is dequantized once and kept as safetensors under ``cache_dir`` (default
    ``~/.cache/markov-rsa``); later loads read that copy, which takes a fraction of a second
    instead of the half minute transformers spends parsing the GGUF. ``cache_dir=False`` disables it.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int = 16,
        allow_download: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | Path | bool | None = None,
        num_threads: int | None = None,
        progress: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1", param="max_batch_size")
        if dtype is not None and dtype.lower() not in _DTYPE_ALIASES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, bfloat16, float16, float32", param="dtype")
        if num_threads is not None and num_threads < 1:
            raise ConfigError("num_threads must be at least 1", param="num_threads")
        self._model_spec = model
        self._source: ModelSource | None = None
        self.model_name: str = DEFAULT_MODEL_NAME if model is None or model.strip().lower() == DEFAULT_MODEL else model
        """The model as named in reports."""
        self.name: str = f"local:{self.model_name}"
        """Where rollouts run, for reports (``local:<model>``)."""
        self.max_batch_size = max_batch_size
        self.allow_download = allow_download
        self.trust_remote_code = trust_remote_code
        self._device_request = device
        self._dtype_request = None if dtype is None else _DTYPE_ALIASES[dtype.lower()]
        if cache_dir is False:
            self._cache_dir: Path | None = None
        elif cache_dir is None or cache_dir is True:
            self._cache_dir = default_cache_dir()
        else:
            self._cache_dir = Path(cache_dir).expanduser()
        self._num_threads = num_threads
        self._progress = progress
        self._loaded: _Loaded | None = None
        self._worker: BatchWorker | None = None
        self._tokenizer: Tokenizer | None = None
        self._load_lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._loaded is not None

    @property
    def info(self) -> dict[str, Any]:
        """What was loaded: source, device, dtype, parameters, load time (empty before loading)."""
        return dict(self._loaded.info) if self._loaded else {}

    async def load(self) -> None:
        """Load the model and tokenizer (once). Runs in a thread; raises ConfigError on user mistakes."""
        if self._loaded is None:
            await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        with self._load_lock:
            if self._loaded is not None:
                return
            torch, transformers = require_local_extra()
            source = self._source or resolve_source(self._model_spec)
            self._source = source
            device = self._pick_device(torch)
            dtype = self._pick_dtype(torch, device)
            self._set_threads(torch, device)
            started = time.perf_counter()
            with self._quiet_progress(transformers):
                if source.kind == "gguf":
                    model, tokenizer, info = self._load_gguf(torch, source, device, dtype)
                else:
                    model, tokenizer, info = self._load_checkpoint(torch, source, device, dtype)
            model.eval()
            eos_ids = _eos_ids(model, tokenizer)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
            info.update(
                model=self.model_name,
                device=str(device),
                dtype=dtype,
                load_s=round(time.perf_counter() - started, 3),
                threads=torch.get_num_threads() if str(device) == "cpu" else None,
                chat_template=bool(getattr(tokenizer, "chat_template", None)),
            )
            self._loaded = _Loaded(
                model=model,
                tokenizer=tokenizer,
                device=torch.device(device),
                dtype=dtype,
                eos_ids=frozenset(eos_ids),
                pad_id=int(pad_id),
                context_length=getattr(model.config, "max_position_embeddings", None),
                info=info,
            )
            self._tokenizer = hf_tokenizer(tokenizer, f"local:{self.model_name}")
            self._worker = BatchWorker(self._run_batch, self.max_batch_size, name=f"markov-rsa-engine:{self.model_name}")

    def _pick_device(self, torch: Any) -> str:
        requested = self._device_request
        if requested in (None, "auto"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"unknown device {requested!r}: {err}", param="device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {requested!r} asked for, but CUDA is not available (torch {torch.__version__})", param="device"
            )
        return str(device)

    def _pick_dtype(self, torch: Any, device: str) -> str:
        if self._dtype_request is not None:
            return self._dtype_request
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"  # bf16 matmuls are slow on most CPUs

    def _set_threads(self, torch: Any, device: str) -> None:
        if device != "cpu":
            return
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
            return
        # In a container torch may count the host's cores; more threads than usable cores only thrash.
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count() or 1
        if torch.get_num_threads() > usable:
            torch.set_num_threads(usable)

    @contextlib.contextmanager
    def _quiet_progress(self, transformers: Any) -> Iterator[None]:
        if self._progress:
            yield
            return
        hub_logging = transformers.utils.logging
        was_enabled = hub_logging.is_progress_bar_enabled()
        if was_enabled:
            hub_logging.disable_progress_bar()
        # The GGUF loader draws its "Converting and de-quantizing" bar with tqdm directly, past the
        # switch above; its module's tqdm is swapped for a silent one while the model loads.
        try:
            gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        except ImportError:
            gguf_utils = None
        loud_tqdm = getattr(gguf_utils, "tqdm", None)
        if loud_tqdm is not None:
            gguf_utils.tqdm = functools.partial(loud_tqdm, disable=True)
        try:
            yield
        finally:
            if loud_tqdm is not None:
                gguf_utils.tqdm = loud_tqdm
            if was_enabled:
                hub_logging.enable_progress_bar()

    def _check_memory(self, torch: Any, parameters: int, dtype: str, device: str, conversion: int = 0) -> None:
        estimate = _memory.MemoryEstimate(
            parameters=parameters,
            dtype=dtype,
            device=device,
            needed_bytes=_memory.needed_bytes(parameters, dtype, device, conversion),
            available_bytes=_memory.available_memory(device, torch),
        )
        _memory.check_fits(self.model_name, estimate)

    def _load_gguf(self, torch: Any, source: ModelSource, device: str, dtype: str) -> tuple[Any, Any, dict[str, Any]]:
        import transformers

        # Typed loosely: transformers' decorators hide from_pretrained's signature from type checkers.
        auto_model: Any = transformers.AutoModelForCausalLM
        auto_tokenizer: Any = transformers.AutoTokenizer
        assert source.path is not None
        header = _gguf.read_header(source.path)
        info: dict[str, Any] = {"source": "gguf", "path": str(source.path), "architecture": header.architecture,
                                "parameters": header.parameters}
        cached = self._cache_dir / "gguf" / _gguf.cache_key(source.path, transformers.__version__) if self._cache_dir else None
        if cached is not None and (cached / "config.json").is_file():
            self._check_memory(torch, header.parameters, dtype, device)
            try:
                tokenizer = auto_tokenizer.from_pretrained(str(cached))
                model = auto_model.from_pretrained(str(cached), **_placement(torch, device, dtype))
                info.update(source="gguf-cache", cache=str(cached))
                return model.to(device), tokenizer, info
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the GGUF below
                shutil.rmtree(cached, ignore_errors=True)
        require_module("gguf", "loading a GGUF model")
        _gguf.check_loadable(header, source.path)
        # transformers dequantizes to float32 numpy arrays before building the model: count a second copy.
        self._check_memory(torch, header.parameters, "float32", "cpu", conversion=4)
        if device != "cpu":
            self._check_memory(torch, header.parameters, dtype, device)
        folder, name = str(source.path.parent), source.path.name
        try:
            tokenizer = auto_tokenizer.from_pretrained(folder, gguf_file=name)
            model = auto_model.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except ValueError as err:
            if "not supported" in str(err):
                raise ConfigError(f"transformers cannot load {source.path.name}: {err}", param="model") from None
            raise
        _forget_gguf_origin(model)
        if cached is not None:
            info["cache"] = str(cached) if _save_cache(model, tokenizer, cached) else None
        model = model.to(device=device, dtype=_torch_dtype(torch, dtype))
        return model, tokenizer, info

    def _load_checkpoint(
        self, torch: Any, source: ModelSource, device: str, dtype: str
    ) -> tuple[Any, Any, dict[str, Any]]:
        import transformers

        auto_config: Any = transformers.AutoConfig
        auto_model: Any = transformers.AutoModelForCausalLM
        auto_tokenizer: Any = transformers.AutoTokenizer
        ref = str(source.path) if source.path is not None else str(source.repo_id)
        local_only = source.kind == "hub" and not self.allow_download
        common: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if source.kind == "hub":
            common["local_files_only"] = local_only
        try:
            config = auto_config.from_pretrained(ref, **common)
        except OSError as err:
            if source.kind == "hub" and local_only:
                raise ConfigError(
                    f"model not found locally: {ref} is neither a file, a directory, nor in the Hugging Face cache; "
                    f"download it first (hf download {ref}) or allow downloads",
                    param="model",
                ) from None
            raise ConfigError(f"cannot read the model config of {ref}: {_first_line(err)}", param="model") from None
        except (KeyError, ValueError) as err:
            raise ConfigError(_load_failure(ref, err), param="model") from None
        parameters = _count_parameters(torch, config, self.trust_remote_code, source.path)
        if parameters:
            self._check_memory(torch, parameters, dtype, device)
        try:
            tokenizer = auto_tokenizer.from_pretrained(ref, **common)
            model = auto_model.from_pretrained(ref, **common, **_placement(torch, device, dtype))
        except OSError as err:
            raise ConfigError(f"cannot load {ref}: {_first_line(err)}", param="model") from None
        except (KeyError, ValueError) as err:
            raise ConfigError(_load_failure(ref, err), param="model") from None
        if not device.startswith("cuda"):
            model = model.to(device)
        info = {"source": source.kind, "path": ref, "architecture": getattr(config, "model_type", None),
                "parameters": parameters or sum(p.numel() for p in model.parameters())}
        return model, tokenizer, info

    # -- Backend protocol -------------------------------------------------------------------------

    async def get_tokenizer(self) -> Tokenizer:
        """The model's own tokenizer (exact; decodes the token ids of returned traces)."""
        await self.load()
        assert self._tokenizer is not None
        return self._tokenizer

    async def context_length(self) -> int | None:
        """The model's context length from its config (``max_position_embeddings``)."""
        await self.load()
        assert self._loaded is not None
        return self._loaded.context_length

    async def generate(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[tuple[int, Outcome]]:
        """Run every request; yield ``(index, outcome)`` as each batch finishes.

        Loads the model on first use. Closing the iterator early drops its rows from the running
        batch (the batch stops at its next step when no row is left) and from the queue.
        """
        requests = list(requests)
        if not requests:
            return
        await self.load()
        assert self._worker is not None
        queue: asyncio.Queue[tuple[int, Outcome]] = asyncio.Queue()
        deliver = loop_delivery(asyncio.get_running_loop(), queue)
        jobs = [Job(index, request, deliver) for index, request in enumerate(requests)]
        self._worker.submit(jobs)
        try:
            for _ in jobs:
                yield await queue.get()
        finally:
            for job in jobs:
                job.cancelled = True

    async def aclose(self) -> None:
        """Stop the generation thread and free the model's memory; a later call loads it again."""
        worker, loaded = self._worker, self._loaded
        self._worker, self._loaded, self._tokenizer = None, None, None
        if worker is not None:
            await asyncio.to_thread(worker.close, 60.0)
        if loaded is not None:
            on_cuda = loaded.device.type == "cuda"
            del loaded
            gc.collect()
            if on_cuda:
                import torch

                torch.cuda.empty_cache()

    async def __aenter__(self) -> Self:
        await self.load()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- generation (worker thread) ---------------------------------------------------------------

    def _prepare(self, job: Job, loaded: _Loaded) -> _Row | None:
        request = job.request
        tokenizer = loaded.tokenizer
        notes: dict[str, Any] = {}
        try:
            messages = plain_messages(request.messages)
            if getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **(request.chat_template_kwargs or {})
                )
            else:
                prompt = chatml(messages)
                notes["chat_template"] = "chatml fallback (the tokenizer has none)"
            prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        except Exception as err:  # noqa: BLE001 - a bad conversation fails its own rollout only
            job.deliver(BackendError(f"cannot render the chat template: {_first_line(err)}", status=400))
            return None
        budget = max(1, int(request.max_tokens))
        if loaded.context_length:
            room = loaded.context_length - len(prompt_ids)
            if room < 1:
                job.deliver(
                    BackendError(
                        f"the prompt has {len(prompt_ids)} tokens; the model's context is {loaded.context_length}",
                        status=400,
                    )
                )
                return None
            if budget > room:
                notes["max_tokens_clamped"] = room
                budget = room
        ignored = sorted(set(request.extra) - _KNOWN_EXTRA)
        if ignored:
            notes["ignored_fields"] = ignored
        eos_ids = frozenset() if request.extra.get("ignore_eos") else loaded.eos_ids
        stops = stop_list(request.extra.get("stop"))
        return _Row(job, prompt_ids, prompt_opens_think(prompt), budget, stops, eos_ids, notes)

    def _run_batch(self, jobs: list[Job]) -> None:
        loaded = self._loaded
        if loaded is None:
            for job in jobs:
                job.deliver(BackendError("the local engine is closed"))
            return
        rows = [row for job in jobs if (row := self._prepare(job, loaded)) is not None]
        if rows:
            self._generate_rows(rows, loaded)

    def _generate_rows(self, rows: list[_Row], loaded: _Loaded) -> None:
        import torch

        out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        try:
            sequences, started, elapsed = self._model_generate(rows, loaded)
        except out_of_memory:
            if len(rows) == 1:
                rows[0].job.deliver(BackendError("out of memory generating one rollout; lower max_tokens", status=507))
                return
            # Each row has its own seed, so halves give the same tokens the whole batch would have.
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(rows) // 2
            self._generate_rows(rows[:half], loaded)
            self._generate_rows(rows[half:], loaded)
            return
        decode = _decoder(loaded.tokenizer)
        for row, generated in zip(rows, sequences, strict=True):
            if row.job.cancelled:
                continue
            finished = finish_row(generated, row.budget, row.eos_ids, row.stops, decode)
            reasoning, content = split_reasoning(finished.text, row.opens_think)
            raw: dict[str, Any] = {"text": finished.text, "batch_size": len(rows), **row.notes}
            if finished.stop_string is not None:
                raw["stop_string"] = finished.stop_string
            if row.opens_think:
                raw["think_opened_in_prompt"] = True
            raw["queue_s"] = round(max(0.0, started - row.job.submitted), 4)
            row.job.deliver(
                Trace(
                    content=content,
                    reasoning=reasoning,
                    token_ids=finished.token_ids,
                    finish_reason=finished.finish_reason,
                    usage=Usage(len(row.prompt_ids), len(finished.token_ids), len(row.prompt_ids) + len(finished.token_ids)),
                    latency_s=elapsed,
                    raw=raw,
                )
            )

    def _model_generate(self, rows: list[_Row], loaded: _Loaded) -> tuple[list[list[int]], float, float]:
        """Generated ids of every row (padding and overrun included), the start time and the duration."""
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
        )

        from ._sampling import RowSampler, RowSampling, RowStops

        width = max(len(row.prompt_ids) for row in rows)
        # Left padding: every row's last prompt token sits at the same position, where generation starts.
        input_ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention_mask[i, width - len(row.prompt_ids) :] = 1
        sampler = RowSampler([_row_sampling(row.job.request, RowSampling) for row in rows], loaded.device)
        decode = _decoder(loaded.tokenizer)
        stops = RowStops(
            width,
            [row.budget for row in rows],
            [row.stops for row in rows],
            [row.eos_ids for row in rows],
            [_cancel_check(row.job) for row in rows],
            decode,
        )
        config = GenerationConfig(
            max_new_tokens=max(row.budget for row in rows),
            do_sample=False,  # the sampler above draws each row's sample; see _sampling
            num_beams=1,
            # Penalties a checkpoint's generation_config may carry would skew every row; requests
            # do not ask for them. (Its temperature/top-p/top-k act only when do_sample is on.)
            repetition_penalty=1.0,
            pad_token_id=loaded.pad_id,
            # RowStops ends rows at their own end-of-sequence tokens; an empty list (not None, which
            # the checkpoint's generation_config would fill in) keeps generate from ending them itself.
            eos_token_id=[],
        )
        started = time.perf_counter()
        with torch.inference_mode():
            output = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention_mask.to(loaded.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([stops]),
            )
        elapsed = time.perf_counter() - started
        return output[:, width:].tolist(), started, elapsed


def _row_sampling(request: GenerationRequest, cls: Any) -> Any:
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
    min_p = request.extra.get("min_p") or 0.0
    return cls(
        temperature=float(request.temperature),
        top_p=float(request.top_p) if request.top_p else 1.0,
        top_k=int(request.top_k) if request.top_k else None,
        min_p=float(min_p),
        seed=int(seed),
    )


def _cancel_check(job: Job) -> Callable[[], bool]:
    return lambda: job.cancelled


def _decoder(tokenizer: Any) -> Any:
    # The same call as the tokenizer handed to the controller, so returned ids decode to returned text.
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


def _torch_dtype(torch: Any, name: str) -> Any:
    return getattr(torch, name)


def _placement(torch: Any, device: str, dtype: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load weights at ``dtype`` onto ``device``."""
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch, dtype)}
    if device.startswith("cuda"):
        require_module("accelerate", "loading a model onto the GPU")
        kwargs["device_map"] = device  # weights go straight to the GPU, never all through host RAM
    return kwargs


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _load_failure(ref: str, err: BaseException) -> str:
    import transformers

    message = f"transformers {transformers.__version__} cannot load {ref}: {_first_line(err)}"
    if any(hint in str(err) for hint in ("model type", "does not recognize", "Unrecognized")):
        message += " (a newer transformers may know this architecture; ZAYA1's `zaya` type needs transformers 5)"
    return message


def _count_parameters(torch: Any, config: Any, trust_remote_code: bool, folder: Path | None) -> int:
    """Parameters of the model ``config`` describes, without allocating them."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return int(sum(p.numel() for p in skeleton.parameters()))
    except Exception:  # noqa: BLE001 - fall back to the size of the weight files
        if folder is None:
            return 0
        stored = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
        return stored // 2  # most checkpoints store 16-bit weights


def _forget_gguf_origin(model: Any) -> None:
    # Once dequantized, the weights are plain tensors; saving them with the GGUF quantization config
    # would make the copy load through the GGUF quantizer again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("is_quantized", "quantization_method"):
        if hasattr(model, attribute):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(model, attribute, False if attribute == "is_quantized" else None)


def _save_cache(model: Any, tokenizer: Any, target: Path) -> bool:
    """Write the dequantized model where the next load finds it; False when that is not possible."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            os.replace(staging, target)  # atomic: a concurrent reader sees all of it or nothing
        except OSError:
            if (target / "config.json").is_file():
                return True  # another process won the race
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True
    except Exception:  # noqa: BLE001 - a read-only home only costs the next load its speed
        return False
